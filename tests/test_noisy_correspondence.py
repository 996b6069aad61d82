"""The selection-quality benchmark's smoke grid (`--quick`) runs end to end through the
real trainer, writes a results file whose numbers obey the method's bookkeeping, draws its
plots, and skips finished runs when invoked again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "noisy_correspondence.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _bench(tmp: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp / "nc.json"),
           "--data", str(tmp / "data"), "--runs", str(tmp / "runs")]
    r = subprocess.run(cmd, env=ENV, cwd=str(REPO), capture_output=True, text=True,
                       timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


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
    assert "| dissect_momentum | 1 |" in r.stdout
    for what in ("accuracy_vs_samples", "diagnostic", "delta_hist", "kept_precision"):
        png = tmp_path / "nc" / f"quick_{what}.png"
        assert png.stat().st_size > 5000, png
    # a second invocation keeps the finished runs and trains nothing
    before = (tmp_path / "nc.json").read_text()
    r2 = _bench(tmp_path)
    assert "3 finished runs kept" in r2.stdout and "0 to run" in r2.stdout
    assert (tmp_path / "nc.json").read_text() == before
