"""The DISSect keys in one process (a `ScoreStore` on `SingleProcess`, owned by a
world-1 `Selector`): the sign of δ, the history it is computed from, first sight, the momentum
update, and dissect_warmup's random warm-up, frozen store and mean-centred key.

Each test says which wrong implementation it catches: a random selector, a flipped
sign (curr - hist), history read after this step's update, and so on. A test that a
random selector would also pass is not a test of DISSect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dissect_dist.selection import ScoredBatch, Selection, Selector, build_strategy
from store import ScoreStore, SingleProcess

N = 64  # store size; the tests use ids [0, N)


def _selector(strategy: str, ratio: float, *, seed: int = 0, beta: float = 0.9,
              first_sight: str = "curr", warmup_epochs: int = 1,
              warmup_train: str = "random") -> tuple[ScoreStore, Selector]:
    store = ScoreStore(N, SingleProcess())
    strat = build_strategy(strategy, beta=beta, first_sight=first_sight,
                           warmup_epochs=warmup_epochs, warmup_train=warmup_train)
    return store, Selector(strat, ratio, "global", rank=0, world_size=1, seed=seed, store=store)


def _select(sel: Selector, ids: list[int] | np.ndarray, curr: list[float] | np.ndarray,
            epoch: int = 0) -> Selection:
    return sel.select(ScoredBatch(torch.as_tensor(np.asarray(ids), dtype=torch.int64),
                                  torch.as_tensor(np.asarray(curr), dtype=torch.float32),
                                  None, epoch))


def _stored(store: ScoreStore, ids: list[int] | np.ndarray) -> np.ndarray:
    return store.local_numpy()[np.asarray(ids)].astype(np.float64)


def _ulp(x: np.ndarray | float) -> np.ndarray:
    """One fp16 ulp at x (plus fp32 arithmetic's slack): the store writes fp16, possibly
    with stochastic rounding, so a written value is within one ulp of the exact one."""
    return np.spacing(np.abs(np.float16(x))).astype(np.float64) + 1e-4


def _assert_written(got: np.ndarray, exact: np.ndarray) -> None:
    """got (read back from the store) is exact, written in fp16, to within one ulp."""
    assert np.all(np.abs(got - exact) <= _ulp(exact)), (got, exact)


# ---------------------------------------------------------------------- dissect_momentum
def test_momentum_keeps_the_pairs_whose_score_fell_most():
    # Catches: a sign flip (δ = curr - hist keeps the pairs whose score rose), a random
    # selector (5 given rows out of 20: chance 1/15504), clipscore (keeps the highest curr).
    ids = np.arange(20)
    _, sel = _selector("dissect_momentum", 0.25)
    _select(sel, ids, np.full(20, 50.0))  # first sight: hist := 50 for every pair
    change = np.array([9, -3, 14, 0, -12, 7, -1, 3, -7, 11, -15, 5, -9, 2, 13, -5, 6, -11, 1, 8],
                      dtype=np.float64)  # score change of each pair since the first step
    out = _select(sel, ids, 50.0 + change)
    assert out.key is not None
    np.testing.assert_array_equal(out.key.numpy(), -change)  # δ = hist - curr, exact in fp16
    fell_most = set(np.argsort(change)[:5].tolist())  # -15, -12, -11, -9, -7
    assert set(np.flatnonzero(out.keep.numpy()).tolist()) == fell_most
    rose, fell = int(np.argmax(change)), int(np.argmin(change))
    assert out.key[rose] < 0 < out.key[fell]


def test_momentum_ranks_by_the_history_before_this_steps_update():
    # Catches: δ computed from the store after this step's update (β·h + (1-β)·c): that
    # gives key = β·(h - c); and a store that is not updated at all (third step would
    # see the first step's scores).
    beta = 0.9
    ids = np.arange(6)
    c1 = np.array([40.0, 20.0, 60.0, 10.0, 30.0, 50.0])
    c2 = np.array([10.0, 50.0, 20.0, 40.0, 30.0, 60.0])
    c3 = np.array([30.0, 30.0, 30.0, 30.0, 30.0, 30.0])
    store, sel = _selector("dissect_momentum", 0.5, beta=beta)
    _select(sel, ids, c1)
    out2 = _select(sel, ids, c2)
    assert out2.key is not None
    np.testing.assert_array_equal(out2.key.numpy(), c1 - c2)  # the first step's curr
    h = _stored(store, ids)  # after the second step: the blend
    _assert_written(h, beta * c1 + (1 - beta) * c2)
    out3 = _select(sel, ids, c3)
    assert out3.key is not None
    np.testing.assert_allclose(out3.key.numpy(), h - c3, rtol=0, atol=1e-5)


def test_first_sight_curr_gives_delta_zero():
    # Catches: first_sight=curr treated as a zero history (δ = -curr, which keeps the
    # lowest-scoring pairs).
    curr = np.array([5.0, 80.0, 20.0, 65.0, 0.0, 35.0, 90.0, 10.0])
    store, sel = _selector("dissect_momentum", 0.5, first_sight="curr")
    out = _select(sel, np.arange(8), curr)
    assert out.key is not None
    np.testing.assert_array_equal(out.key.numpy(), np.zeros(8))
    np.testing.assert_array_equal(_stored(store, np.arange(8)), curr)  # h := curr


def test_first_sight_zero_gives_delta_minus_curr_and_keeps_the_lowest_scores():
    # Catches: first_sight=zero ignored (δ = 0: a random keep), a sign flip (keeps the
    # highest scores), the second step reading something other than what the rule stored.
    beta = 0.9
    ids = np.arange(8)
    c1 = np.array([5.0, 80.0, 20.0, 65.0, 0.0, 35.0, 90.0, 10.0])
    _, sel = _selector("dissect_momentum", 0.5, beta=beta, first_sight="zero")
    out = _select(sel, ids, c1)
    assert out.key is not None
    np.testing.assert_array_equal(out.key.numpy(), -c1)
    assert set(np.flatnonzero(out.keep.numpy()).tolist()) == {0, 2, 4, 7}  # scores 5, 20, 0, 10
    # The reference code ranks epoch 0 against its zero buffer but then stores h := curr
    # (`hist = curr if epoch == 0`): the second step ranks against c1, not 0.1·c1.
    recorded = c1
    c2 = np.full(8, 30.0)
    out2 = _select(sel, ids, c2)
    assert out2.key is not None
    np.testing.assert_allclose(out2.key.numpy(), recorded - c2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_momentum_update_weights_later_scores_by_one_minus_beta(beta):
    # Catches: β and 1-β swapped (h <- (1-β)·h + β·c), a store that overwrites (h := c)
    # or keeps the first score, and an update applied to the kept rows only.
    ids = np.arange(10)
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.0, 100.0, size=(5, 10)).round(2)
    store, sel = _selector("dissect_momentum", 0.3, beta=beta)
    _select(sel, ids, scores[0])
    h = _stored(store, ids)
    _assert_written(h, scores[0])
    kept_ever = np.zeros(10, dtype=bool)
    for c in scores[1:]:
        out = _select(sel, ids, c)
        kept_ever |= out.keep.numpy()
        assert out.key is not None  # δ against the value stored last step
        np.testing.assert_allclose(out.key.numpy(), h - c, rtol=0, atol=1e-4)
        want = beta * h + (1 - beta) * c  # from the stored (fp16) value: one rounding
        h = _stored(store, ids)
        _assert_written(h, want)
    assert not kept_ever.all()  # some rows were never kept, and were updated all the same


# ---------------------------------------------------------------------- dissect_warmup
def test_warmup_keeps_a_random_fraction_whatever_the_scores():
    # Catches: ranking by any function of the scores during the warm-up (δ, curr, the
    # centred δ): two selectors with the same seed that see opposite score patterns in
    # the second warm-up step keep the same rows. And a keep that is the first k ids.
    ids = np.arange(40)
    rising, falling = np.linspace(0.0, 90.0, 40), np.linspace(90.0, 0.0, 40)
    keeps = []
    for c2 in (rising, falling):
        store, sel = _selector("dissect_warmup", 0.25, seed=3, warmup_epochs=1)
        first = _select(sel, ids, np.full(40, 45.0))
        second = _select(sel, ids, c2)
        for out in (first, second):
            assert out.key is None
            assert int(out.keep.sum()) == round(0.25 * 40)
        _assert_written(_stored(store, ids), c2)  # hist := curr
        keeps.append((first.keep.numpy(), second.keep.numpy()))
    np.testing.assert_array_equal(keeps[0][1], keeps[1][1])
    assert not np.array_equal(keeps[0][0], keeps[0][1])  # a fresh draw each step
    assert not keeps[0][1][:10].all()


def test_warmup_train_full_keeps_everything_and_records_scores():
    # Catches: warmup_train=full ignored (a random r% kept), and a warm-up that does not
    # record (or blends instead of overwriting) the scores.
    ids = np.arange(12)
    store, sel = _selector("dissect_warmup", 0.25, warmup_epochs=2, warmup_train="full")
    c1 = np.linspace(10.0, 70.0, 12)
    c2 = np.linspace(80.0, 5.0, 12)
    for epoch, c in ((0, c1), (1, c2)):
        out = _select(sel, ids, c, epoch=epoch)
        assert out.keep.all() and out.key is None
        _assert_written(_stored(store, ids), c)  # h := curr, the latest


def _warmed(c0: np.ndarray, ratio: float = 0.25) -> tuple[ScoreStore, Selector]:
    store, sel = _selector("dissect_warmup", ratio, warmup_epochs=1)
    _select(sel, np.arange(c0.size), c0, epoch=0)
    return store, sel


H = np.array([62.0, 18.0, 47.0, 90.0, 33.0, 71.0, 25.0, 54.0])  # recorded in the warm-up
C = np.array([60.0, 30.0, 20.0, 95.0, 41.0, 50.0, 33.0, 70.0])  # after the warm-up


def test_after_warmup_the_store_is_frozen():
    # Catches: the store still updated after the warm-up (overwrite or momentum).
    store, sel = _warmed(H)
    before = store.local_numpy().copy()
    for c in (C, C + 20.0, np.zeros(8)):
        out = _select(sel, np.arange(8), c, epoch=1)
        assert out.key is not None  # always against the warm-up's scores
        np.testing.assert_allclose(out.key.numpy(), (H - H.mean()) - (c - c.mean()),
                                   rtol=0, atol=1e-4)
    np.testing.assert_array_equal(store.local_numpy().view(np.uint16), before.view(np.uint16))


def test_after_warmup_the_key_is_the_mean_centred_delta():
    # Catches: the un-centred δ = hist - curr, a sign flip (keeps the pairs that rose
    # most relative to the batch), a random selector (2 given rows of 8: chance 1/28),
    # clipscore (keeps the highest curr: rows 3 and 7).
    _, sel = _warmed(H)
    out = _select(sel, np.arange(8), C, epoch=1)
    # by hand: mean H = 50, mean C = 49.875
    want = (H - 50.0) - (C - 49.875)  # [1.875, -12.125, 26.875, -5.125, -8.125, 20.875, ...]
    assert out.key is not None
    np.testing.assert_allclose(out.key.numpy(), want, rtol=0, atol=1e-5)
    assert set(np.flatnonzero(out.keep.numpy()).tolist()) == {2, 5}  # keys 27.125, 21.125


def test_adding_a_constant_to_every_score_changes_neither_key_nor_selection():
    # Catches: a key that is not centred on the batch's mean curr (δ = hist - curr, or
    # hist - mean hist - curr): its keys shift with the constant.
    keys, keeps = [], []
    for shift in (0.0, 17.0):
        _, sel = _warmed(H)
        out = _select(sel, np.arange(8), C + shift, epoch=1)
        assert out.key is not None
        keys.append(out.key.numpy())
        keeps.append(out.keep.numpy())
    np.testing.assert_allclose(keys[0], keys[1], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(keeps[0], keeps[1])
