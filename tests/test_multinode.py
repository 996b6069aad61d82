"""Two hosts with their own network stacks and addresses (network namespaces joined by a
veth pair, tests/netns.py), one DeepSpeed launcher per host (`--no_ssh --node_rank i
--master_addr <host 1>`), 2 ranks per host, gloo over the veth (GLOO_SOCKET_IFNAME). The
run directory is shared, as on a cluster's network filesystem.

- a run checkpoints and resumes on both hosts bit-exactly;
- host 2 loses power mid-run (every process in its namespace SIGKILLed): host 1 exits within
  train.collective_timeout_s with one line naming ranks 2 and 3 and the last committed
  checkpoint, and a resume on both hosts ends where the uninterrupted run ends;
- host 2's cable is pulled for a few seconds during a step, and during a checkpoint: the run
  either recovers or ends within the timeout, and a torn checkpoint is never loaded;
- a 4-rank run resumes on one host with 2 ranks at an epoch boundary, and the reverse.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from dissect_dist import checkpoint
from store import ScoreStore
from store.persist import step_name
from tests import netns, procs
from tests.test_no_hang import _left_running, _tree
from tests.test_trainer import fmnist  # noqa: F401 - fixture

pytestmark = [pytest.mark.multinode, pytest.mark.multirank, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
DS = str(Path(sys.executable).parent / "deepspeed")
TIMEOUT_S = 20  # train.collective_timeout_s in these runs
STEPS = 40  # 4 epochs of 640 pairs at a global batch of 4 x 16
_ports = itertools.count(29600)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[netns.Host]]:
    why = netns.unavailable()
    if why:
        pytest.skip(f"two test hosts need network namespaces: {why}")
    with netns.Hosts() as h:
        yield h


@pytest.fixture(scope="module")
def data(fmnist: Path) -> Path:  # noqa: F811 - the trainer tests' 640 Fashion-MNIST pairs
    return fmnist


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return [str(REPO / "launch" / "train.py"),
            "--config", str(REPO / "launch" / "configs" / "tiny-cpu.yaml"),
            f"data.train_manifest={data}/train/manifest.json",
            f"data.noise_ledger={data}/train/noise_ledger.npy", "data.zeroshot_dir=null",
            "data.batch_size=16", "data.workers=0", f"train.run_dir={run}",
            "train.log_every=1", "optim.warmup_steps=2", "train.epochs=4",
            "train.checkpoint_every=10", "train.keep_checkpoints=10",
            f"train.collective_timeout_s={TIMEOUT_S}", "selection.strategy=dissect_momentum",
            "optim.schedule=cosine", *extra]


def _env(host: netns.Host) -> dict[str, str]:
    # gloo picks its interface by GLOO_SOCKET_IFNAME; NCCL's bootstrap and sockets read
    # NCCL_SOCKET_IFNAME (set too, as a cluster would).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "GLOO_SOCKET_IFNAME": host.dev, "NCCL_SOCKET_IFNAME": host.dev}


class Cluster:
    """One launcher per host, all started at once (bounded: tests/procs.py)."""

    def __init__(self, hosts: Sequence[netns.Host], args: list[str], logs: Path,
                 slots: int = 2, env: dict[str, str] | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        hostfile = logs / "hostfile"
        hostfile.write_text("".join(f"{h.addr} slots={slots}\n" for h in hosts))
        port = str(next(_ports))
        self.logs = [logs / f"host{i + 1}.log" for i in range(len(hosts))]
        self.launchers = []
        for i, h in enumerate(hosts):
            cmd = h.cmd([DS, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
                         "--master_addr", hosts[0].addr, "--master_port", port, *args])
            self.launchers.append(procs.start(cmd, env={**_env(h), **(env or {})}))
        self.procs = [b.proc for b in self.launchers]  # each host's launcher process

    def wait(self, timeout: float = 300) -> list[int]:
        """Each launcher's exit status; its output is then in logs/host{i}.log."""
        rcs = [procs.finish(b, timeout)[0] for b in self.launchers]
        for log, b in zip(self.logs, self.launchers):
            log.write_text(b.output())
        return rcs

    def out(self, i: int) -> str:
        return self.launchers[i].output()


