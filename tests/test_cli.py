"""python -m store inspect / export on committed snapshots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from store import Overwrite, ScoreStore

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "store", *args], env=ENV,
                          capture_output=True, text=True, timeout=120)


def _two_snapshots(root: Path) -> tuple[np.ndarray, np.ndarray]:
    s = ScoreStore(1000, chunk_target=64, shard_target=256)
    first = torch.arange(1000, dtype=torch.float32) % 50  # ids 0..799 scored below
    s.exchange(torch.arange(800), first[:800], Overwrite())
    s.save(str(root), 1)
    a = s.local_numpy().copy()
    s.exchange(torch.arange(800), first[:800] + torch.arange(800) % 7, Overwrite())
    s.save(str(root), 2)
    return a, s.local_numpy().copy()


def test_inspect_reports_size_world_step_and_fraction(tmp_path: Path) -> None:
    _two_snapshots(tmp_path)
    r = _cli("inspect", str(tmp_path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["n"], info["step"], info["saved_world_size"]) == (1000, 2, 1)
    assert info["fraction_scored"] == 0.8 and info["committed_steps"] == [1, 2]
    assert info["quantiles"]["max"] == 55.0
    assert (info["rounding_seed"], info["exchanges"]) == (0, 2)  # rounding resumes from here


def test_export_top_fraction_by_score_and_by_delta(tmp_path: Path) -> None:
    a, b = _two_snapshots(tmp_path / "s")
    out = tmp_path / "out"
    r = _cli("export", str(tmp_path / "s"), "--out", str(out), "--top-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    kept = np.load(out / "kept_ids.npy")
    assert kept.size == 200 and np.all(kept < 800)  # never-scored ids are never kept
    assert np.nanmin(b[kept].astype(np.float32)) >= np.quantile(b[:800].astype(np.float32), 0.74)
    assert np.array_equal(np.load(out / "scores.npy").view(np.uint16), b.view(np.uint16))

    r = _cli("export", str(tmp_path / "s"), "--out", str(out), "--by", "delta",
             "--baseline-step", "1", "--threshold", "0")
    assert r.returncode == 0, r.stderr
    delta = np.load(out / "delta.npy")
    kept = np.load(out / "kept_ids.npy")
    want = np.flatnonzero((a[:800].astype(np.float32) - b[:800].astype(np.float32)) >= 0)
    assert np.array_equal(kept, want) and np.isnan(delta[900])


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    r = _cli("inspect", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no committed score-store snapshot" in r.stderr
    assert "Traceback" not in r.stderr


def _top(*args: str, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(exe or [sys.executable, "-m", "dissect_dist"]), *args], env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_the_top_level_command_lists_its_subcommands_and_version() -> None:
    r = _top("--help")
    assert r.returncode == 0, r.stderr
    assert "data" in r.stdout and "store" in r.stdout and "deepspeed launch/train.py" in r.stdout
    r = _top("--version")
    assert r.returncode == 0 and r.stdout.strip() == "dissect-dist 0.1.0", (r.stdout, r.stderr)
    r = _top("store", "--help")  # the subcommand's own help, reached through the top level
    assert r.returncode == 0 and "inspect" in r.stdout and "export" in r.stdout


def test_every_command_exits_2_with_one_line_on_bad_input(tmp_path: Path) -> None:
    bad = [
        (),  # no command
        ("train",),  # not a command: training runs through deepspeed launch/train.py
        ("data",),  # no data command
        ("data", "manifest", "--out", str(tmp_path / "m.json")),  # no shard
        ("data", "manifest", str(tmp_path / "missing-{000..001}.tar"), "--out",
         str(tmp_path / "m.json")),
        ("data", "fashion-mnist", "--out", str(tmp_path / "f"), "--noise", "lots"),
        ("store", "inspect", str(tmp_path / "missing")),
        ("store", "export", str(tmp_path / "missing")),  # no --out
        ("report", str(tmp_path / "no-such-run")),
    ]
    for args in bad:
        r = _top(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (args, r.returncode, r.stderr[-2000:])
        assert "error:" in lines[0] and "Traceback" not in r.stderr, (args, lines)


def test_console_entry_points_are_installed() -> None:
    """setup.cfg's console_scripts, as `pip install -e .` (.ci/setup) put them beside the
    interpreter."""
    bindir = Path(sys.executable).parent
    for name, word in (("dissect-dist", "store"), ("dissect-data", "manifest"),
                       ("dissect-store", "inspect"), ("dissect-report", "RUN_DIR")):
        exe = bindir / name
        assert exe.exists(), f"{exe} missing: rerun .ci/setup (pip install -e .)"
        r = _top("--help", exe=[str(exe)])
        assert r.returncode == 0 and word in r.stdout, (name, r.stderr)


def _metrics(run: Path, steps: int, partial: bool) -> None:
    """metrics.jsonl as the trainer writes it (TrainLog, NoiseDiagnostics, Evaluator)."""
    run.mkdir(parents=True)
    rows = []
    for s in range(2, steps + 1, 2):
        rows.append({"step": s, "kind": "train", "trained_total": 30 * s, "samples_seen": 96 * s,
                     "epoch": s // 10, "loss": 3.0 - 0.05 * s, "kept_fraction": 0.3125,
                     "samples_per_s": 300.0, "trained_per_s": 94.0, "lr": 1e-3,
                     "logit_scale": 14.0, "kept_precision": 0.6 + 0.01 * s,
                     "flops_total": 4e9 * s, "flops_score_total": 1e9 * s,
                     "flops_reference_total": 0.0, "wall_s_total": 0.5 * s,
                     **{f"time_{p}_ms": 1.0 + i for i, p in enumerate(
                         ("input", "score", "wait", "select", "fwd_bwd", "optim"))}})
        if s % 10 == 0:
            rows.append({"step": s, "kind": "epoch", "epoch": s // 10,
                         "key_auroc_clean_vs_noisy": 0.55})
            rows.append({"step": s, "kind": "eval", "zeroshot_acc": 0.1 * s / 10,
                         "eval_s": 1.0})
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if partial:
        text += '{"step": 99, "kind": "tra'  # the line being written
    (run / "metrics.jsonl").write_text(text)


def test_report_draws_a_run_in_progress_and_finished(tmp_path: Path) -> None:
    for name, partial in (("live", True), ("done", False)):
        run = tmp_path / name
        _metrics(run, 20, partial)
        if not partial:
            (run / "open_clip_model.pt").write_bytes(b"")  # what the trainer exports last
        r = _top("report", str(run))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 6 and lines[-1] == f"wrote {run / 'report.png'}", lines
        assert ("finished" in lines[0]) == (not partial), lines[0]
        assert "loss 2.9000 -> 2.0000" in lines[1]
        assert "fwd_bwd 5.0" in lines[2] and "AUROC clean vs noisy 0.550" in lines[3]
        assert "spent 8.000e+10 FLOPs (scoring 25%, reference 0%) in 10 s" in lines[2]
        assert "zeroshot_acc: last 0.2000 (step 20)" in lines[4]
        png = (run / "report.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
