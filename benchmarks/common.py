"""What every benchmark script shares: launching the trainer, free ports, the per-step
time split of a run's metrics, a description of the machine, the code version, and an
atomic JSON write.

A script in benchmarks/ imports it as a package member or, run as a file
(`python benchmarks/x.py`, whose directory Python puts first on sys.path), as a sibling:

    if __package__:
        from benchmarks import common
    else:
        import common
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dissect_dist.launching import (
    REPO,
    Launched,
    free_port,
    mean_logged,
    read_metrics,
    run_training,
)

__all__ = ["REPO", "RESULTS", "Launched", "LaunchFailed", "code_version", "free_port",
           "launch", "machine_info", "machine_line", "mean_logged", "read_metrics",
           "steady_windows", "step_time_split", "write_json"]

RESULTS = REPO / "benchmarks" / "results"


class LaunchFailed(RuntimeError):
    """A training launch exited non-zero; the message holds the log's path and tail."""


def launch(overrides: list[str], *, what: str, log: Path, ranks: int = 2,
           config: str | Path | None = None, omp_threads: int | None = 1,
           script: str = "train.py", args: list[str] | None = None) -> Launched:
    """`run_training`, raising LaunchFailed (naming `what` and the log) if it fails."""
    r = run_training(overrides, ranks=ranks, config=None if config is None else str(config),
                     log=log, omp_threads=omp_threads, script=script, args=args or [])
    if r.returncode != 0:
        raise LaunchFailed(f"{what} failed (exit {r.returncode}); log: {log}\n"
                           f"{r.output[-3000:]}")
    return r


# ------------------------------------------------------------------ a run's metrics
def steady_windows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The train rows of metrics.jsonl after the first logged window, which holds the
    warm-up (allocator, kernels, compilation); all of them if there is only one."""
    train = [x for x in rows if x["kind"] == "train"]
    return train[1:] or train


def step_time_split(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean milliseconds per step of each phase the trainer times (`time_<phase>_ms`
    with train.time_breakdown=true) over the steady windows, keyed by phase."""
    steady = steady_windows(rows)
    keys = [k for k in steady[0] if k.startswith("time_") and k.endswith("_ms")]
    return {k[len("time_"):-len("_ms")]: sum(x[k] for x in steady) / len(steady)
            for k in keys}


# ------------------------------------------------------------------ provenance
def machine_info() -> dict[str, Any]:
    """Where and when a result was measured."""
    import torch

    return {"cpus": os.cpu_count(), "platform": sys.platform,
            "python": platform.python_version(), "torch": torch.__version__,
            "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else platform.processor() or "cpu"),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def machine_line() -> str:
    """The machine in one line, as the noisy-correspondence results record it."""
    return f"{os.cpu_count()} CPU cores, {sys.platform}, python {sys.version.split()[0]}"


def code_version() -> str:
    """The code a result was measured with: HEAD, plus '+dirty' if tracked files differ."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=str(REPO), capture_output=True,
                              text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ------------------------------------------------------------------ results files
def write_json(path: Path, obj: Any, *, indent: int = 2, strict: bool = False) -> None:
    """Write `obj` to `path` through a temporary file and a rename, so a crash never
    leaves a half-written results file. strict: refuse NaN and infinities (plain JSON,
    which every reader accepts) instead of writing them as JavaScript's NaN."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, allow_nan=not strict) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
