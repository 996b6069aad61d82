"""dissect_warmup through the trainer on 2 CPU ranks, across its warm-up boundary: a
random r% in the warm-up epoch, then the global top-k of the mean-centred δ, with the
score store frozen from the end of the warm-up on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dissect_dist.data.builders import build_fashion_mnist
from tests.test_trainer import _args, _assert_top_k, _final_state, _run, _steps

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

STEPS_PER_EPOCH = 8  # 256 pairs / (2 ranks x 16)


@pytest.fixture(scope="module")
def fmnist256(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist256")
    build_fashion_mnist(str(root), noise=0.4, seed=0, subset=256, shard_size=64)
    return root


def test_dissect_warmup_keeps_random_then_top_k_of_centred_delta_on_a_frozen_store(
        fmnist256, tmp_path):
    _run(_args(fmnist256, tmp_path, "selection.strategy=dissect_warmup",
               "selection.warmup_epochs=1", "selection.warmup_train=random", "train.epochs=2",
               f"train.checkpoint_every={STEPS_PER_EPOCH}", "train.keep_checkpoints=2",
               "train.record_samples=true"))
    steps = _steps(tmp_path)
    assert [s["epoch"] for s in steps] == [0] * STEPS_PER_EPOCH + [1] * STEPS_PER_EPOCH
    k = round(0.3 * 32)
    warm, after = steps[:STEPS_PER_EPOCH], steps[STEPS_PER_EPOCH:]
    for s in warm:  # the warm-up: a random r%, no key
        assert s["key"] is None and s["keep"].sum() == k
    # Every pair was scored once in the warm-up epoch (no drop-last remainder here).
    assert np.array_equal(np.sort(np.concatenate([s["ids"] for s in warm])), np.arange(256))
    for s in after:  # then: the global top-k of the key ...
        _assert_top_k(s, 0.3)
        key = s["key"]
        assert np.ptp(key) > 0  # ... a real choice, not a tie broken at random
        # ... and the key is centred: δ = (h - mean h) - (c - mean c) sums to 0 over the
        # ranked batch (an un-centred hist - curr does not).
        assert abs(key.mean()) <= 1e-4 * np.abs(key).max()

    # The store recorded every score in the warm-up and is frozen after it: the snapshot
    # at the end of epoch 0 equals the final one bit for bit.
    end_of_warmup, _ = _final_state(tmp_path, STEPS_PER_EPOCH)
    final, _ = _final_state(tmp_path, 2 * STEPS_PER_EPOCH)
    assert not np.isnan(end_of_warmup[:256]).any() and np.ptp(end_of_warmup[:256]) > 0
    assert np.array_equal(end_of_warmup.view(np.uint16), final.view(np.uint16))
