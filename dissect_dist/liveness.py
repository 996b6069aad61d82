"""Who is still there when a collective fails.

A collective that fails (a peer's connection reset) or times out
(`train.collective_timeout_s`) says little about which rank is gone: in a ring, every
survivor sees only its neighbour. Each rank therefore keeps a heartbeat, a counter it
increments every `interval_s` in the rendezvous store (the TCPStore on MASTER_ADDR:MASTER_PORT
that the process group was started from; a client of its own, so a blocked collective does
not block it). When a collective fails, a surviving rank marks itself as a survivor, waits
a few intervals, and names the ranks whose counter did not move and who did not mark
themselves: the lost ones. The lowest surviving rank reports; the others stay quiet, so the
failure is one line per run, not one per rank. Counters, not clocks: hosts' clocks need not
agree.

When the store itself cannot be reached, rank 0's host (which serves it) is the one that
is gone, or the network to it: then each host's first local rank reports that.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]

_PREFIX = "dissect/liveness"

# What gloo and NCCL say when a peer is gone or a collective waited too long (torch raises
# plain RuntimeError / DistBackendError with the backend's message).
_COMM_FAILURE = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting",
                 "timed out", "Broken pipe", "Socket Timeout", "NCCL communicator was aborted",
                 "Connection refused", "No route to host", "Network is unreachable")


def is_comm_failure(e: BaseException) -> bool:
    """A collective failed because a peer or the network went away."""
    if isinstance(e, getattr(dist, "DistNetworkError", ())) or \
            isinstance(e, getattr(dist, "DistBackendError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in _COMM_FAILURE)


@dataclass(frozen=True)
class Verdict:
    lost: list[int] | None  # None: the store (rank 0's host) could not be reached
    report: bool  # this rank is the one that prints the line


class Heartbeat:
    def __init__(self, rank: int, world: int, interval_s: float = 1.0,
                 timeout_s: float = 10.0) -> None:
        self.rank, self.world, self.interval_s, self.timeout_s = rank, world, interval_s, timeout_s
        self._stop = threading.Event()
        self._store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    is_master=False, timeout=timedelta(seconds=timeout_s),
                                    wait_for_workers=False)
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def _key(self, kind: str, rank: int) -> str:
        return f"{_PREFIX}/{kind}/{rank}"

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.add(self._key("beat", self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is unreachable: try again later
                pass
            self._stop.wait(self.interval_s)

    def diagnose(self, wait_intervals: float = 3.0) -> Verdict:
        """Collective failed: which ranks are gone? Takes ~wait_intervals x interval_s."""
        try:
            self._store.set(self._key("survivor", self.rank), "1")
            before = [self._store.add(self._key("beat", r), 0) for r in range(self.world)]
            time.sleep(wait_intervals * self.interval_s)
            after = [self._store.add(self._key("beat", r), 0) for r in range(self.world)]
            marked = [self._store.check([self._key("survivor", r)]) for r in range(self.world)]
        except Exception:  # noqa: BLE001 - rank 0's store is gone with its host or network
            return Verdict(None, report=int(os.environ.get("LOCAL_RANK", "0")) == 0)
        lost = [r for r in range(self.world) if after[r] == before[r] and not marked[r]]
        alive = [r for r in range(self.world) if r not in lost]
        return Verdict(lost, report=bool(alive) and self.rank == min(alive))

    def stop(self) -> None:
        """Join the thread before the interpreter exits: a daemon thread still inside a
        store call (which releases the GIL) when Python finalizes is unwound through C++
        frames that cannot be unwound, and the process aborts ("terminate called without an
        active exception") after a complete run."""
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 2)