def _run(hosts: Sequence[netns.Host], args: list[str], logs: Path) -> None:
    c = Cluster(hosts, args, logs)
    rcs = c.wait()
    assert rcs == [0] * len(hosts), "\n".join(c.out(i)[-3000:] for i in range(len(hosts)))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _wait_for_step(run: Path, step: int, c: Cluster, timeout: float = 200) -> None:
    deadline = time.time() + timeout
    m = run / "metrics.jsonl"
    while time.time() < deadline:
        if m.exists() and any(f'"step": {step},' in x for x in m.read_text().splitlines()):
            return
        assert all(p.poll() is None for p in c.procs), c.out(0)[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _final_state(run: Path, step: int = STEPS) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    tag = run / "checkpoints" / step_name(step)
    scores = ScoreStore.load(str(tag / "scores")).local_numpy()
    model = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    return scores, model["module"]


def _assert_same_result(a: Path, b: Path) -> None:
    sa, ma = _final_state(a)
    sb, mb = _final_state(b)
    assert np.array_equal(sa.view(np.uint16), sb.view(np.uint16))  # the store, bit for bit
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k  # the model, bit for bit (CPU, fp32)
    la = {x["step"]: x["loss"] for x in _metrics(a) if x["kind"] == "train"}
    lb = {x["step"]: x["loss"] for x in _metrics(b) if x["kind"] == "train"}
    assert la == {s: lb[s] for s in la}  # every step's loss (b may log a step twice)


def _committed(run: Path) -> str:
    tag = checkpoint.latest(str(run / "checkpoints"))
    assert tag is not None and (run / "checkpoints" / tag / checkpoint.COMPLETE).exists()
    return tag


@pytest.fixture(scope="module")
def reference(hosts, data, tmp_path_factory) -> Path:
    """The uninterrupted 2-host run: 40 steps, a checkpoint every 10 (an epoch)."""
    run = tmp_path_factory.mktemp("reference")
    _run(hosts, _args(data, run), run / "logs")
    rows = [x for x in _metrics(run) if x["kind"] == "train"]
    assert [x["step"] for x in rows] == list(range(1, STEPS + 1))
    info = json.loads((run / "checkpoints" / step_name(STEPS) / "run.json").read_text())
    assert info["world_size"] == 4
    # ranks 2 and 3 ran in host 2's namespace: the launcher there names only them
    assert "dist_world_size=4" in (run / "logs" / "host2.log").read_text()
    return run


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """The run directory as it was when the checkpoint at `step` was the newest."""
    shutil.copytree(src / "checkpoints", dst / "checkpoints",
                    ignore=lambda d, names: [n for n in names if re.fullmatch(r"step-\d+", n)
                                             and int(n.split("-")[1]) > step])
    (dst / "checkpoints" / "latest").write_text(step_name(step))
    rows = [x for x in (src / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in rows))


def test_two_hosts_resume_from_a_checkpoint_bit_exactly(hosts, data, reference, tmp_path):
    run = tmp_path / "resumed"
    _copy_until(reference, run, 20)
    _run(hosts, _args(data, run, "--resume", "latest"), run / "logs")
    assert "resumed from " + step_name(20) in (run / "logs" / "host1.log").read_text()
    _assert_same_result(reference, run)


_LOST = re.compile(r"\[rank (\d+)\] collective failed: (.*); last committed checkpoint: "
                   r"(\S+); restart every host with --resume latest")


def _lost_lines(text: str) -> list[re.Match[str]]:
    return [m for m in (_LOST.search(x) for x in text.splitlines()) if m]


def test_host_lost_mid_run_ends_within_the_timeout_and_resumes_bit_exactly(
        hosts, data, reference, tmp_path):
    run = tmp_path / "lost"
    c = Cluster(hosts, _args(data, run), run / "logs")
    _wait_for_step(run, 15, c)
    t_kill = time.time()
    hosts[1].kill_all()  # host 2 loses power: its launcher and both ranks, SIGKILL
    took = _exit_times(c, t_kill, timeout=TIMEOUT_S + 60)[0]
    print(f"host 2 killed: host 1 exited {c.procs[0].returncode} after {took} s")
    out = c.out(0)
    assert c.procs[0].returncode != 0
    assert took < TIMEOUT_S + 10, f"host 1 took {took:.1f} s to give up"
    lines = _lost_lines(out)
    assert len(lines) == 1, out[-3000:]  # one line, from one surviving rank
    rank, who, last = lines[0].groups()
    assert rank == "0" and who == "lost rank(s) 2, 3 (no heartbeat)", lines[0].group(0)
    tag = _committed(run)
    assert last == str(run / "checkpoints" / tag) and tag in (step_name(10),
                                                               step_name(20))
    _run(hosts, _args(data, run, "--resume", "latest"), run / "logs-resume")
    _assert_same_result(reference, run)


def _exit_times(c: Cluster, t0: float, timeout: float) -> list[float]:
    """Seconds from t0 until each host's launcher exited."""
    took: list[float | None] = [None] * len(c.procs)
    while None in took:
        for i, p in enumerate(c.procs):
            if took[i] is None and p.poll() is not None:
                took[i] = round(time.time() - t0, 1)
        assert time.time() - t0 < timeout, f"still running after {timeout} s"
        time.sleep(0.05)
    return [t for t in took if t is not None]


def test_a_rank_stuck_on_the_other_host_is_named_and_every_host_ends(hosts, data, tmp_path):
    """Rank 2 (host 2) blocks for good while reading its batch for step 4, its heartbeat
    still beating. Host 1's rank 0 prints the one line naming rank 2, its last step and
    phase; rank 2 prints where its main thread is; both hosts' launchers exit within the
    collective timeout + 20 s of the stall, and nothing of the job keeps running."""
    run = tmp_path / "stuck"
    args = _args(data, run, "train.max_steps=12")
    args[0] = str(REPO / "tests" / "scripts" / "stall_train.py")
    c = Cluster(hosts, args, run / "logs",
                env={"STALL_RANK": "2", "STALL_AT_READ": str(3 * 16 + 5)})
    pids: set[int] = set()
    t0 = time.time()
    while not all(p.poll() is not None for p in c.procs):
        for b in c.launchers:
            pids |= _tree(b)
        assert time.time() - t0 < 300, "still running after 300 s:\n" + c.out(0)[-3000:]
        time.sleep(0.2)
    ended = time.time()
    out = c.out(0) + c.out(1)
    stalled = re.search(r"\[rank 2\] stalling on purpose at (\d+\.\d+)$", out, re.M)
    assert stalled and all(p.returncode != 0 for p in c.procs), out[-5000:]
    lines = re.findall(r"\[rank 0\] collective failed: rank 2 made no progress for \d+ s, "
                       r"last in data loading at step 3; last committed checkpoint: none "
                       r"\(a resume starts from scratch\);", out, re.M)
    assert len(lines) == 1, c.out(0)[-4000:]
    assert "[rank 2] stopped by rank 0, which found this rank stuck in data loading at step 3" \
        in c.out(1), c.out(1)[-3000:]
    assert ended - float(stalled.group(1)) < TIMEOUT_S + 20
    assert not _left_running(pids)


def _cut(host: netns.Host, seconds: float) -> None:
    host.link(up=False)
    try:
        time.sleep(seconds)
    finally:
        host.link(up=True)


# A cut of a few seconds (TCP retransmits once the cable is back), and one longer than the
# collective timeout, so that the run must end.
@pytest.mark.parametrize("during,seconds", [("step", 4), ("checkpoint", 4),
                                            ("checkpoint", TIMEOUT_S + 10)])
def test_network_cut_recovers_or_ends_cleanly_and_never_loads_a_torn_save(
        hosts, data, reference, tmp_path, during, seconds):
    run = tmp_path / f"cut-{during}"
    c = Cluster(hosts, _args(data, run), run / "logs")
    if during == "step":
        _wait_for_step(run, 13, c)
    else:  # rank 0 makes the tag directory first, then every rank writes into it
        tag = run / "checkpoints" / step_name(20)
        deadline = time.time() + 200
        while not tag.exists():
            assert time.time() < deadline and all(p.poll() is None for p in c.procs)
            time.sleep(0.002)
    t_cut = time.time()
    cable = threading.Thread(target=_cut, args=(hosts[1], seconds))
    cable.start()
    took = _exit_times(c, t_cut, timeout=TIMEOUT_S + 120)
    cable.join()
    rcs = [p.returncode for p in c.procs]
    print(f"cut {seconds} s during a {during}: exit {rcs} after {took} s")
    if rcs == [0, 0]:  # the run rode it out: TCP retransmitted once the cable was back
        assert seconds < TIMEOUT_S
        _assert_same_result(reference, run)
        return
    assert rcs[0] != 0 and rcs[1] != 0
    # Each host gives up within the collective timeout, plus its diagnosis: 3 heartbeat
    # intervals on host 1, the store client's 10 s timeout on host 2 (rank 0's store is
    # behind the cut).
    assert took[0] < TIMEOUT_S + 10 and took[1] < TIMEOUT_S + 20, took
    # Host 1 names the ranks it lost; host 2, cut off from rank 0's store, says so.
    lines = [_lost_lines(c.out(i)) for i in (0, 1)]
    assert [len(x) for x in lines] == [1, 1], c.out(0)[-2000:] + c.out(1)[-2000:]
    assert lines[0][0].group(2) == "lost rank(s) 2, 3 (no heartbeat)"
    assert lines[1][0].group(1) == "2" and "rank 0's host is unreachable" in lines[1][0].group(2)
    tag = _committed(run)  # complete, whatever was being written when the cable went
    _run(hosts, _args(data, run, "--resume", "latest"), run / "logs-resume")
    assert f"resumed from {tag}" in (run / "logs-resume" / "host1.log").read_text()
    _assert_same_result(reference, run)


def _train_rows(run: Path) -> list[dict]:
    return [m for m in _metrics(run) if m["kind"] == "train"]


def _assert_same_curve(ref: Path, run: Path, first_step: int, world: int) -> None:
    """Same samples and epochs at the end, and the learning rate of the uninterrupted run
    at every sample count both runs reach (progress is counted in samples)."""
    rows = [r for r in _train_rows(run) if r["step"] > first_step]
    ref_rows = _train_rows(ref)
    assert rows[-1]["samples_seen"] == ref_rows[-1]["samples_seen"] == 4 * 640
    assert rows[-1]["epoch"] == ref_rows[-1]["epoch"] == 3
    assert rows[1]["samples_seen"] - rows[0]["samples_seen"] == world * 16
    ref_lr = {r["samples_seen"]: r["lr"] for r in ref_rows}
    common = [r for r in rows if r["samples_seen"] in ref_lr]
    assert len(common) >= len(rows) // 2
    for r in common:
        assert r["lr"] == pytest.approx(ref_lr[r["samples_seen"]], rel=1e-9, abs=1e-15), r
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_four_ranks_on_two_hosts_resume_on_one_host_with_two(hosts, data, reference, tmp_path):
    run = tmp_path / "shrunk"
    _copy_until(reference, run, 20)  # two epochs of 10 steps at 4 ranks
    _run(hosts[:1], _args(data, run, "--resume", "latest"), run / "logs")
    assert "resumed from " + step_name(20) in (run / "logs" / "host1.log").read_text()
    assert _train_rows(run)[-1]["step"] == 20 + 2 * 20  # two more epochs of 20 steps
    _assert_same_curve(reference, run, 20, world=2)


def test_two_ranks_on_one_host_resume_on_two_hosts_with_four(hosts, data, reference, tmp_path):
    small = tmp_path / "one-host"
    _run(hosts[:1], _args(data, small, "train.checkpoint_every=20"), small / "logs")
    run = tmp_path / "grown"
    _copy_until(small, run, 20)  # one epoch of 20 steps at 2 ranks
    _run(hosts, _args(data, run, "--resume", "latest"), run / "logs")
    assert "resumed from " + step_name(20) in (run / "logs" / "host1.log").read_text()
    assert _train_rows(run)[-1]["step"] == 20 + 3 * 10  # three more epochs of 10 steps
    _assert_same_curve(small, run, 20, world=4)
