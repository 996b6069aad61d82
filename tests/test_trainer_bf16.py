"""The path users run on GPUs, on CPU ranks: bf16 with ZeRO-2 through DeepSpeed's
launcher (DeepSpeed's CPU accelerator runs bf16 with ZeRO 1/2). A run resumed from a
mid-run checkpoint sees the same samples, keeps the same rows, and ends with the same
store, module weights and fp32 optimizer state as the uninterrupted run, bit for bit;
the zero-shot evaluation runs on the bf16 model (it fed it fp32 images and crashed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_trainer import (  # noqa: F401 - fixtures
    _args,
    _assert_compute,
    _metrics,
    _run,
    _steps,
    fmnist,
    row_cost,
)

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
RUN = ["selection.strategy=dissect_momentum", "model.precision=bf16", "train.zero_stage=2",
       "train.max_steps=12", "train.checkpoint_every=6", "train.record_samples=true",
       "train.epochs=2"]


def _state(run: Path) -> dict[str, object]:
    from store import ScoreStore

    tag = run / "checkpoints" / "step-000000012"
    out: dict[str, object] = {"scores": ScoreStore.load(str(tag / "scores")).local_numpy()}
    out["module"] = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for r in (0, 1):
        sd = torch.load(tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                        weights_only=False)["optimizer_state_dict"]
        out[f"master{r}"] = sd["single_partition_of_fp32_groups"]
        out[f"adam{r}"] = sd["base_optimizer_state"]["state"]
    return out


def test_bf16_zero2_resume_equals_the_uninterrupted_run(fmnist, tmp_path, row_cost):  # noqa: F811
    whole = tmp_path / "whole"
    _run(_args(fmnist, whole, *RUN, f"data.zeroshot_dir={fmnist}"))
    evals = [m for m in _metrics(whole) if m["kind"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["zeroshot_acc"] <= 1.0
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-000000006",
                    resumed / "checkpoints" / "step-000000006")
    (resumed / "checkpoints" / "latest").write_text("step-000000006")
    for r in (0, 1):  # the record of the steps before the checkpoint
        lines = (whole / f"samples-rank{r}.jsonl").read_text().splitlines()[:6]
        (resumed / f"samples-rank{r}.jsonl").write_text("".join(x + "\n" for x in lines))
    out = _run(_args(fmnist, resumed, *RUN) + ["--resume", "latest"])
    assert "resumed from step-000000006" in out

    for r in (0, 1):
        a = (whole / f"samples-rank{r}.jsonl").read_text()
        b = (resumed / f"samples-rank{r}.jsonl").read_text()
        assert a == b and len(a.splitlines()) == 12
    sa, sb = _state(whole), _state(resumed)
    assert np.array_equal(sa["scores"].view(np.uint16), sb["scores"].view(np.uint16))
    # the compute ledger under bf16 ZeRO-2: every step's counts and FLOPs from its record,
    # and the resumed run's totals carried on from the checkpoint
    train_a = [m for m in _metrics(whole) if m["kind"] == "train"]
    _assert_compute(train_a, _steps(whole), "dissect_momentum", row_cost)
    train_b = [m for m in _metrics(resumed) if m["kind"] == "train"]
    assert train_b[-1]["flops_total"] == train_a[-1]["flops_total"]
    assert train_b[-1]["pairs_scored_total"] == train_a[-1]["pairs_scored_total"] == 12 * 32
    for k in sa["module"]:
        assert torch.equal(sa["module"][k], sb["module"][k]), k
    for r in (0, 1):
        for x, y in zip(sa[f"master{r}"], sb[f"master{r}"]):
            assert x.dtype == torch.float32 and torch.equal(x, y)
        for pid in sa[f"adam{r}"]:
            for name, v in sa[f"adam{r}"][pid].items():
                assert torch.equal(v, sb[f"adam{r}"][pid][name]), (r, pid, name)
