from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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


@pytest.fixture(scope="session")
def pools() -> Iterator[Pools]:
    p = Pools()
    yield p
    p.close()
