"""The benchmark toolkit: the step-time split of a run's metrics, the mean of a logged
series, the atomic results write, the regimes' run configs (defined once, in
launch/configs/, and not silently overridden by the benchmark), and the scripts running
as files, as the READMEs invoke them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common
from benchmarks import nc_runner as nc
from dissect_dist.config import load_config
from tests import procs

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
        ref = tmp_path / "scores" if run.strategy in nc.REFERENCE else None
        got = load_config(str(reg.config),
                          nc.overrides(reg, run, tmp_path / "d", tmp_path / "r", ref)).to_dict()
        changed = {f"{s}.{k}" for s in base for k in base[s] if base[s][k] != got[s][k]}
        assert changed <= {"data.train_manifest", "data.noise_ledger", "data.zeroshot_dir",
                           "data.retrieval_manifest", "selection.strategy", "selection.ratio",
                           "train.seed", "train.run_dir", "train.diagnose_scores",
                           *(("selection.reference",) if ref is not None else ()),
                           *(POOL_KEYS if reg.pool else ()), *dict(run.extra),
                           *(("train.max_flops", "train.epochs") if reg.equal_compute
                             else ())}, run.key
        if reg.equal_compute:
            equal_compute_run_spends_the_full_runs_flops(reg, run, got)
        if reg.pool:
            pool_run_trains_the_full_runs_rows_for_as_many_steps(reg, run, got)
        else:  # every run loads the config's batch and logs once per epoch
            assert got["train"]["log_every"] == reg.steps_per_epoch
            assert got["train"]["eval_every"] == reg.eval_every_epochs * reg.steps_per_epoch
        if run.strategy == "full":
            # the regime as the results file records it is the full run's trainer settings
            assert (reg.model, reg.batch_per_rank, reg.epochs, reg.lr, reg.workers) == (
                got["model"]["name"], got["data"]["batch_size"], got["train"]["epochs"],
                got["optim"]["lr"], got["data"]["workers"]), run.key


def equal_compute_run_spends_the_full_runs_flops(reg, run, got):
    """The budget is the config's full-data run: its steps x 2 ranks x B rows trained, each
    row's forward + backward, plus each rank's B x B logits (6 (2B)^2 d on each rank); the
    epoch cap does not bind before it; no diagnostic scoring pass is paid for."""
    row = nc.row_cost(reg.model)
    k = nc.RANKS * reg.batch_per_rank
    per_step = k * row.train + 6 * nc.RANKS * k * k * row.dim
    assert got["train"]["max_flops"] == pytest.approx(base_steps(reg) * per_step, rel=1e-12)
    if run.strategy == "full":  # the budget is spent exactly at the config's last step
        assert got["train"]["epochs"] == reg.epochs
    else:  # room for 1.2 x the steps that a step of the expected rows would pay for
        kept = (run.ratio if run.strategy != "oracle" else 1 - run.noise) * k
        scoring = k * row.score if run.strategy not in ("random", "oracle") else 0
        steps = got["train"]["max_flops"] / (scoring + kept * row.train)
        assert got["train"]["epochs"] * reg.steps_per_epoch > 1.2 * steps
    assert got["train"]["diagnose_scores"] is False


def base_steps(reg) -> int:
    """Steps of the regime config's own full-data run, from the config file."""
    cfg = load_config(str(reg.config), []).to_dict()
    return cfg["train"]["epochs"] * (reg.train_pairs // (nc.RANKS * cfg["data"]["batch_size"]))


def pool_run_trains_the_full_runs_rows_for_as_many_steps(reg, run, got):
    data, train = got["data"], got["train"]
    spe = reg.train_pairs // (nc.RANKS * data["batch_size"])
    assert train["max_steps"] == reg.steps == base_steps(reg), run.key
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
        cfg = load_config(str(reg.config), []).to_dict()
        share = cfg["selection"]["warmup_epochs"] / cfg["train"]["epochs"]
        assert abs(got["selection"]["warmup_epochs"] * spe / reg.steps - share) <= spe / reg.steps
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
                 if p.stem not in ("__init__", "common", "nc_runner", "nc_report",
                                   "nc_compute"))


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


