"""Epoch sample order as pure functions of (seed, epoch, shard sizes, world size,
batch size, shuffle window): no I/O, so it can be tested for any cluster shape in
one process.

Per epoch:
  1. shards are permuted (seed, epoch);
  2. their samples, concatenated in that order, form the epoch stream of global ids
     (id = offset[shard] + position in shard);
  3. within each window of `window` consecutive shards of the stream, samples are
     permuted, so a batch mixes several shards while reads stay local to a window;
  4. the stream is cut to a multiple of world_size * batch_size (the declared
     drop-last remainder: the stream's tail, a different set of samples each epoch);
  5. rank r takes the r-th contiguous 1/W of the stream, in batches of batch_size.

Data-loader workers do not change the order: worker k of K decodes the rank's
batches c+k, c+k+K, ... (c = cursor), and the loader hands them out in batch order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


@dataclasses.dataclass(frozen=True, slots=True)
class OrderSpec:
    seed: int
    world_size: int
    batch_size: int
    window: int = 4  # shards whose samples are mixed together

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size}: need >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: need >= 1 (per rank)")
        if self.window < 1:
            raise ValueError(f"shuffle window={self.window}: need >= 1 shard")


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def usable_samples(total: int, spec: OrderSpec) -> int:
    """Samples consumed per epoch: the stream cut to whole global batches."""
    per_step = spec.world_size * spec.batch_size
    return total // per_step * per_step


def batches_per_rank(total: int, spec: OrderSpec) -> int:
    return total // (spec.world_size * spec.batch_size)


def stream_slice(counts: IntArray, spec: OrderSpec, epoch: int, a: int, b: int) -> IntArray:
    """Global ids at positions [a, b) of the epoch stream. Only the shuffle windows
    that overlap [a, b) are materialised: memory O(b - a + one window)."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    shard_perm = _rng(spec.seed, epoch, 0).permutation(counts.size)
    n_win = -(-counts.size // spec.window)
    win_sizes = np.add.reduceat(counts[shard_perm], np.arange(0, counts.size, spec.window)) \
        if counts.size else np.zeros(0, np.int64)
    win_start = np.concatenate([[0], np.cumsum(win_sizes)]).astype(np.int64)
    parts = []
    first = int(np.searchsorted(win_start, a, side="right")) - 1
    for w in range(max(first, 0), n_win):
        lo, hi = int(win_start[w]), int(win_start[w + 1])
        if lo >= b:
            break
        shards = shard_perm[w * spec.window:(w + 1) * spec.window]
        ids = np.concatenate([np.arange(offsets[s], offsets[s] + counts[s]) for s in shards])
        ids = ids[_rng(spec.seed, epoch, 1, w).permutation(ids.size)]
        parts.append(ids[max(a, lo) - lo:min(b, hi) - lo])
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def rank_batches(counts: IntArray, spec: OrderSpec, epoch: int, rank: int) -> IntArray:
    """(batches_per_rank, batch_size) ids of `rank`'s batches this epoch, in order."""
    if not 0 <= rank < spec.world_size:
        raise ValueError(f"rank {rank} outside world of size {spec.world_size}")
    per_rank = usable_samples(int(np.sum(counts)), spec) // spec.world_size
    ids = stream_slice(counts, spec, epoch, rank * per_rank, (rank + 1) * per_rank)
    return ids.reshape(-1, spec.batch_size)


def worker_batches(n_batches: int, cursor: int, worker: int, num_workers: int) -> range:
    """Indices of the rank's batches that `worker` decodes when resuming at `cursor`."""
    return range(cursor + worker, n_batches, max(num_workers, 1))
