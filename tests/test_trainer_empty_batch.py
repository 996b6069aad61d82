"""Every strategy trains on 2 real ranks when one rank's batch is empty (every sample in
it undecodable, so the loader hands it zero rows): the rank still joins every collective
of the step (scoring, per-sample loss, store exchange, ranking, loss, gradient
all-reduce), and the run goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dissect_dist.data.order import OrderSpec, rank_batches
from tests.datagen import make_dataset
from tests.test_trainer import _args, _metrics, _run

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
SIZES, B, SEED = [32, 32, 32, 32], 16, 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Rank 1's first batch of epoch 0 is all undecodable images."""
    root = tmp_path_factory.mktemp("emptybatch")
    spec = OrderSpec(seed=SEED, world_size=2, batch_size=B)
    empty = rank_batches(np.array(SIZES), spec, epoch=0, rank=1)[0]
    make_dataset(root / "train", SIZES, bad={int(i): "undecodable_image" for i in empty})
    return root


@pytest.mark.parametrize("strategy", ["full", "random", "clipscore", "small_loss", "big_loss",
                                      "dissect_momentum", "dissect_warmup"])
def test_every_strategy_survives_a_rank_with_an_empty_batch(data, tmp_path, strategy):
    _run(_args(data, tmp_path, f"selection.strategy={strategy}", "train.max_steps=2",
               "data.noise_ledger=null", "selection.warmup_epochs=0", "train.seed=0"))
    train = [m for m in _metrics(tmp_path) if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    kept = [m["kept_fraction"] for m in train]
    # Step 1 ranks rank 0's 16 rows only; step 2 all 32.
    want = [1.0, 1.0] if strategy == "full" else [round(0.3 * 16) / 16, round(0.3 * 32) / 32]
    assert kept == pytest.approx(want)
    assert all(np.isfinite(m["loss"]) for m in train)


# The GPU configs' paths on CPU ranks: DeepSpeed bf16 with ZeRO-2, and amp_bf16 (fp32
# weights, autocast forward) with ZeRO-1 and the reference code's scoring (train mode,
# outside autocast); the empty rank's dummy row and (0, d) features in those dtypes.
@pytest.mark.parametrize("strategy,extra", [
    ("small_loss", ["model.precision=bf16", "train.zero_stage=2"]),
    ("dissect_momentum", ["model.precision=bf16", "train.zero_stage=2"]),
    ("small_loss", ["model.precision=amp_bf16", "train.zero_stage=1",
                    "selection.score_mode=reference"]),
    ("dissect_momentum", ["model.precision=amp_bf16", "train.zero_stage=1",
                          "selection.score_mode=reference"]),
])
def test_an_empty_rank_in_bf16_zero_and_amp_with_reference_scoring(data, tmp_path, strategy,
                                                                    extra):
    _run(_args(data, tmp_path, f"selection.strategy={strategy}", "train.max_steps=2",
               "data.noise_ledger=null", "train.seed=0", *extra))
    train = [m for m in _metrics(tmp_path) if m["kind"] == "train"]
    assert [m["kept_fraction"] for m in train] == pytest.approx(
        [round(0.3 * 16) / 16, round(0.3 * 32) / 32])
    assert all(np.isfinite(m["loss"]) for m in train)
