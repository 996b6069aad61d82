"""The selection protocol: what each strategy's keys() returns (a tensor of keys, RANDOM
or KEEP_ALL), the Selector's ownership of the score store (a resumed run ranks against
the store it loaded), its checkpointed state, and the padded gather the global ranking
and the loss share."""

from __future__ import annotations

import pytest
import torch

from dissect_dist.gather import gather_rows
from dissect_dist.selection import (
    KEEP_ALL,
    RANDOM,
    REGISTRY,
    Ranking,
    ScoredBatch,
    Selector,
    build_strategy,
)
from store import Momentum, ScoreStore

KW = {"beta": 0.9, "first_sight": "curr", "warmup_epochs": 1, "warmup_train": "random"}


def _batch(epoch: int = 0, b: int = 6) -> ScoredBatch:
    curr = torch.linspace(10.0, 60.0, b)
    return ScoredBatch(torch.arange(b), curr, -curr, epoch)


@pytest.mark.parametrize("name,epoch,kind", [
    ("full", 0, KEEP_ALL), ("random", 0, RANDOM), ("clipscore", 0, torch.Tensor),
    ("small_loss", 0, torch.Tensor), ("big_loss", 0, torch.Tensor),
    ("dissect_momentum", 0, torch.Tensor), ("dissect_warmup", 0, RANDOM),
    ("dissect_warmup", 1, torch.Tensor)])
def test_keys_return_a_tensor_of_keys_or_a_sentinel(name, epoch, kind):
    strat = build_strategy(name, **KW)
    batch = _batch(epoch)
    out = strat.keys(batch, Ranking("global", 1, ScoreStore(16)))
    if kind is torch.Tensor:
        assert isinstance(out, torch.Tensor) and out.shape == batch.ids.shape
    else:
        assert out is kind


def test_every_registered_strategy_is_covered_above():
    assert set(REGISTRY) == {"full", "random", "clipscore", "small_loss", "big_loss",
                             "dissect_momentum", "dissect_warmup", "oracle",
                             "learnability", "reference_filter"}


def test_the_oracle_keeps_exactly_the_pairs_the_ledger_does_not_list():
    noisy = torch.zeros(16, dtype=torch.bool)
    noisy[[1, 4, 5, 9]] = True
    sel = Selector(build_strategy("oracle", noisy=noisy), 0.3, "global", 0, 1, seed=0)
    ids = torch.tensor([9, 0, 4, 7, 3, 5, 12, 1])
    out = sel.select(ScoredBatch(ids, None, None, 0))
    assert out.keep.tolist() == [False, True, False, True, True, False, True, False]
    assert out.key is None  # whatever r: 4 of 8 kept at r = 0.3
    with pytest.raises(ValueError, match="data.noise_ledger"):
        build_strategy("oracle")


def test_warmup_train_full_says_keep_all():
    strat = build_strategy("dissect_warmup", **{**KW, "warmup_train": "full"})
    assert strat.keys(_batch(0), Ranking("global", 1, ScoreStore(16))) is KEEP_ALL


@pytest.mark.parametrize("name", ["dissect_momentum", "dissect_warmup"])
def test_a_strategy_with_history_needs_the_selector_to_own_a_store(name):
    with pytest.raises(ValueError, match="give the Selector a ScoreStore"):
        Selector(build_strategy(name, **KW), 0.5, "global", 0, 1, seed=0)


def test_the_selection_of_each_sentinel():
    b = 10
    full = Selector(build_strategy("full"), 0.3, "global", 0, 1, seed=0)
    out = full.select(ScoredBatch(torch.arange(b), None, None, 0))
    assert out.keep.all() and out.key is None
    rnd = Selector(build_strategy("random"), 0.3, "global", 0, 1, seed=0)
    out = rnd.select(ScoredBatch(torch.arange(b), None, None, 0))
    assert int(out.keep.sum()) == 3 and out.key is None


def test_a_resumed_selector_ranks_against_the_store_it_was_given():
    """The resume replaces the Selector's store; the strategy holds none of its own, so
    the next key is δ against the loaded history, not against the fresh store's (first
    sight: δ = 0 with first_sight=curr)."""
    ids = torch.arange(6)
    hist = torch.tensor([50.0, 10.0, 40.0, 20.0, 30.0, 60.0])
    loaded = ScoreStore(16)
    loaded.exchange(ids, hist, Momentum(beta=0.9))  # a history, as a checkpoint holds
    sel = Selector(build_strategy("dissect_momentum", **KW), 0.5, "global", 0, 1, seed=0,
                   store=ScoreStore(16))
    sel.store = loaded
    curr = torch.full((6,), 30.0)
    out = sel.select(ScoredBatch(ids, curr, None, 1))
    assert out.key is not None and out.key.tolist() == (hist - curr).tolist()
    assert out.keep.tolist() == [True, False, True, False, False, True]  # δ 20, 10, 30


def test_selector_state_is_the_generator_and_loads_an_older_state():
    a = Selector(build_strategy("random"), 0.5, "global", 0, 1, seed=7)
    a.select(ScoredBatch(torch.arange(8), None, None, 0))
    sd = a.state_dict()
    assert set(sd) == {"generator"}
    # Checkpoints written before also held the ratio, the scope and an empty strategy
    # state, which nothing read.
    b = Selector(build_strategy("random"), 0.5, "global", 0, 1, seed=0)
    b.load_state_dict({**sd, "ratio": 0.5, "scope": "global", "strategy": {}})
    x = a.select(ScoredBatch(torch.arange(8), None, None, 0)).keep
    y = b.select(ScoredBatch(torch.arange(8), None, None, 0)).keep
    assert torch.equal(x, y)


def _rp_gather(ctx, max_rows):
    import torch.distributed as dist

    rank, w = dist.get_rank(), dist.get_world_size()
    n = [3, 0, 5][rank]
    x = torch.arange(n, dtype=torch.float32) + 10 * rank
    keys, counts, flags = gather_rows(x, w, max_rows=max_rows,
                                      flag=torch.tensor(rank * 2, dtype=torch.int64))
    feats = (torch.arange(2 * n, dtype=torch.float32).reshape(n, 2) + 100 * rank)
    feats.requires_grad_(True)
    rows, fcounts, fflags = gather_rows(feats, w)
    rows.sum().backward()
    return (keys.tolist(), counts, flags, rows.detach().tolist(), fcounts, fflags,
            feats.grad.tolist())


@pytest.mark.multirank
@pytest.mark.parametrize("max_rows", [5, None])
def test_gather_rows_concatenates_uneven_ranks_with_counts_flags_and_own_gradient(pools,
                                                                                  max_rows):
    out = pools(3).run(_rp_gather, max_rows)
    want_keys = [0.0, 1.0, 2.0, 20.0, 21.0, 22.0, 23.0, 24.0]
    for rank, (keys, counts, flags, rows, fcounts, fflags, grad) in enumerate(out):
        assert keys == want_keys and counts == [3, 0, 5] and flags == [0, 2, 4]
        assert fcounts == [3, 0, 5] and fflags == [0, 0, 0]
        assert rows == [[0, 1], [2, 3], [4, 5], [200, 201], [202, 203], [204, 205],
                        [206, 207], [208, 209]]
        assert grad == [[1.0, 1.0]] * [3, 0, 5][rank]  # only its own rows carry gradient


def test_gather_rows_refuses_features_in_the_one_collective_form():
    with pytest.raises(ValueError, match="1-D rows"):
        gather_rows(torch.zeros(2, 3), 2, max_rows=4)


def _reference(values: list[float]) -> ScoreStore:
    ref = ScoreStore(len(values))
    ref.values[:] = torch.tensor(values, dtype=torch.float16)
    return ref


def test_learnability_ranks_by_reference_minus_current_score():
    ref = _reference([30.0, 10.0, float("nan"), 25.0, 5.0, 40.0])
    sel = Selector(build_strategy("learnability"), 0.5, "global", 0, 1, seed=0, reference=ref)
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    curr = torch.tensor([20.0, 15.0, 1.0, 24.0, 30.0, 10.0])
    out = sel.select(ScoredBatch(ids, curr, None, 0))
    assert out.key.tolist() == [10.0, -5.0, 0.0, 1.0, -25.0, 30.0]  # unscored: 0
    assert out.keep.tolist() == [True, False, False, True, False, True]
    assert ref.values.nan_to_num(-1).tolist() == [30.0, 10.0, -1, 25.0, 5.0, 40.0]  # read-only
    with pytest.raises(ValueError, match="reference store"):
        Selector(build_strategy("learnability"), 0.5, "global", 0, 1, seed=0)


def test_reference_filter_keeps_the_top_share_of_the_whole_data_set():
    """The threshold is the data set's, not the batch's: a batch of low-scoring pairs keeps
    none of them, whatever r."""
    vals = [float(v) for v in range(100)]  # scores 0..99; the top 30% are 70..99
    vals[7] = float("nan")  # unscored: dropped, and not counted in the share
    ref = _reference(vals)
    strat = build_strategy("reference_filter", ratio=0.3)
    sel = Selector(strat, 0.3, "global", 0, 1, seed=0, reference=ref)
    out = sel.select(ScoredBatch(torch.tensor([69, 70, 99, 7, 3, 85]), None, None, 0))
    assert strat.threshold == 70.0  # 30 of the 99 scored values are >= 70 (round(29.7))
    assert out.keep.tolist() == [False, True, True, False, False, True] and out.key is None
    low = sel.select(ScoredBatch(torch.arange(0, 10), None, None, 0))
    assert not low.keep.any()