def _rows(spe: int, steps: int, eval_every: int, scored: bool) -> list[dict]:
    """A run's metrics rows as the trainer writes them: a train row per epoch and at the
    last step, an epoch row per finished epoch, evaluations on their cadence and last."""
    rows: list[dict] = []
    for s in range(1, steps + 1):
        if s % spe == 0 or s == steps:
            rows.append({"step": s, "kind": "train", "trained_total": 64 * s,
                         "samples_seen": 64 * s, "kept_precision": 0.6})
        if s % eval_every == 0 or s == steps:
            rows.append({"step": s, "kind": "eval", "i2t_R@1": 0.01 * s / steps,
                         "t2i_R@1": 0.0, "eval_s": 0.1})
        if s % spe == 0:
            rows.append({"step": s, "kind": "epoch", "epoch": s // spe - 1,
                         "key_auroc_clean_vs_noisy": 0.5 if scored else None,
                         **({"mean_score_clean": 20.0, "mean_score_noisy": 15.0,
                             "shadow_delta_auroc_clean_vs_noisy": 0.5} if not scored else {})})
    return rows


def test_a_pool_run_stopped_mid_epoch_is_summarised_and_plotted_by_step(tmp_path):
    """icons-pool at r = 0.3: 67-step epochs of the pool and a step count that is not a
    multiple of it, so the last train row has no epoch row; the lists keep their own steps
    and the report draws."""
    from benchmarks import nc_report

    reg = nc.REGIMES["icons-pool"]
    res = {"runs": {}, "meta": {"regimes": {reg.name: dataclasses.asdict(reg)}}}
    for strategy, ratio in (("full", 1.0), ("dissect_momentum", 0.3)):
        run = nc.Run(reg.name, strategy, strategy, reg.noise, ratio, 0)
        p = nc.pool_settings(reg, strategy, ratio)
        rows = _rows(p.steps_per_epoch, reg.steps, p.eval_every, strategy != "full")
        s = nc.summarise(rows, reg, strategy, ratio)
        res["runs"][run.key] = {**dataclasses.asdict(run), "key": run.key, "wall_s": 1.0, **s}
    dm = res["runs"]["icons-pool/dissect_momentum/noise0.4/r0.3/seed0"]
    p = nc.pool_settings(reg, "dissect_momentum", 0.3)
    spe, steps, every = p.steps_per_epoch, reg.steps, p.eval_every
    whole = steps // spe  # finished pool epochs
    assert spe == 67 and steps % spe  # the case under test: a partial last epoch
    assert dm["train_steps"][-2:] == [whole * spe, steps] and len(dm["train_steps"]) == whole + 1
    assert dm["epoch_steps"][-1] == whole * spe and len(dm["delta_auroc"]) == whole
    assert [c["step"] for c in dm["curve"]] == [*range(every, steps + 1, every), steps]
    assert (dm["loaded_samples"], dm["scored_samples"]) == (64 * steps, 64 * steps)
    for rows in ("train", "epoch"):
        lists = ("kept_precision",) if rows == "train" else ("delta_auroc", "score_clean")
        for r in res["runs"].values():
            for name in lists:
                if r[name]:
                    assert len(nc_report.steps_of(res, r, rows)) == len(r[name])
    paths = nc_report.plots(res, reg.name, tmp_path / "nc")
    assert {p.name for p in paths} >= {"icons-pool_timing.png", "icons-pool_kept_precision.png"}


