"""Id-range partitioning of the score store: pure functions, no I/O, no torch.

N samples with dense ids in [0, N) are split across W ranks into contiguous ranges.
Every range boundary is a multiple of the Zarr shard size, so each rank writes whole
shards and no two ranks ever touch the same storage object.

    per   = ceil(N / W)                      # ideal samples per rank
    chunk = min(chunk_target, per)           # inner (compressed, checksummed) chunk
    shard = min(shard_target // chunk * chunk, round_up(per, chunk))
    P     = round_up(per, shard)             # range length, a whole number of shards
    rank w owns [min(w*P, N), min((w+1)*P, N))

Rounding up P to whole shards can leave trailing ranks with an empty range when N is
small relative to W (for example N < W); that is valid and those ranks own nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

# 2**20 fp16 values = 2 MiB per inner chunk, 2**22 = 8 MiB per shard object. The store
# reads and writes whole ranks' ranges, never single values, so big chunks cost nothing
# on reads and keep Zarr's per-chunk overhead small on writes (measured: 2**16-value
# chunks save at ~2/3 the speed of 2**20-value ones). Ranges are balanced to within
# one shard (4M samples) per rank.
DEFAULT_CHUNK = 1 << 20
DEFAULT_SHARD = 1 << 22


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """How N ids map onto W ranks and onto Zarr shards and chunks."""

    n: int
    world_size: int
    chunk: int
    shard: int
    per_rank: int  # P: length of every range but possibly the last non-empty one

    @classmethod
    def build(
        cls,
        n: int,
        world_size: int,
        *,
        chunk_target: int = DEFAULT_CHUNK,
        shard_target: int = DEFAULT_SHARD,
    ) -> Layout:
        if n < 1:
            raise ValueError(f"score store size N={n}: need at least one sample")
        if world_size < 1:
            raise ValueError(f"world_size={world_size}: need at least one rank")
        if chunk_target < 1 or shard_target < chunk_target:
            raise ValueError(
                f"chunk_target={chunk_target}, shard_target={shard_target}: need "
                "1 <= chunk_target <= shard_target"
            )
        per = _ceil_div(n, world_size)
        chunk = min(chunk_target, per)
        shard = min(shard_target // chunk * chunk, _round_up(per, chunk))
        return cls(n=n, world_size=world_size, chunk=chunk, shard=shard,
                   per_rank=_round_up(per, shard))

    def range_of(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of the ids that `rank` owns; lo == hi when it owns none."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        lo = min(rank * self.per_rank, self.n)
        hi = min(lo + self.per_rank, self.n)
        return lo, hi

    def ranges(self) -> list[tuple[int, int]]:
        return [self.range_of(r) for r in range(self.world_size)]

    def owner(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Owning rank of every id; ids must already be checked to lie in [0, N)."""
        return np.asarray(ids, dtype=np.int64) // self.per_rank

    @property
    def num_shards(self) -> int:
        return _ceil_div(self.n, self.shard)

    def shards_of(self, rank: int) -> range:
        """Indices of the shards that `rank` writes (all of them whole, except the
        final shard of the array, which is cut at N)."""
        return self.shards_of_range(*self.range_of(rank))

    def shards_of_range(self, lo: int, hi: int) -> range:
        """Indices of the shards that hold ids [lo, hi)."""
        if lo >= hi:
            return range(0)
        return range(lo // self.shard, _ceil_div(hi, self.shard))

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls)})
