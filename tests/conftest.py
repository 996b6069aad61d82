from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import procs
from tests.rank_pool import RankPool

os.environ.setdefault("OMP_NUM_THREADS", "1")


class Pools:
    """Lazily started rank pools, one per world size, shared by the session."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world_size: int) -> RankPool:
        if world_size not in self._pools:
            self._pools[world_size] = RankPool(world_size)
        return self._pools[world_size]

    def close(self) -> None:
        for p in self._pools.values():
            p.close()


@pytest.fixture(autouse=True)
def _kill_started_processes() -> Iterator[None]:
    """No process a test started outlives it (tests/procs.py)."""
    yield
    procs.kill_all()


@pytest.fixture(scope="session")
def pools() -> Iterator[Pools]:
    p = Pools()
    yield p
    p.close()


@pytest.fixture(scope="session", autouse=True)
def _remove_killed_runs_shm_segments() -> Iterator[None]:
    """Runs that tests kill with SIGKILL cannot unlink DeepSpeed's CPU comm segments
    (66 MB per rank in /dev/shm, see launch/train.py); remove those this session created
    once it ends."""
    import glob
    import time

    start = time.time()
    yield
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_*"):
        try:
            if os.stat(path).st_mtime >= start:
                os.unlink(path)
        except FileNotFoundError:
            pass
