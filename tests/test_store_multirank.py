"""Multi-rank behaviour of the store with real gloo processes: uneven N/W, empty
batches, bad input reported on every rank, and re-partitioning on load."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

from store import ScoreStore
from tests import procs
from tests.rank_pool import free_port
from tests.store_model import (
    gather_dense,
    rp_exchange,
    rp_exchange_global,
    rp_exchange_random,
    rp_load,
    rp_new_store,
    rp_save,
    rp_try_exchange,
    same_bits,
)

pytestmark = pytest.mark.multirank
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_empty_batches_on_some_ranks_and_a_rank_owning_nothing(pools) -> None:
    pool = pools(3)
    # N=2 < W=3: rank 2 owns no ids, and ranks 0 and 2 bring nothing this step.
    ranges = pool.run(rp_new_store, 2, 1, 1)
    assert ranges[2][0] == ranges[2][1]
    got = pool.run(rp_exchange, [([], []), ([1, 0, 1], [5.0, 6.0, 7.0]), ([], [])],
                   ("overwrite",))
    assert got[0] == [] and got[2] == [] and all(math.isnan(x) for x in got[1])
    got = pool.run(rp_exchange, [([0], [1.0]), ([], []), ([1], [2.0])], ("frozen",))
    assert got == [[6.0], [], [7.0]]  # last occurrence of id 1 (7.0) won the overwrite


def test_out_of_range_id_fails_on_every_rank_and_names_the_id(pools) -> None:
    pool = pools(2)
    pool.run(rp_new_store, 50, 4, 8)
    errs = pool.run(rp_try_exchange, [([1, 2], [1.0, 2.0]), ([3, 50], [1.0, 2.0])])
    assert "sample id 50 is outside [0, N=50)" in errs[1]
    assert "ranks [1]" in errs[0]  # the innocent rank is told who failed, and does not hang
    # The collective stayed in step: the next exchange works on both ranks.
    assert pool.run(rp_try_exchange, [([1], [1.0]), ([49], [2.0])]) == ["", ""]


def test_non_finite_score_is_refused_with_its_id(pools) -> None:
    pool = pools(2)
    pool.run(rp_new_store, 50, 4, 8)
    errs = pool.run(rp_try_exchange, [([7], [float("nan")]), ([8], [1.0])])
    assert "score nan for sample id 7 is not finite" in errs[0]
    assert errs[1]


def test_save_at_three_ranks_loads_bit_exactly_at_two_and_one(pools, tmp_path) -> None:
    n = 100_003  # not divisible by 2 or 3, several shards per rank
    pool3 = pools(3)
    pool3.run(rp_new_store, n, 512, 4096)
    for step in range(6):
        pool3.run(rp_exchange_random, step, 4096)
    want = gather_dense(pool3, n)
    assert 0.05 < np.mean(~np.isnan(want)) < 0.95  # scored and never-scored both present
    pool3.run(rp_save, str(tmp_path), 6)
    for w in (2, 1):
        pools(w).run(rp_load, str(tmp_path), n, None, 512, 4096)
        assert same_bits(gather_dense(pools(w), n), want)
    single = ScoreStore.load(str(tmp_path), n=n)
    assert same_bits(single.local_numpy(), want)


def _rp_counter(ctx) -> tuple[int, int]:
    return ctx["store"].seed, ctx["store"].exchanges


def test_resume_at_any_world_size_rounds_on_exactly_as_an_uninterrupted_store(pools,
                                                                             tmp_path) -> None:
    """Stochastic rounding draws from (seed, exchange counter, id): a store saved by 3
    ranks and loaded by 2 or 1 continues bit for bit as the 3-rank store does."""
    n = 20_011
    pool3 = pools(3)
    pool3.run(rp_new_store, n, 256, 1024, 42)
    for step in range(5):
        pool3.run(rp_exchange_global, step, 6000)
    pool3.run(rp_save, str(tmp_path), 5)
    for step in range(5, 10):
        pool3.run(rp_exchange_global, step, 6000)
    want = gather_dense(pool3, n)
    for w in (3, 2, 1):
        pools(w).run(rp_load, str(tmp_path), n, None, 256, 1024)
        assert pools(w).run(_rp_counter) == [(42, 5)] * w
        for step in range(5, 10):
            pools(w).run(rp_exchange_global, step, 6000)
        assert same_bits(gather_dense(pools(w), n), want)


def test_torchrun_launched_ranks_save_and_reload_with_another_world(tmp_path) -> None:
    """The same store under torch's own launcher: 3 ranks save, 2 ranks reload."""
    script = os.path.join(REPO, "tests", "scripts", "store_ranks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for nproc, mode in ((3, "save"), (2, "verify")):
        rc, out = procs.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
             f"--master_port={free_port()}", script, mode, str(tmp_path)], 300, env=env)
        assert rc == 0, out[-6000:]
    assert "verified" in out
