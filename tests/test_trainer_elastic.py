"""Resume at an epoch boundary with another world size (real ranks through DeepSpeed's
launcher, 2 -> 1 and 1 -> 2, fp32 without ZeRO and bf16 with ZeRO-1): the resumed run
ends after the same epochs and samples as the uninterrupted one, and its learning rate
follows the same curve as a function of samples seen (progress is counted in samples,
not in steps of the current world). Under ZeRO the optimizer state, partitioned over the
saving world, is loaded through DeepSpeed's universal checkpoint format."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_trainer import _args, _metrics, _run, fmnist  # noqa: F401 - fixture

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

N, B = 640, 16  # the fmnist fixture's training pairs; per-rank batch in _args
RUN = ["selection.strategy=dissect_momentum", "train.epochs=2", "optim.schedule=cosine",
       "optim.warmup_steps=4", "optim.lr=1e-3"]


def _train_rows(run: Path) -> list[dict]:
    return [m for m in _metrics(run) if m["kind"] == "train"]


PRECISION = {"fp32": [], "bf16-zero1": ["model.precision=bf16", "train.zero_stage=1"]}


@pytest.fixture(scope="module")
def whole(fmnist, tmp_path_factory) -> dict[tuple[int, str], Path]:  # noqa: F811
    """Uninterrupted 2-epoch runs, a checkpoint at each epoch end."""
    runs = {}
    for world, prec in [(2, "fp32"), (1, "fp32"), (2, "bf16-zero1")]:
        run = tmp_path_factory.mktemp(f"whole{world}{prec}")
        _run(_args(fmnist, run, *RUN, *PRECISION[prec],
                   f"train.checkpoint_every={N // (world * B)}"), nproc=world)
        runs[world, prec] = run
    return runs


@pytest.mark.parametrize("saved,resumed,prec", [(2, 1, "fp32"), (1, 2, "fp32"),
                                                (2, 1, "bf16-zero1")])
def test_resume_at_epoch_boundary_with_another_world_keeps_epochs_and_lr_curve(
        fmnist, whole, tmp_path, saved, resumed, prec):  # noqa: F811
    epoch_steps = N // (saved * B)
    tag = f"step-{epoch_steps:09d}"
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    shutil.copytree(whole[saved, prec] / "checkpoints" / tag, ckpt / tag)
    (ckpt / "latest").write_text(tag)
    out = _run(_args(fmnist, tmp_path, *RUN, *PRECISION[prec]) + ["--resume", "latest"],
               nproc=resumed)
    assert f"resumed from {tag}" in out
    if prec != "fp32":
        assert "universal" in out  # the ZeRO state went through the universal format

    ref = _train_rows(whole[saved, prec])
    rows = _train_rows(tmp_path)
    # The second epoch only, in the new world's steps: N / (resumed x B) of them.
    assert len(rows) == N // (resumed * B)
    assert rows[0]["samples_seen"] == N + resumed * B
    assert rows[-1]["samples_seen"] == ref[-1]["samples_seen"] == 2 * N
    assert rows[-1]["epoch"] == ref[-1]["epoch"] == 1
    # The learning rate after each step is the uninterrupted run's at the same number of
    # samples (compared where both runs have a step boundary).
    ref_lr = {r["samples_seen"]: r["lr"] for r in ref}
    common = [r for r in rows if r["samples_seen"] in ref_lr]
    assert len(common) == N // (max(saved, resumed) * B)
    for r in common:
        assert r["lr"] == pytest.approx(ref_lr[r["samples_seen"]], rel=1e-9, abs=1e-15), r
    # ... and in between it stays between its neighbours (the cosine decays monotonically).
    lrs = [r["lr"] for r in rows]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine ends where it should
