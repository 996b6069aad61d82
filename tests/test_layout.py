"""Partitioning is a pure function: every id has exactly one owner, ranges are
contiguous and shard aligned, for any N and world size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import Layout


@settings(deadline=None)
@given(n=st.integers(1, 10**7), w=st.integers(1, 64),
       chunk=st.sampled_from([7, 64, 1 << 16]), mult=st.integers(1, 32))
def test_ranges_partition_ids_exactly_once_on_whole_shards(n: int, w: int, chunk: int,
                                                          mult: int) -> None:
    lay = Layout.build(n, w, chunk_target=chunk, shard_target=chunk * mult)
    ranges = lay.ranges()
    assert ranges[0][0] == 0
    covered = 0
    for (lo, hi), nxt in zip(ranges, ranges[1:] + [(n, n)]):
        assert lo <= hi == nxt[0]  # contiguous, in rank order
        assert lo == n or lo % lay.shard == 0  # starts on a shard boundary (or is empty)
        assert hi == n or hi % lay.shard == 0
        covered += hi - lo
    assert covered == n
    assert lay.shard % lay.chunk == 0
    # Every non-empty rank writes whole shards that no other rank writes.
    shards = [s for r in range(w) for s in lay.shards_of(r)]
    assert shards == list(range(lay.num_shards))


@given(n=st.integers(1, 10**6), w=st.integers(1, 40), data=st.data())
def test_owner_of_an_id_is_the_rank_whose_range_holds_it(n: int, w: int, data) -> None:
    lay = Layout.build(n, w, chunk_target=16, shard_target=64)
    ids = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=50)))
    assert len(lay.ranges()) == w
    owners = lay.owner(ids)
    for i, o in zip(ids, owners):
        lo, hi = lay.range_of(int(o))
        assert lo <= i < hi


@pytest.mark.parametrize("n,w", [(5, 8), (1, 3), (10, 1), (1000, 3), (10**8, 4)])
def test_edge_worlds(n: int, w: int) -> None:
    lay = Layout.build(n, w)
    sizes = [hi - lo for lo, hi in lay.ranges()]
    assert sum(sizes) == n and len(sizes) == w


def test_balance_at_scale_is_within_a_shard_of_ideal() -> None:
    lay = Layout.build(10**8, 8)
    biggest = max(hi - lo for lo, hi in lay.ranges())
    assert biggest - 10**8 / 8 < lay.shard


def test_layout_round_trips_through_dict() -> None:
    lay = Layout.build(12345, 3, chunk_target=10, shard_target=100)
    assert Layout.from_dict(lay.to_dict()) == lay


@pytest.mark.parametrize("kw,msg", [
    (dict(n=0, world_size=2), "N=0"),
    (dict(n=10, world_size=0), "world_size=0"),
    (dict(n=10, world_size=2, chunk_target=8, shard_target=4), "chunk_target"),
])
def test_bad_layout_arguments_are_named(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Layout.build(**kw)
