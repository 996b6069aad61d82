"""Start `launch/train.py` under DeepSpeed's launcher from Python, as a user would from
the shell: the demo and the benchmarks train through the same entry point. Every launch is
bounded: `Bounded` runs a command in a session of its own, and one that outlives its time
has each rank's stacks taken (launch/train.py prints them on SIGUSR1) and its whole process
tree killed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]


def release_cpu_comm_workspace() -> None:
    """DeepSpeed 0.19.8's CPU comm op maps a 66 MB /dev/shm segment per rank and never
    unlinks it: every launch leaked 132 MB (2 ranks) of RAM until /dev/shm filled memory.
    Unlink this rank's at exit (the other ranks' mappings stay valid). A run killed with
    SIGKILL still leaves its segments: rm /dev/shm/deepspeed_allreduce_buffer_*."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    rank = os.environ.get("LOCAL_RANK")
    if addr and port and rank is not None:
        name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


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


def _launcher() -> list[str]:
    """The `deepspeed` script next to this interpreter, or its module where the
    environment installed no script."""
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.exists() else [sys.executable, "-m",
                                                 "deepspeed.launcher.runner"]


class Bounded:
    """A command in a session of its own, its output (stdout and stderr) in a file.
    `wait(timeout_s)` returns the exit status, or None when it was still running then:
    each of its ranks' stacks are appended to the output and its whole process tree is
    killed. Used as a context manager, whatever is left of the tree is killed on exit."""

    def __init__(self, cmd: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | Path = REPO) -> None:
        self.cmd = cmd
        self._out: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.stacks = ""  # each rank's stacks, taken when it outlived its time

    def __enter__(self) -> Bounded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._out.close()

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stacks = self._take_stacks()
            self.kill()
            return None

    def output(self) -> str:
        self._out.flush()
        self._out.seek(0)
        return self._out.read().decode(errors="replace")

    def _tree(self) -> list[Any]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _take_stacks(self) -> str:
        """SIGUSR1 to each rank in turn (faulthandler in launch/train.py writes every
        thread's stack to the shared output); each rank's part of the output is cut out."""
        import psutil

        ranks = []
        for p in self._tree():
            try:
                env = p.environ()
            except (psutil.Error, OSError):
                continue
            if "RANK" in env and "train.py" in " ".join(p.cmdline()):
                ranks.append((int(env["RANK"]), p.pid))
        parts = []
        for rank, pid in sorted(ranks):
            before = len(self.output())
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            time.sleep(0.5)
            parts.append(f"--- rank {rank} (pid {pid}): stacks\n{self.output()[before:]}")
        return "\n".join(parts)

    def kill(self) -> None:
        """SIGKILL to every process of the tree (a snapshot first, so that processes
        orphaned by the first kills are killed too)."""
        import psutil

        for p in self._tree():
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def hung_report(self, timeout_s: float, tail_lines: int = 60) -> str:
        """The message for a command that outlived `timeout_s`."""
        tail = "\n".join(self.output().splitlines()[-tail_lines:])
        return (f"still running after {timeout_s:g} s, killed (every process of its tree): "
                f"{' '.join(self.cmd)}\n{self.stacks or '(no rank stacks)'}\n"
                f"--- last {tail_lines} lines of output\n{tail}")


# Longer than any launch of the demo or the benchmarks on a 2-core machine.
DEFAULT_LAUNCH_TIMEOUT_S = 3 * 3600.0


def run_training(overrides: list[str], *, ranks: int = 2, config: str | None = None,
                 log: Path | None = None, omp_threads: int | None = 1,
                 timeout_s: float = DEFAULT_LAUNCH_TIMEOUT_S, script: str = "train.py",
                 args: Iterable[str] = ()) -> Launched:
    """`deepspeed --num_gpus RANKS launch/SCRIPT [--config C] ARGS OVERRIDES` on this machine
    (SCRIPT: train.py, or score.py with ARGS --model M --out URL);
    the launcher's output goes to `log` when given. `omp_threads` intra-op threads per rank
    (1: the CPU ranks share the cores; None: keep the environment's, for GPU runs whose
    host threads should not be capped). A launch still running after `timeout_s` is
    killed with its ranks and returns status 124, its output ending in each rank's
    stacks."""
    cmd = [*_launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(REPO / "launch" / script), *(["--config", config] if config else []),
           *args, *overrides]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    t0 = time.perf_counter()
    with Bounded(cmd, env=env) as b:
        rc = b.wait(timeout_s)
        text = b.output() if rc is not None else b.hung_report(timeout_s)
    out = Launched(124 if rc is None else rc, time.perf_counter() - t0, text)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out.output)
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def mean_logged(xs: Iterable[float | None]) -> float:
    """Mean of a logged series over the windows where it was measured: None (not measured
    in that window, e.g. no key before a strategy has one) is skipped; NaN when nothing was
    measured at all."""
    import numpy as np

    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else float("nan")