@pytest.mark.slow
@pytest.mark.multirank
def test_gpu_smoke_dry_runs_on_the_cpu(tmp_path):
    """The GPU script's launches on DeepSpeed's CPU accelerator (bf16, ZeRO-1): every run
    variant it will time on a GPU, the phase split (input, score, train), the profiler's
    traces, and the JPEGs decoded by the training process under +device."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--device", "cpu",
           "--model", "tiny-vit-28", "--steps", "6", "--log-every", "2", "--batch-size", "16",
           "--samples", "256", "--workers", "1", "--profile-at", "3", "--out", str(out),
           "--runs", "full", "dissect_momentum", "dissect_momentum+device"]
    rc, output = procs.run(cmd, 600)
    assert rc == 0, output[-3000:]
    res = json.loads((out / "gpu_smoke.json").read_text())
    assert res["dry_run"] is True
    assert [x["strategy"] for x in res["runs"]] == ["full", "dissect_momentum",
                                                   "dissect_momentum+device"]
    for x in res["runs"]:
        assert {"input", "score", "fwd_bwd", "optim"} <= set(x["step_time_ms"]), x
        assert x["samples_per_s"] > 0 and math.isfinite(x["final_loss"])
        assert any((out / f"run-{x['strategy']}" / "profile").glob("rank0*.json"))
    assert 0.25 < res["runs"][1]["kept_fraction"] < 0.4
    assert "data.decode=device" in (out / "log-dissect_momentum+device.txt").read_text()
    for x in res["runs"]:  # the profiled steps 3-5, cut by the step timer's phases
        phases = x["profile"]["phases"]
        assert set(phases) == {"input", "score", "wait", "select", "fwd_bwd", "optim"}
        assert all(p["ranges"] == 3 and p["wall_ms"] > 0 for p in phases.values())
        assert phases["fwd_bwd"]["device_busy_ms"] is None  # no device events on a CPU
        assert phases["fwd_bwd"]["top_cpu_ops_inclusive_ms"]


@pytest.mark.slow
@pytest.mark.multirank
def test_engine_layout_dry_runs_on_the_cpu(tmp_path):
    """The one-command GPU script of the engine's layout, on DeepSpeed's CPU accelerator:
    the four in-process variants with their misaligned counts and phase times, then the
    trainer's own full and DISSect steps, profiled."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "engine_layout.py"), "--device", "cpu",
           "--model", "tiny-vit-28", "--batch", "16", "--warmup", "1", "--iters", "2",
           "--steps", "6", "--profile-at", "3", "--samples", "256", "--workers", "1",
           "--out", str(out)]
    rc, output = procs.run(cmd, 600)
    assert rc == 0, output[-3000:]
    res = json.loads((out / "engine_layout.json").read_text())
    assert res["dry_run"] is True
    ip = res["in_process"]
    assert (ip["precision"], ip["zero"]) == ("bf16", 1)
    assert ip["misaligned"]["engine_before"]["module"] > 10  # the layout before, counted
    for v in ("engine_checked", "engine_aligned"):
        assert ip["misaligned"][v]["module"] == 0 and ip["misaligned"][v]["master"] == 0
    for v in ("fresh", "engine_before", "engine_checked", "engine_aligned"):
        assert all(ip["ms"][v][k] > 0 for k in ("score", "fwd_bwd", "optim", "step")), v
    assert [r["strategy"] for r in res["trainer"]] == ["full", "dissect_momentum"]
    for r in res["trainer"]:
        assert set(r["profile"]["phases"]) >= {"score", "fwd_bwd", "optim"}
    assert res["dissect_over_full_step"] > 0
    assert "| engine_aligned | 0 / 0 of" in output


