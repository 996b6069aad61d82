"""Epoch order is a pure function: exactly once per epoch across ranks x workers,
equal batch counts per rank, a new order every epoch, any cluster shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dissect_dist.data.order import (
    OrderSpec,
    batches_per_rank,
    rank_batches,
    stream_slice,
    usable_samples,
    worker_batches,
)


def _all_batches(counts, spec, epoch, workers):
    """Every (rank, worker) stream's batches, as the loaders would decode them."""
    out = {}
    for r in range(spec.world_size):
        b = rank_batches(counts, spec, epoch, r)
        for k in range(workers):
            out[(r, k)] = [b[j] for j in worker_batches(b.shape[0], 0, k, workers)]
    return out


@pytest.mark.parametrize("nodes,ranks_per_node,workers", [(16, 8, 4), (1, 1, 1), (3, 2, 5)])
def test_every_sample_exactly_once_across_ranks_and_workers(nodes, ranks_per_node, workers):
    rng = np.random.default_rng(0)
    counts = rng.integers(50, 400, size=300)  # uneven shards, N ~ 67k
    spec = OrderSpec(seed=3, world_size=nodes * ranks_per_node, batch_size=16, window=4)
    streams = _all_batches(counts, spec, 0, workers)
    seen = np.concatenate([np.concatenate(v) for v in streams.values() if v])
    n = int(counts.sum())
    assert seen.size == usable_samples(n, spec)  # all but the declared remainder
    assert np.unique(seen).size == seen.size  # nothing twice
    assert n - seen.size < spec.world_size * spec.batch_size
    per_rank = {r: sum(len(streams[(r, k)]) for k in range(workers))
                for r in range(spec.world_size)}
    assert set(per_rank.values()) == {batches_per_rank(n, spec)}  # same count on every rank


def test_order_is_deterministic_and_differs_between_epochs():
    counts = np.full(41, 100)  # 4100 samples: 4 dropped per epoch at 2 x 8
    spec = OrderSpec(seed=1, world_size=2, batch_size=8)
    a0 = rank_batches(counts, spec, 0, 1)
    assert np.array_equal(a0, rank_batches(counts, spec, 0, 1))
    a1 = rank_batches(counts, spec, 1, 1)
    assert not np.array_equal(a0, a1)
    other_seed = rank_batches(counts, OrderSpec(seed=2, world_size=2, batch_size=8), 0, 1)
    assert not np.array_equal(a0, other_seed)
    # the dropped remainder is a different set of samples each epoch
    n = int(counts.sum())
    def full(e):
        return np.concatenate([rank_batches(counts, spec, e, r).ravel() for r in (0, 1)])
    dropped = [set(range(n)) - set(full(e).tolist()) for e in (0, 1)]
    assert len(dropped[0]) == len(dropped[1]) == 4 and dropped[0] != dropped[1]


def test_batches_mix_several_shards():
    counts = np.full(64, 500)
    spec = OrderSpec(seed=0, world_size=1, batch_size=64, window=4)
    b = rank_batches(counts, spec, 0, 0)
    shards_per_batch = [np.unique(row // 500).size for row in b[:50]]
    assert min(shards_per_batch) >= 3


@settings(deadline=None, max_examples=60)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=30),
       window=st.integers(1, 5), data=st.data())
def test_any_slice_of_the_stream_is_the_slice_of_the_whole(counts, window, data):
    counts = np.asarray(counts)
    spec = OrderSpec(seed=5, world_size=1, batch_size=1, window=window)
    n = int(counts.sum())
    whole = stream_slice(counts, spec, 2, 0, n)
    assert np.array_equal(np.sort(whole), np.arange(n))
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))
    assert np.array_equal(stream_slice(counts, spec, 2, a, b), whole[a:b])


@given(n=st.integers(0, 200), cursor=st.integers(0, 200), k=st.integers(1, 9))
def test_workers_split_the_remaining_batches_exactly(n, cursor, k):
    got = sorted(j for w in range(k) for j in worker_batches(n, cursor, w, k))
    assert got == list(range(cursor, n))


def test_bad_order_arguments_are_named():
    with pytest.raises(ValueError, match="batch_size=0"):
        OrderSpec(seed=0, world_size=2, batch_size=0)
    with pytest.raises(ValueError, match="rank 2 outside"):
        rank_batches(np.array([10]), OrderSpec(seed=0, world_size=2, batch_size=1), 0, 2)
