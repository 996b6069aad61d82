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
    assert r.returncode == 1 and "no committed score-store snapshot" in r.stderr
    assert "Traceback" not in r.stderr
