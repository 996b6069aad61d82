"""Who is still there, and who made no progress, when a run cannot go on.

A collective that fails (a peer's connection reset) or times out
(`train.collective_timeout_s`) says little about which rank is to blame: in a ring, every
survivor sees only its neighbour, and a rank that is alive but stuck (a read that never
returns, a deadlock) keeps its connections open. Each rank therefore runs a heartbeat
thread with a client of its own to the rendezvous store (the TCPStore on
MASTER_ADDR:MASTER_PORT that the process group was started from, so a blocked collective
does not block it). Every `interval_s` it publishes the rank's state: a beat counter, the
step and phase its main thread is in (`Where`, set by the trainer), and for how many
seconds that has not changed. Counters and local durations, not clocks: hosts' clocks
need not agree.

When a collective fails, a surviving rank marks itself as a survivor, waits a few
intervals, and sorts the others into
  - lost: their beat did not move and they did not mark themselves (the process or its
    host is gone);
  - stuck: their beat moves but they never reached the failed collective; the line
    names each with its last step and phase and how long it made no progress there.
The lowest survivor prints one line and posts an abort record in the store; every
rank's heartbeat thread that sees the record ends its process with the record's status
(a stuck rank first prints where its main thread is), so no process of the job is left
running, on any host. A rank that knows why it cannot go on (a data worker stalled)
posts the record itself.

When the store itself cannot be reached, rank 0's host (which serves it) is the one that
is gone, or the network to it: then each host's first local rank reports that.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
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

# The phases a rank's main thread goes through, as a person reads them.
PHASE_TEXT = {
    "setup": "setup (model, engine, resume)",
    "data": "data loading",
    "input": "copying the batch to the device",
    "score": "scoring",
    "wait": "waiting for the other ranks before the selection",
    "select": "the selection (score exchange and ranking)",
    "fwd_bwd": "the forward/backward pass",
    "optim": "the optimizer step",
    "observe": "logging and evaluation",
    "checkpoint": "writing a checkpoint",
    "end": "the end of the run",
}


def is_comm_failure(e: BaseException) -> bool:
    """A collective failed because a peer or the network went away."""
    if isinstance(e, getattr(dist, "DistNetworkError", ())) or \
            isinstance(e, getattr(dist, "DistBackendError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in _COMM_FAILURE)


class Where:
    """Where the main thread is: written by it (two attribute stores, no lock: the
    heartbeat thread only reads), published by the heartbeat."""

    __slots__ = ("step", "phase", "moves")

    def __init__(self) -> None:
        self.step, self.phase, self.moves = 0, "setup", 0

    def enter(self, phase: str, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.phase = phase
        self.moves += 1


@dataclass(frozen=True)
class RankState:
    rank: int
    beats: int
    step: int
    phase: str
    still_s: float  # seconds since its main thread last moved (its own clock)

    def progress_text(self) -> str:
        return (f"rank {self.rank} made no progress for {self.still_s:.0f} s, last in "
                f"{PHASE_TEXT.get(self.phase, self.phase)} at step {self.step}")


@dataclass(frozen=True)
class Verdict:
    lost: list[int] | None  # None: the store (rank 0's host) could not be reached
    stuck: list[RankState]  # alive, but never reached the failed collective
    report: bool  # this rank is the one that prints the line

    def who(self) -> str:
        """The ranks to blame, in words."""
        if self.lost is None:
            return ("rank 0's host is unreachable (the rendezvous store at "
                    f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})")
        parts = []
        if self.lost:
            parts.append(f"lost rank(s) {', '.join(map(str, self.lost))} (no heartbeat)")
        if self.stuck:
            shown = [s.progress_text() for s in self.stuck[:8]]
            more = len(self.stuck) - len(shown)
            parts.append("; ".join(shown) + (f" (and {more} more)" if more else ""))
        if not parts:
            return "every rank reached the collective: the network between them failed"
        return "; ".join(parts)


class Heartbeat:
    """The rank's heartbeat thread (see the module's doc). `on_abort(status)` is called on
    the heartbeat thread when another rank posted the abort record: it must end the
    process (os._exit), as the main thread may be blocked for good."""

    def __init__(self, rank: int, world: int, where: Where | None = None,
                 on_abort: Callable[[int], None] | None = None, interval_s: float = 1.0,
                 timeout_s: float = 10.0) -> None:
        self.rank, self.world, self.interval_s, self.timeout_s = rank, world, interval_s, timeout_s
        self.where = where if where is not None else Where()
        self.on_abort = on_abort
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                               is_master=False, timeout=timedelta(seconds=timeout_s),
                               wait_for_workers=False)
        self._lock = threading.Lock()  # the store client is used from two threads
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def _key(self, kind: str, rank: int | None = None) -> str:
        return f"{_PREFIX}/{kind}" + ("" if rank is None else f"/{rank}")

    def _beat(self) -> None:
        beats, moves, moved_at = 0, -1, time.monotonic()
        while not self._stop.is_set():
            w = self.where
            if w.moves != moves:
                moves, moved_at = w.moves, time.monotonic()
            beats += 1
            state = f"{beats} {w.step} {w.phase} {time.monotonic() - moved_at:.1f}"
            try:
                with self._lock:
                    self._store.set(self._key("state", self.rank), state)
                    aborted = self._store.check([self._key("abort")])
                    record = self._store.get(self._key("abort")).decode() if aborted else ""
            except Exception:  # noqa: BLE001 - the store is unreachable: try again later
                record = ""
            if record and not self._stop.is_set():
                self._aborted(record)
            self._stop.wait(self.interval_s)

    def _aborted(self, record: str) -> None:
        """Another rank ended the run: say where this one is if it was named, then end."""
        status, by, stuck, line = _parse_abort(record)
        if by != self.rank:
            if self.rank in stuck:
                frame = sys._current_frames().get(self._main) if self._main else None
                stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
                sys.stderr.write(f"[rank {self.rank}] stopped by rank {by}, which found this "
                                 f"rank stuck in {PHASE_TEXT.get(self.where.phase)} at step "
                                 f"{self.where.step}; its main thread was at:\n{stack}")
                sys.stderr.flush()
            if self.on_abort is not None:
                self.on_abort(status)

    def states(self) -> list[RankState | None]:
        """Every rank's last published state (None: it never published)."""
        keys = [self._key("state", r) for r in range(self.world)]
        with self._lock:
            have = [self._store.check([k]) for k in keys]
            raw = [self._store.get(k).decode() if h else "" for k, h in zip(keys, have)]
        out: list[RankState | None] = []
        for r, v in enumerate(raw):
            if not v:
                out.append(None)
                continue
            beats, step, phase, still = v.split(" ")
            out.append(RankState(r, int(beats), int(step), phase, float(still)))
        return out

    def diagnose(self, wait_intervals: float = 3.0) -> Verdict:
        """A collective failed: which ranks are gone, and which alive ones never came?
        Takes ~wait_intervals x interval_s."""
        try:
            with self._lock:
                self._store.set(self._key("survivor", self.rank), "1")
            before = self.states()
            time.sleep(wait_intervals * self.interval_s)
            after = self.states()
            with self._lock:
                marked = [self._store.check([self._key("survivor", r)])
                          for r in range(self.world)]
        except Exception:  # noqa: BLE001 - rank 0's store is gone with its host or network
            return Verdict(None, [], report=int(os.environ.get("LOCAL_RANK", "0")) == 0)

        def beats(s: RankState | None) -> int:
            return -1 if s is None else s.beats

        lost = [r for r in range(self.world)
                if beats(after[r]) == beats(before[r]) and not marked[r]]
        stuck = [s for r, s in enumerate(after)
                 if s is not None and r not in lost and not marked[r]]
        survivors = [r for r in range(self.world) if marked[r]]  # self among them
        return Verdict(lost, stuck, report=self.rank == min(survivors))

    def abort(self, status: int, line: str, stuck: list[int] | None = None) -> bool:
        """Post the abort record (the first one posted stands): every other rank's
        heartbeat then ends its process with `status`. False: another rank's record was
        there first, or the store is unreachable."""
        record = f"{status} {self.rank} {','.join(map(str, stuck or [])) or '-'} {line}"
        try:
            with self._lock:
                now = self._store.compare_set(self._key("abort"), "", record)
        except Exception:  # noqa: BLE001 - the store is gone: the launcher ends the rest
            return False
        return bool(now.decode() == record)

    def stop(self) -> None:
        """Join the thread before the interpreter exits: a daemon thread still inside a
        store call (which releases the GIL) when Python finalizes is unwound through C++
        frames that cannot be unwound, and the process aborts ("terminate called without an
        active exception") after a complete run."""
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 2)


def _parse_abort(record: str) -> tuple[int, int, list[int], str]:
    """(status, posting rank, ranks named stuck, line) of an abort record."""
    status, by, stuck, line = record.split(" ", 3)
    return int(status), int(by), [] if stuck == "-" else [int(x) for x in stuck.split(",")], line
