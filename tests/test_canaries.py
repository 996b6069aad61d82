"""Canaries (dissect_dist/canaries.py): which samples, by id alone; what their rows get."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dissect_dist.canaries import is_canary, swap_captions
from dissect_dist.data.builders import build_fashion_mnist
from dissect_dist.metrics import auroc


def test_canaries_are_a_seeded_share_decided_by_id_alone():
    ids = np.arange(2_000_000, dtype=np.int64)
    c = is_canary(ids, 0.005, seed=0)
    n = ids.size * 0.005
    assert abs(c.sum() - n) < 4 * np.sqrt(n), c.sum()  # binomial, 4 sigma
    # The same ids in any order or split (another world size, a resume): the same answer.
    perm = np.random.default_rng(1).permutation(ids.size)
    assert np.array_equal(is_canary(ids[perm], 0.005, seed=0), c[perm])
    assert np.array_equal(np.concatenate([is_canary(p, 0.005, 0) for p in
                                          np.array_split(ids, 7)]), c)
    other = is_canary(ids, 0.005, seed=1)
    assert (c & other).sum() < 3 * n * 0.005 + 50  # another seed: another set
    assert not is_canary(ids[:100], 0.0, seed=0).any()
    # Spread over the id range (not one block): every tenth of the ids holds its share.
    per_tenth = c.reshape(10, -1).sum(1)
    assert per_tenth.min() > 0.8 * n / 10


def test_a_canary_row_gets_another_rows_differing_caption():
    texts = torch.tensor([[1, 5], [2, 5], [2, 5], [3, 5], [4, 5]])
    canary = np.array([False, True, False, False, True])
    out, got = swap_captions(texts, canary)
    assert got.tolist() == canary.tolist()
    # row 1's next row (2) has the same caption: the next differing non-canary is row 3
    assert out[1].tolist() == [3, 5]
    assert out[4].tolist() == [1, 5]  # cyclic: row 0
    keep = ~canary
    assert torch.equal(out[torch.from_numpy(keep)], texts[torch.from_numpy(keep)])
    assert texts[1].tolist() == [2, 5]  # the input is not modified


def test_a_canary_without_a_partner_stays_a_normal_pair():
    one, got = swap_captions(torch.tensor([[7, 7]]), np.array([True]))
    assert not got.any() and one.tolist() == [[7, 7]]
    same = torch.tensor([[3, 1]] * 4)
    out, got = swap_captions(same, np.array([True, False, False, False]))
    assert not got.any() and torch.equal(out, same)


# ---------------------------------------------------------------- in a run, 2 ranks


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist-canaries")
    build_fashion_mnist(str(root), noise=0.4, seed=0, subset=320, shard_size=80)
    return root


@pytest.mark.multirank
@pytest.mark.slow
def test_a_run_logs_its_canaries_as_the_samples_it_trained_say(fmnist, tmp_path):
    """canary_share / canary_kept_share per step and at the epoch's end, and
    key_auroc_rest_vs_canary at the epoch's end, are what the sample record (ids, keep,
    key of every rank) gives when the canaries are recomputed from the ids alone."""
    from tests.test_trainer import _args, _metrics, _run, _steps

    _run(_args(fmnist, tmp_path, "selection.strategy=clipscore", "selection.canaries=0.2",
               "train.max_steps=10", "train.record_samples=true", "train.epochs=1"))
    rows = _metrics(tmp_path)
    train = [m for m in rows if m["kind"] == "train"]
    steps = _steps(tmp_path)
    assert len(train) == len(steps) == 10
    for m, s in zip(train, steps):
        c = is_canary(s["ids"], 0.2, seed=0)
        assert m["canary_share"] == pytest.approx(c.sum() / c.size)
        assert m["canary_kept_share"] == pytest.approx((c & s["keep"]).sum() / s["keep"].sum())
    keys = np.concatenate([s["key"] for s in steps])
    canary = np.concatenate([is_canary(s["ids"], 0.2, seed=0) for s in steps])
    assert 0.1 < canary.mean() < 0.3
    epoch = [m for m in rows if m["kind"] == "epoch"]
    assert len(epoch) == 1
    assert epoch[0]["key_auroc_rest_vs_canary"] == pytest.approx(auroc(keys, ~canary))
    kept = np.concatenate([s["keep"] for s in steps])
    assert epoch[0]["canary_share"] == pytest.approx(canary.mean())
    assert epoch[0]["canary_kept_share"] == pytest.approx((canary & kept).sum() / kept.sum())