def test_profile_summary_cuts_device_time_by_phase(tmp_path):
    """Device busy time is the union of kernel intervals clipped to each phase."""
    from benchmarks import profile_summary as ps

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 0}

    events = [x("user_annotation", "dissect_dist.phase.score", 0, 100),
              x("user_annotation", "dissect_dist.phase.fwd_bwd", 100, 200),
              x("user_annotation", "dissect_dist.phase.score", 1000, 100),
              x("kernel", "gemm", 10, 20), x("kernel", "gemm", 20, 30),  # overlap: 10..50
              x("kernel", "softmax", 90, 30),  # straddles the boundary at 100
              x("gpu_memcpy", "Memcpy HtoD", 1050, 10),
              x("cuda_runtime", "cudaStreamSynchronize", 60, 30),
              x("cuda_runtime", "cudaMalloc", 150, 5), x("cpu_op", "aten::mm", 0, 50)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = ps.summarize(path)
    score, fb = s["phases"]["score"], s["phases"]["fwd_bwd"]
    assert score["ranges"] == 2 and score["wall_ms"] == pytest.approx(0.2)
    assert score["device_busy_ms"] == pytest.approx(0.06)  # 10..50, 90..100, 1050..1060
    assert dict(score["top_kernels_ms"]) == pytest.approx(
        {"gemm": 0.05, "softmax": 0.01, "Memcpy HtoD": 0.01})
    assert fb["device_busy_ms"] == pytest.approx(0.02) and fb["device_busy_fraction"] == \
        pytest.approx(0.1)
    assert score["cuda_calls"] == {"cudaStreamSynchronize": {"count": 1, "ms": 0.03}}
    assert fb["cuda_calls"]["cudaMalloc"]["count"] == 1
    assert "| score | 2 | 0.2 | 0.1 | 0.30 | 0.0 | 0 |" in ps.table(s)
    (tmp_path / "none.json").write_text(json.dumps({"traceEvents": events[3:]}))
    with pytest.raises(ValueError, match="no dissect_dist.phase"):
        ps.summarize(tmp_path / "none.json")


def test_canary_validation_compares_canaries_with_the_ledger():
    """Kept ratios over the second half of the log windows, and the epoch AUROCs."""
    from benchmarks.canary_validation import compare

    rows = []
    for s in range(1, 9):
        rows.append({"kind": "train", "step": s, "canary_share": 0.05,
                     "canary_kept_share": 0.05 if s <= 4 else 0.025,
                     "kept_precision": 0.6 if s <= 4 else 0.8})
        if s % 2 == 0:
            rows.append({"kind": "epoch", "step": s, "key_auroc_rest_vs_canary": 0.5 + s / 100,
                         "key_auroc_clean_vs_noisy": 0.52 + s / 100})
    got = compare(rows, noisy_share=0.4)
    assert got["canary_kept_ratio"] == pytest.approx(0.5)  # second half: 0.025 / 0.05
    assert got["ledger_kept_ratio"] == pytest.approx(0.5)  # (1 - 0.8) / 0.4
    assert got["epochs_with_auroc"] == 4
    assert got["auroc_mean_abs_diff"] == pytest.approx(0.02)
    assert got["auroc_correlation"] == pytest.approx(1.0)


def test_the_ledgers_prediction_for_canaries_holds_on_simulated_keys():
    """Keys drawn per pair: clean N(1, 1), noisy N(0, 1); 40% noisy; canaries (5%, any pair)
    rank like noisy pairs except a share q = 0.1 that rank like clean ones. The formula's
    canary AUROC (rest vs canaries) and kept ratio (top 30% by key) from the ledger's own
    figures match what the simulated canaries give."""
    from benchmarks.canary_validation import predicted
    from dissect_dist.metrics import auroc

    rng = np.random.default_rng(0)
    n, q, size = 0.4, 0.1, 400_000
    noisy = rng.random(size) < n
    canary = rng.random(size) < 0.05
    mismatched = (noisy & ~canary) | (canary & (rng.random(size) >= q))
    key = rng.normal(size=size) + np.where(mismatched, 0.0, 1.0)
    kept = key >= np.quantile(key, 0.7)
    ledger = ~canary  # the ledger knows the non-canary pairs' truth
    auroc_ledger = auroc(key[ledger], ~noisy[ledger])
    kept_noisy = kept[ledger & noisy].mean() / kept.mean()
    want = predicted(auroc_ledger, kept_noisy, n, q)
    assert want["predicted_auroc_canary"] == pytest.approx(auroc(key, ~canary), abs=0.01)
    assert want["predicted_canary_kept_ratio"] == pytest.approx(
        kept[canary].mean() / kept.mean(), abs=0.02)
    # q = 0 and no noisy pairs among the rest: the canaries read what the ledger reads
    assert predicted(0.8, 0.3, 0.0, 0.0) == {"predicted_auroc_canary": pytest.approx(0.8),
                                             "predicted_canary_kept_ratio": pytest.approx(0.3)}


def test_the_matched_share_of_fashion_canaries_is_about_one_class_in_ten(tmp_path):
    """A canary's partner caption names one of 10 classes, so ~1 in 10 still names the
    image's class (a bit less: a caption equal to the canary's own is never taken)."""
    from benchmarks.canary_validation import fashion_matched_share
    from dissect_dist.data.builders import build_fashion_mnist

    build_fashion_mnist(str(tmp_path), noise=0.4, seed=0, subset=1000, shard_size=500)
    q = fashion_matched_share(tmp_path, 0.05, seed=0, batch=32)
    assert 0.07 < q < 0.13
    assert fashion_matched_share(tmp_path, 0.05, seed=0, batch=32) == q  # seeded


def test_the_equal_compute_report_states_what_each_strategy_needs_to_reach_the_others(
        tmp_path):
    """Synthetic runs with known curves: the table's budget shares and "never" follow from
    them, and the figure is drawn."""
    from benchmarks import nc_compute

    reg = nc.REGIMES["compute"]
    res: dict = {"runs": {}, "meta": {"regimes": {reg.name: dataclasses.asdict(reg)}}}
    budget = 100.0
    # (strategy, seed) -> metric at flops 25, 50, 75, 100
    curves = {("full", 0): [0.2, 0.4, 0.5, 0.6], ("full", 1): [0.2, 0.3, 0.4, 0.5],
              ("random", 0): [0.3, 0.6, 0.6, 0.7], ("random", 1): [0.3, 0.5, 0.55, 0.6],
              ("dissect_momentum", 0): [0.1, 0.2, 0.3, 0.35],
              ("dissect_momentum", 1): [0.1, 0.2, 0.3, 0.5]}
    for (strategy, seed), ys in curves.items():
        run = nc.Run(reg.name, strategy, strategy, reg.noise, 1.0, seed)
        curve = [{"epoch": i, "step": i, "trained": 10 * i, "flops": 25.0 * i,
                  "wall_s": 2.0 * i, "metric": y} for i, y in enumerate(ys, start=1)]
        res["runs"][run.key] = {
            **dataclasses.asdict(run), "key": run.key, "curve": curve, "final": ys[-1],
            "best": max(ys), "steps": 4, "trained_samples": 40, "scored_samples": 0,
            "flops": budget, "flops_score": 0.0, "train_wall_s": 8.0,
            "kept_precision": [0.6], "dropped_noisy_recall": [0.5]}
    text = nc_compute.table(res, reg.name)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| ") and "strategy" not in line}
    # random reaches full's final (0.6, 0.5) at half the budget with both seeds; full
    # reaches random's (0.7, 0.6) never; dissect reaches full's only with seed 1, at the end
    assert rows["random"].endswith("| 0.50 (2/2) | 1.00 (2/2) |")
    assert rows["full"].endswith("| 1.00 (2/2) | never (0/2) |")
    assert rows["dissect_momentum"].endswith("| 1.00 (1/2) | never (0/2) |")
    assert "budget 1.000e+02 FLOPs" in text
    path = nc_compute.plot(res, reg.name, tmp_path / "c.png")
    assert path is not None and path.stat().st_size > 10_000
