"""Processes that tests start, bounded: each runs in a session of its own
(dissect_dist.launching.Bounded); one still running at its deadline has each rank's stacks
taken, its whole process tree killed, and the test fails with those stacks and the tail of
its output. Whatever a test started is killed when the test ends (conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dissect_dist.launching import REPO, Bounded

_started: list[Bounded] = []


def start(cmd: list[str], *, env: dict[str, str] | None = None,
          cwd: str | Path = REPO) -> Bounded:
    """Start `cmd`; killed with its tree at the end of the test at the latest."""
    b = Bounded([str(c) for c in cmd], env=env, cwd=cwd)
    _started.append(b)
    return b


def finish(b: Bounded, timeout_s: float) -> tuple[int, str]:
    """(exit status, output) of a started command, or the test fails once it has run
    `timeout_s` seconds (killed, with its ranks' stacks in the message)."""
    rc = b.wait(timeout_s)
    if rc is None:
        pytest.fail(b.hung_report(timeout_s), pytrace=False)
    return rc, b.output()


def run(cmd: list[str], timeout_s: float, *, env: dict[str, str] | None = None,
        cwd: str | Path = REPO) -> tuple[int, str]:
    """start + finish."""
    return finish(start(cmd, env=env, cwd=cwd), timeout_s)


def kill_all() -> None:
    """Kill every process tree a test started (a test that failed half-way included)."""
    while _started:
        b = _started.pop()
        b.__exit__(None, None, None)
