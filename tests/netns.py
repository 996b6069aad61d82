"""Test hosts of their own on this machine: network namespaces joined by a veth pair.

`Hosts` creates two namespaces, each with a loopback and one end of a veth pair carrying
its own address on a private /24, and removes them (and so every interface in them) on
exit, also after a failure. Processes started in a namespace see the same filesystem, so a
run directory is shared as on a cluster's network filesystem, but each host has its own
network stack: its own addresses, its own loopback, its own ports. Nothing is routed to the
host's own interfaces or beyond.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    name = f"dd-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass(frozen=True)
class Host:
    ns: str  # network namespace name
    dev: str  # its veth end
    addr: str  # its address

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """argv run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def link(self, up: bool) -> None:
        """Plug or unplug this host's cable."""
        _ip("-n", self.ns, "link", "set", self.dev, "up" if up else "down")

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in this host's namespace, as a power cut would."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"processes in {self.ns} survive SIGKILL: {self.pids()}")


class Hosts:
    """Two hosts, 10.231.N.1 and 10.231.N.2, N from the pid (tests run side by side)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        net = 10 + os.getpid() % 240
        self.hosts = [Host(f"dd{tag}h{i}", f"dd{tag}v{i}", f"10.231.{net}.{i}") for i in (1, 2)]
        self._made: list[str] = []

    def __enter__(self) -> list[Host]:
        try:
            for h in self.hosts:
                _ip("netns", "add", h.ns)
                self._made.append(h.ns)
                _ip("-n", h.ns, "link", "set", "lo", "up")
            a, b = self.hosts
            _ip("link", "add", a.dev, "netns", a.ns, "type", "veth", "peer", "name", b.dev,
                "netns", b.ns)
            for h in self.hosts:
                _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
                h.link(up=True)
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self._made):  # deleting a namespace deletes its veth end (both)
            h = next(x for x in self.hosts if x.ns == ns)
            h.kill_all()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []
