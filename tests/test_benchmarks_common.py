"""The benchmark toolkit: the step-time split of a run's metrics, the mean of a logged
series, the atomic results write, the regimes' run configs (defined once, in
launch/configs/, and not silently overridden by the benchmark), and the scripts running
as files, as the READMEs invoke them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks import nc_runner as nc
from dissect_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _train_row(step: int, **ms: float) -> dict:
    return {"kind": "train", "step": step, "samples_per_s": 10.0,
            **{f"time_{k}_ms": v for k, v in ms.items()}}


def test_step_time_split_averages_phases_after_the_warm_up_window():
    rows = [_train_row(5, score=100.0, train=900.0),  # warm-up window: dropped
            {"kind": "eval", "step": 5, "zeroshot_acc": 0.5},
            _train_row(10, score=2.0, train=10.0), _train_row(15, score=4.0, train=20.0)]
    assert common.step_time_split(rows) == {"score": 3.0, "train": 15.0}
    assert [r["step"] for r in common.steady_windows(rows)] == [10, 15]
    # a run with a single logged window keeps it rather than averaging nothing
    assert common.step_time_split(rows[:1]) == {"score": 100.0, "train": 900.0}


def test_mean_logged_skips_windows_that_measured_nothing():
    assert common.mean_logged([0.5, None, 0.7]) == pytest.approx(0.6)
    assert math.isnan(common.mean_logged([None, None]))
    assert math.isnan(common.mean_logged([]))


def test_write_json_is_atomic_and_strict_mode_refuses_nan(tmp_path: Path):
    path = tmp_path / "sub" / "res.json"
    common.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError):
        common.write_json(path, {"a": float("nan")}, strict=True)
    assert json.loads(path.read_text()) == {"a": 1}  # the previous file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["res.json"]


POOL_KEYS = {"data.batch_size", "train.epochs", "train.max_steps", "train.log_every",
             "train.eval_every", "selection.warmup_epochs", "train.record_samples"}


@pytest.mark.parametrize("name", sorted(nc.REGIMES))
def test_a_benchmark_run_is_its_regime_config_plus_only_what_the_run_varies(name, tmp_path):
    reg = nc.REGIMES[name]
    base = load_config(str(reg.config), []).to_dict()
    runs = [r for phase in nc.grid(reg) for r in phase]
    for run in runs:  # full, selection and variant rows (whose extra keys are their own)
        got = load_config(str(reg.config),
                          nc.overrides(reg, run, tmp_path / "d", tmp_path / "r")).to_dict()
        changed = {f"{s}.{k}" for s in base for k in base[s] if base[s][k] != got[s][k]}
        assert changed <= {"data.train_manifest", "data.noise_ledger", "data.zeroshot_dir",
                           "data.retrieval_manifest", "selection.strategy", "selection.ratio",
                           "train.seed", "train.run_dir", "train.diagnose_scores",
                           *(POOL_KEYS if reg.pool else ()), *dict(run.extra)}, run.key
        if reg.pool:
            pool_run_trains_the_full_runs_rows_for_as_many_steps(reg, run, got)
        elif run.strategy == "full":
            assert got["train"]["log_every"] == reg.steps_per_epoch
            assert got["train"]["eval_every"] == reg.eval_every_epochs * reg.steps_per_epoch
    # the regime as the results file records it is the config's trainer settings
    assert (reg.model, reg.batch_per_rank, reg.epochs, reg.lr, reg.workers) == (
        base["model"]["name"], base["data"]["batch_size"], base["train"]["epochs"],
        base["optim"]["lr"], base["data"]["workers"])


def pool_run_trains_the_full_runs_rows_for_as_many_steps(reg, run, got):
    data, train = got["data"], got["train"]
    spe = reg.train_pairs // (nc.RANKS * data["batch_size"])
    assert train["max_steps"] == reg.steps == reg.epochs * reg.steps_per_epoch, run.key
    assert spe * train["epochs"] >= reg.steps > spe * (train["epochs"] - 1), run.key
    trained = round(run.ratio * nc.RANKS * data["batch_size"])  # the selector's global k
    assert trained == nc.RANKS * reg.batch_per_rank, run.key
    if run.strategy == "full":
        assert data["batch_size"] == reg.batch_per_rank
    else:  # a pool larger than what it trains
        assert data["batch_size"] == round(reg.batch_per_rank / run.ratio) > reg.batch_per_rank
    assert train["log_every"] == spe and train["eval_every"] % spe == 0, run.key
    assert abs(train["eval_every"] - reg.eval_every_epochs * reg.steps_per_epoch) < spe
    if "selection.warmup_epochs" not in dict(run.extra):  # T_w: the config's share of the run
        assert got["selection"]["warmup_epochs"] == round(
            reg.warmup_epochs / reg.epochs * train["epochs"]), run.key
    assert train["record_samples"] is True


def test_memorise_is_the_demos_config():
    demo = (REPO / "dissect_dist" / "demo.py").read_text()
    assert nc.REGIMES["memorise"].config == REPO / "launch" / "configs" / "tiny-cpu.yaml"
    assert '"configs" / "tiny-cpu.yaml"' in demo


def test_a_regime_config_that_does_not_log_per_epoch_is_refused(tmp_path, monkeypatch):
    text = (nc.CONFIGS / nc.CONFIG_FILES["quick"]).read_text()
    assert "log_every: 8" in text
    (tmp_path / "q.yaml").write_text(text.replace("log_every: 8", "log_every: 5"))
    monkeypatch.setattr(nc, "CONFIGS", tmp_path)
    monkeypatch.setitem(nc.CONFIG_FILES, "quick", "q.yaml")
    with pytest.raises(ValueError, match=r"q.yaml: train.log_every is 5 .* = 8, "):
        nc.load_regime("quick", subset=512)


SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py")
                 if p.stem not in ("__init__", "common", "nc_runner", "nc_report"))


@pytest.mark.slow
@pytest.mark.parametrize("style", ["file", "module"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_runs_as_the_readmes_invoke_it(script, style, tmp_path):
    """`python benchmarks/<script>.py --help` from another directory with only the
    installed packages importable (dissect_dist and store, not benchmarks), and
    `python -m benchmarks.<script> --help` from the repository root."""
    for pkg in ("dissect_dist", "store"):
        (tmp_path / pkg).symlink_to(REPO / pkg)
    if style == "file":
        cmd, env = [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--help"], {
            **os.environ, "PYTHONPATH": str(tmp_path)}
        cwd = tmp_path
    else:
        cmd, env = [sys.executable, "-m", f"benchmarks.{script}", "--help"], {
            **os.environ, "PYTHONPATH": str(tmp_path)}
        cwd = REPO
    r = subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:"), r.stdout[:500]
