"""Start `launch/train.py` under DeepSpeed's launcher from Python, as a user would from
the shell: the demo and the benchmarks train through the same entry point."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (each launch needs its own master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Launched:
    returncode: int
    wall_s: float
    output: str


def run_training(overrides: list[str], *, ranks: int = 2, config: str | None = None,
                 log: Path | None = None, threads: int = 1) -> Launched:
    """`deepspeed --num_gpus RANKS launch/train.py [--config C] OVERRIDES` on this machine,
    `threads` intra-op threads per rank (OMP_NUM_THREADS); the launcher's output goes to
    `log` when given."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
           *(["--config", config] if config else []), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    out = Launched(r.returncode, time.perf_counter() - t0, r.stdout + r.stderr)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out.output)
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
