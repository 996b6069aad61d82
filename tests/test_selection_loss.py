"""Invariants 4 and 5 with real gloo ranks: the global top-k equals the one-process
top-k over the concatenated batch; loss gradients under uneven selections (a rank
keeping nothing included) equal the one-process reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dissect_dist.loss import clip_loss, scale_for_mean_reduce
from dissect_dist.selection import Ranking, ScoredBatch, Selector, build_strategy
from store import ScoreStore

pytestmark = pytest.mark.multirank

SIZES = [5, 0, 9]  # rank 1 brings an empty batch


def _batch(sizes, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    curr = torch.randint(0, 4, (total,), generator=g).float()  # many ties
    ids = torch.arange(total)
    lo = sum(sizes[:rank])
    return ids[lo:lo + sizes[rank]], curr[lo:lo + sizes[rank]], curr


def _rp_select(ctx, sizes, strategy, ratio, steps, max_rows=None):
    import torch.distributed as dist

    rank, w = dist.get_rank(), dist.get_world_size()
    sel = Selector(build_strategy(strategy), ratio, "global", rank, w, seed=11,
                   max_rows=max_rows)
    out = []
    for step in range(steps):
        ids, curr, _ = _batch(sizes, rank, seed=step)
        out.append(sel.select(ScoredBatch(ids, curr, None, 0)).keep.tolist())
    return out


@pytest.mark.parametrize("max_rows", [None, 9])  # counts gathered apart / in the keys' buffer
@pytest.mark.parametrize("strategy", ["clipscore", "random"])
def test_global_top_k_equals_one_process_top_k(pools, strategy, max_rows):
    got = pools(3).run(_rp_select, SIZES, strategy, 0.4, 4, max_rows)
    ref = Selector(build_strategy(strategy), 0.4, "global", 0, 1, seed=11)
    for step in range(4):
        _, _, curr = _batch(SIZES, 0, seed=step)
        want = ref.select(ScoredBatch(torch.arange(14), curr, None, 0)).keep.tolist()
        assert sum((got[r][step] for r in range(3)), []) == want  # rank-order concatenation
        assert sum(want) == round(0.4 * 14)


def test_ties_are_broken_randomly_not_by_id():
    sel = Selector(build_strategy("clipscore"), 0.5, "global", 0, 1, seed=0)
    firsts = []
    for _ in range(20):
        keep = sel.select(ScoredBatch(torch.arange(100), torch.zeros(100), None, 0)).keep
        firsts.append(keep[:50].sum().item())
    assert 15 < sum(firsts) / 20 < 35  # about half the kept rows from the low ids


@pytest.mark.parametrize("first_sight,first_key", [("zero", "-curr"), ("curr", "0")])
def test_first_sight_sets_only_the_key_and_the_store_records_curr(first_sight, first_key):
    """The reference ranks its first epoch by 0 - curr but stores hist := curr (not
    0.1*curr); momentum starts from there at the second sighting."""
    store = ScoreStore(10)
    strat = build_strategy("dissect_momentum", beta=0.9, first_sight=first_sight)
    ranking = Ranking("global", 1, store)
    curr = torch.tensor([40.0, 20.0, 60.0])
    key = strat.keys(ScoredBatch(torch.tensor([1, 5, 7]), curr, None, 0), ranking)
    want_key = -curr if first_key == "-curr" else torch.zeros(3)
    assert isinstance(key, torch.Tensor) and torch.equal(key, want_key)
    assert store.values[[1, 5, 7]].float().tolist() == [40.0, 20.0, 60.0]
    # Second sighting: δ = hist - curr against the recorded curr, then β-averaging.
    key = strat.keys(ScoredBatch(torch.tensor([1]), torch.tensor([50.0]), None, 1), ranking)
    assert isinstance(key, torch.Tensor) and key.tolist() == [40.0 - 50.0]
    assert float(store.values[1]) == 0.9 * 40.0 + 0.1 * 50.0


def _features(seed: int, n: int, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randn(n, 5, generator=g)


def _model(seed: int = 3):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"img": torch.nn.Linear(8, 6), "txt": torch.nn.Linear(5, 6),
                                "scale": torch.nn.ParameterList([torch.nn.Parameter(
                                    torch.tensor([2.0]))])})


def _loss(m, xi, xt, world):
    img = F.normalize(m["img"](xi), dim=-1)
    txt = F.normalize(m["txt"](xt), dim=-1)
    return clip_loss(img, txt, m["scale"][0], world)


def _rp_grads(ctx, keep_counts):
    import torch.distributed as dist

    rank, w = dist.get_rank(), dist.get_world_size()
    xi, xt = _features(0, sum(keep_counts))
    lo = sum(keep_counts[:rank])
    m = _model()
    loss = _loss(m, xi[lo:lo + keep_counts[rank]], xt[lo:lo + keep_counts[rank]], w)
    scale_for_mean_reduce(loss, w).backward()
    grads = []
    for p in m.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads.append(g / w)  # what a data-parallel engine applies: the mean
    return float(loss.detach()), grads


@pytest.mark.parametrize("keep_counts", [[3, 0, 4], [1, 6, 2], [0, 0, 5]])
def test_gradients_with_uneven_selection_equal_one_process(pools, keep_counts):
    out = pools(3).run(_rp_grads, keep_counts)
    xi, xt = _features(0, sum(keep_counts))
    m = _model()
    ref_loss = _loss(m, xi, xt, 1)
    ref_loss.backward()
    for loss, grads in out:
        assert abs(loss - float(ref_loss.detach())) < 1e-5  # same loss value on every rank
        for g, p in zip(grads, m.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_a_world_where_nobody_keeps_anything_still_backpropagates():
    m = _model()
    loss = _loss(m, torch.zeros(0, 8), torch.zeros(0, 5), 1)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in m.parameters())
