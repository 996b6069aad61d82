"""A non-finite ranking key is refused on every rank, naming the sample id, instead of
being ranked (a NaN sorts first, so `clipscore` used to keep it)."""

from __future__ import annotations

import pytest
import torch

from dissect_dist.selection import ScoredBatch, SelectionInputError, Selector, build_strategy
from store import ScoreStore


def _scored(ids: torch.Tensor, curr: torch.Tensor) -> ScoredBatch:
    # The loss strategies rank by ±per-sample loss: give them the same values.
    return ScoredBatch(ids, curr, curr.clone(), epoch=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("strategy", ["clipscore", "small_loss", "big_loss",
                                      "dissect_momentum", "dissect_warmup"])
def test_non_finite_score_is_refused_naming_the_sample(strategy, bad):
    store = ScoreStore(100)
    sel = Selector(build_strategy(strategy, beta=0.9, first_sight="curr", warmup_epochs=1,
                                  warmup_train="random"),
                   0.5, "global", 0, 1, seed=0, store=store)
    ids = torch.arange(40, 50)
    curr = torch.linspace(10, 30, 10)
    sel.select(_scored(ids, curr))  # a finite step first (history for dissect)
    curr = curr.clone()
    curr[3] = bad
    with pytest.raises(ValueError, match="sample id 43 is not finite|for sample id 43 is not "
                                          "finite"):
        sel.select(_scored(ids, curr))


def test_clipscore_with_a_nan_score_used_to_keep_it():
    """What the refusal prevents: torch sorts NaN above every number."""
    key = torch.tensor([1.0, float("nan"), 3.0])
    assert int(torch.argsort(key, descending=True, stable=True)[0]) == 1


def _rp_nan_on_rank1(ctx, scope, max_rows):
    import torch.distributed as dist

    rank, w = dist.get_rank(), dist.get_world_size()
    sel = Selector(build_strategy("clipscore"), 0.5, scope, rank, w, seed=0, max_rows=max_rows)
    ids = torch.arange(8) + 8 * rank
    curr = torch.linspace(0, 50, 8)
    if rank == 1:
        curr[5] = float("nan")
    try:
        sel.select(ScoredBatch(ids, curr, None, 0))
    except SelectionInputError as e:
        msg = str(e)
    else:
        msg = ""
    # The ranks are still in step: one more collective completes on every rank.
    t = torch.ones(1)
    dist.all_reduce(t)
    return msg, float(t)


@pytest.mark.multirank
@pytest.mark.parametrize("max_rows", [8, None])  # counts in the keys' buffer / gathered apart
@pytest.mark.parametrize("scope", ["global", "local"])
def test_every_rank_refuses_when_one_rank_has_a_nan(pools, scope, max_rows):
    (m0, t0), (m1, t1) = pools(2).run(_rp_nan_on_rank1, scope, max_rows)
    assert "sample id 13 is not finite" in m1  # rank 1's 6th sample: id 8 + 5
    assert "another rank" in m0
    assert t0 == t1 == 2.0
