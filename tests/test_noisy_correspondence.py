"""The selection-quality benchmark's smoke grid (`--quick`) runs end to end through the
real trainer, writes a results file whose numbers obey the method's bookkeeping, draws its
plots, and skips finished runs when invoked again."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest

from benchmarks import nc_report
from benchmarks import nc_runner as nc
from tests import procs

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "noisy_correspondence.py"

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _bench(tmp: Path, *args: str) -> str:
    cmd = [sys.executable, str(SCRIPT), *(args or ["--quick"]), "--out", str(tmp / "nc.json"),
           "--data", str(tmp / "data"), "--runs", str(tmp / "runs")]
    rc, out = procs.run(cmd, 540, env=ENV)
    assert rc == 0, out[-6000:]
    return out


@pytest.mark.timeout(900)
def test_quick_grid_runs_reports_and_resumes(tmp_path: Path):
    r = _bench(tmp_path)
    res = json.loads((tmp_path / "nc.json").read_text())
    runs = {v["label"]: v for v in res["runs"].values()}
    assert set(runs) == {"full", "random", "dissect_momentum"}
    full, rnd, dm = runs["full"], runs["random"], runs["dissect_momentum"]
    # same number of steps for every strategy; selection trains on r of the full run's samples
    assert full["steps"] == rnd["steps"] == dm["steps"] == 16
    assert full["trained_samples"] == 16 * 64
    assert rnd["trained_samples"] == dm["trained_samples"] == 16 * round(0.3 * 64)
    for v in runs.values():
        assert 0.0 < v["final"] <= v["best"] <= 1.0
        assert len(v["curve"]) == 2 and v["curve"][-1]["trained"] == v["trained_samples"]
        assert v["wall_s"] > 0
    # full keeps everything, so its kept precision is the data's clean fraction (0.6)
    assert all(abs(p - 0.6) < 0.05 for p in full["kept_precision"])
    # δ exists only for dissect: an AUROC and a histogram per epoch of both classes
    assert len(dm["delta_auroc"]) == 2 and all(0.0 <= a <= 1.0 for a in dm["delta_auroc"])
    assert rnd["delta_auroc"] == [None, None]
    h = dm["key_hist"]["1"]
    assert sum(h["clean"]) + sum(h["noisy"]) == 8 * 64 and sum(h["noisy"]) > 0
    # the diagnostic: the full run scores every batch, clean and noisy separately
    assert len(full["score_clean"]) == 2 and all(math.isfinite(x) for x in full["score_noisy"])
    # ... and the δ that dissect_momentum's rule would give on the full-data model
    assert all(0.0 <= a <= 1.0 for a in full["shadow_delta_auroc"])
    assert dm["shadow_delta_auroc"] == [None, None]  # dissect has its own δ
    # one evaluation per evaluated step (the final one reuses the last step's), each timed
    for key in res["runs"]:
        metrics = tmp_path / "runs" / key.replace("/", "__") / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        evals = [x for x in rows if x["kind"] == "eval"]
        assert [x["step"] for x in evals] == [8, 16], key
        assert all(x["eval_s"] > 0 for x in evals), key
    assert "| dissect_momentum | 1 |" in r
    for what in ("accuracy_vs_samples", "diagnostic", "delta_hist", "kept_precision"):
        png = tmp_path / "nc" / f"quick_{what}.png"
        assert png.stat().st_size > 5000, png
    # a second invocation keeps the finished runs and trains nothing
    before = (tmp_path / "nc.json").read_text()
    r2 = _bench(tmp_path)
    assert "3 finished runs kept" in r2 and "0 to run" in r2
    assert (tmp_path / "nc.json").read_text() == before


@pytest.mark.timeout(60)
def test_icon_runs_are_scored_by_held_out_retrieval(tmp_path: Path):
    """The icons regime evaluates retrieval on the held-out icons (no zero-shot classes)
    and summarises each evaluation as the mean of image->text and text->image R@1."""
    reg = nc.REGIMES["icons"]
    run = nc.grid(reg)[0][0]
    ov = dict(x.split("=", 1) for x in nc.overrides(reg, run, tmp_path / "d", tmp_path / "r"))
    assert ov["data.retrieval_manifest"] == f"{tmp_path / 'd'}/heldout/manifest.json"
    assert "data.zeroshot_dir" not in ov
    spe = reg.steps_per_epoch
    assert spe == (reg.subset - round(nc.HELDOUT * reg.subset)) // (2 * reg.batch_per_rank)
    rows = [{"step": spe, "kind": "train", "trained_total": 64 * spe, "kept_precision": 0.6,
             "samples_seen": 64 * spe},
            {"step": spe, "kind": "eval", "i2t_R@1": 0.1, "t2i_R@1": 0.3, "eval_s": 0.5},
            {"step": spe, "kind": "epoch", "epoch": 0, "mean_score_clean": 20.0,
             "mean_score_noisy": 15.0},
            {"step": 2 * spe, "kind": "train", "trained_total": 128 * spe,
             "kept_precision": 0.6, "samples_seen": 128 * spe},
            {"step": 2 * spe, "kind": "eval", "i2t_R@1": 0.2, "t2i_R@1": 0.0, "eval_s": 0.5},
            {"step": 2 * spe, "kind": "epoch", "epoch": 1, "mean_score_clean": 25.0,
             "mean_score_noisy": 21.0}]
    s = nc.summarise(rows, reg, run.strategy, run.ratio)
    assert s["metric"] == "retrieval_R@1"
    assert s["final"] == pytest.approx(0.1) and s["best"] == pytest.approx(0.2)
    assert s["best_epoch"] == 1.0 and [c["trained"] for c in s["curve"]] == [64 * spe,
                                                                              128 * spe]
    stored = {**dataclasses.asdict(run), "key": run.key, "wall_s": 1.0, **s}
    table = nc_report.tables({"runs": {run.key: stored}}, "icons")
    assert "| strategy | seeds | final R@1 | late R@1 (mean of the last quarter's " \
           "evaluations) | best R@1 |" in table
    # late: the evaluations after 3/4 of the run, here the second (epoch 2) alone
    assert f"| {run.label} | 1 | 0.100 | 0.100 | 0.200 |" in table
    assert "| R@1 | 0.200 | 0.100 |" in table  # the diagnostic's metric row, epochs 1 and 2


@pytest.mark.timeout(600)
def test_pool_regime_trains_as_many_rows_per_step_whatever_the_strategy(tmp_path: Path):
    """The pool regime's smoke grid: `full` loads and trains 64 pairs per step; a selection
    run loads a pool of 2 x round(32 / 0.3) = 214, scores it and trains 64 of it, for the
    same 16 steps. The table reports the pairs loaded and scored, the steps per epoch and
    T_w follow the pool, and every step's scores are recorded for the selection audit."""
    r = _bench(tmp_path, "--regime", "pool-quick")
    res = json.loads((tmp_path / "nc.json").read_text())
    runs = {v["label"]: v for v in res["runs"].values()}
    assert set(runs) == {"full", "dissect_warmup", "dissect_warmup[T_w=25%]"}
    full, dw, tw = runs["full"], runs["dissect_warmup"], runs["dissect_warmup[T_w=25%]"]
    for v in runs.values():
        assert v["steps"] == 16 and v["trained_samples"] == 16 * 64, v["key"]
        assert [c["step"] for c in v["curve"]] == [8, 16], v["key"]
    assert (full["loaded_samples"], full["scored_samples"], full["steps_per_epoch"]) == (
        16 * 64, 0, 8)
    for v in (dw, tw):
        assert v["loaded_samples"] == v["scored_samples"] == 16 * 214
        assert v["steps_per_epoch"] == 2 and len(v["delta_auroc"]) == 8
    # T_w in epochs of the pool: the config's half of the run, and the swept quarter. A
    # warm-up epoch keeps a random r (no key, no δ AUROC); after it, δ ranks.
    assert [x is None for x in dw["delta_auroc"]] == [True] * 4 + [False] * 4
    assert [x is None for x in tw["delta_auroc"]] == [True] * 2 + [False] * 6
    assert "| dissect_warmup | 1 |" in r and "| 1024 | 3424 / 3424 |" in r
    run_dir = tmp_path / "runs" / dw["key"].replace("/", "__")
    ranks = [[json.loads(x) for x in (run_dir / f"samples-rank{k}.jsonl").read_text().splitlines()]
             for k in (0, 1)]
    assert [len(x) for x in ranks] == [16, 16]
    for a, b in zip(*ranks):
        assert len(a["ids"]) == len(b["ids"]) == 107 == len(a["curr"]) == len(b["curr"])
        assert sum(a["keep"]) + sum(b["keep"]) == 64  # the global top r of the pool
        assert (a["key"] is None) == (a["epoch"] < 4)
