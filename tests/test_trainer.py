"""The trainer through DeepSpeed's launcher on 2 CPU ranks (gloo): every strategy
trains; a run killed with SIGKILL and resumed equals an uninterrupted one (samples,
store, model); a checkpoint that does not fit on its disk stops every rank with one
clear message and loses nothing; bad configs fail before any process group starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dissect_dist import compute
from dissect_dist import model as modellib
from dissect_dist.data import Manifest
from dissect_dist.data.builders import build_fashion_mnist
from dissect_dist.launching import Bounded
from store import ScoreStore
from tests import procs
from tests.rank_pool import free_port

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
DS = str(Path(sys.executable).parent / "deepspeed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    build_fashion_mnist(str(root), noise=0.4, seed=0, subset=640, shard_size=100)
    return root


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "launch" / "configs" / "tiny-cpu.yaml"),
            f"data.train_manifest={data}/train/manifest.json",
            f"data.noise_ledger={data}/train/noise_ledger.npy", "data.zeroshot_dir=null",
            "data.batch_size=16", "data.workers=0", f"train.run_dir={run}",
            "train.log_every=1", "optim.warmup_steps=2", *extra]


def _launch(args: list[str], nproc: int = 2, script: Path = REPO / "launch" / "train.py",
            env: dict[str, str] | None = None) -> Bounded:
    cmd = [DS, "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script), *args]
    return procs.start(cmd, env={**ENV, **(env or {})})


def _run(args: list[str], nproc: int = 2, timeout: int = 400) -> str:
    rc, out = procs.finish(_launch(args, nproc), timeout)
    assert rc == 0, out[-5000:]
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run: Path, world: int = 2) -> list[dict]:
    """The sample record (train.record_samples) of every step, ranks 0..W-1's rows
    concatenated in rank order: the global batch as the selector ranked it."""
    per_rank = [[json.loads(x) for x in (run / f"samples-rank{r}.jsonl").read_text().splitlines()]
                for r in range(world)]
    assert len({len(rows) for rows in per_rank}) == 1
    steps = []
    for rows in zip(*per_rank):
        assert len({(x["step"], x["epoch"]) for x in rows}) == 1
        keys = [x["key"] for x in rows]
        assert all(k is None for k in keys) or all(k is not None for k in keys)
        steps.append({"step": rows[0]["step"], "epoch": rows[0]["epoch"],
                      "ids": np.concatenate([x["ids"] for x in rows]).astype(np.int64),
                      "keep": np.concatenate([x["keep"] for x in rows]).astype(bool),
                      "key": None if keys[0] is None else np.concatenate(keys).astype(float)})
    return steps


def _assert_top_k(step: dict, ratio: float) -> None:
    """The kept rows are a top-k of the logged key over the global batch, k = round(r * B);
    ties (equal keys) may fall on either side."""
    keep, key = step["keep"], step["key"]
    assert keep.shape == key.shape and np.isfinite(key).all()
    assert keep.sum() == round(ratio * keep.size), step["step"]
    if 0 < keep.sum() < keep.size:
        assert key[keep].min() >= key[~keep].max(), step["step"]


@pytest.fixture(scope="module")
def row_cost() -> compute.RowCost:
    """tiny-vit-28's FLOPs per pair, as the trainer counts them."""
    model, _, pre, tok = modellib.create("tiny-vit-28", None)
    return compute.count_row_cost(model, *modellib.blank_row(pre, tok, torch.device("cpu"),
                                                             torch.float32))


def _assert_compute(train: list[dict], steps: list[dict], strategy: str,
                    row: compute.RowCost) -> None:
    """Each step's logged counts and FLOPs (log_every=1) from its sample record: 2 ranks of
    16 rows, the rows each rank kept (a rank keeping none forwards a blank row)."""
    scored = strategy not in ("full", "random", "oracle")
    total = 0.0
    for m, s in zip(train, steps, strict=True):
        kept = [int(s["keep"][:16].sum()), int(s["keep"][16:].sum())]
        want = compute.step_cost(row, [16, 16], kept, scored=scored,
                                 per_sample_loss=strategy in ("small_loss", "big_loss"))
        assert (m["pairs_loaded"], m["pairs_scored"], m["rows_trained"]) == \
            (32, 32 if scored else 0, sum(kept))
        assert m["flops_score"] == want.flops_score and m["flops_train"] == want.flops_train
        total += want.flops_score + want.flops_train
        assert m["flops_total"] == pytest.approx(total, rel=1e-12)
        assert 0 < m["wall_s"] <= m["wall_s_total"]


@pytest.mark.parametrize("strategy", ["full", "random", "clipscore", "small_loss", "big_loss",
                                      "dissect_momentum", "dissect_warmup", "oracle"])
def test_every_strategy_trains_on_two_ranks(fmnist, tmp_path, strategy, row_cost):
    # Three steps stay in epoch 0, where every pair is seen for the first time: with
    # first_sight=zero dissect_momentum's key is δ = 0 - curr, not 0 everywhere, so its
    # top-k is a real choice (the default first_sight runs in the resume test below).
    _run(_args(fmnist, tmp_path, f"selection.strategy={strategy}", "train.max_steps=3",
               "selection.warmup_epochs=0", "selection.first_sight=zero",
               "train.record_samples=true"))
    train = [m for m in _metrics(tmp_path) if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    want = {"full": 1.0, "oracle": 0.6}.get(strategy, 0.3)
    tol = 0.25 if strategy == "oracle" else 0.02  # oracle: the batch's clean share
    assert all(abs(m["kept_fraction"] - want) < tol for m in train)  # round(r * 32) / 32
    assert all(np.isfinite(m["loss"]) for m in train)
    assert (tmp_path / "checkpoints" / "step-000000003" / "COMPLETE").exists()
    steps = _steps(tmp_path)
    noisy = np.load(fmnist / "train" / "noise_ledger.npy")
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert s["ids"].size == 32
        if strategy in ("full", "random"):  # no key: everything, or a random round(r * B)
            assert s["key"] is None
            assert s["keep"].sum() == (32 if strategy == "full" else round(0.3 * 32))
        elif strategy == "oracle":  # exactly the pairs the ledger does not list
            assert s["key"] is None
            assert np.array_equal(s["keep"], ~np.isin(s["ids"], noisy))
        else:  # a scored strategy keeps the global top-k of its key, not any r%
            _assert_top_k(s, 0.3)
    _assert_compute(train, steps, strategy, row_cost)
    for m, s in zip(train, steps, strict=True):  # of the noisy pairs seen, the share dropped
        bad = np.isin(s["ids"], noisy)
        assert m["dropped_noisy_recall"] == pytest.approx((bad & ~s["keep"]).sum() / bad.sum())
    if strategy in ("full", "oracle"):
        assert {m["dropped_noisy_recall"] for m in train} == {0.0 if strategy == "full" else 1.0}
    if strategy in ("clipscore", "small_loss", "big_loss", "dissect_momentum"):
        # The top-k was a real choice. dissect_warmup without a warm-up never records a
        # score (δ = 0 throughout): tests/test_trainer_warmup.py checks its key past one.
        assert all(np.ptp(s["key"]) > 0 for s in steps)


def _final_state(run: Path, step: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    tag = run / "checkpoints" / f"step-{step:09d}"
    scores = ScoreStore.load(str(tag / "scores")).local_numpy()
    model = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    return scores, model["module"]


def test_a_flop_budget_ends_the_run_once_spent(fmnist, tmp_path, row_cost):
    """train.max_flops stops at the first step whose cumulative FLOPs reach it, before
    train.epochs; random keeps round(0.3 x 32) = 10 rows a step and scores nothing."""
    step = compute.step_cost(row_cost, [16, 16], [5, 5], scored=False, per_sample_loss=False)
    per_step = step.flops_train  # a rank keeping 4 or 6 of the 10 costs the same
    _run(_args(fmnist, tmp_path, "selection.strategy=random", "train.epochs=3",
               f"train.max_flops={4.5 * per_step!r}"))
    train = [m for m in _metrics(tmp_path) if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5]
    assert train[-1]["flops_total"] == pytest.approx(5 * per_step, rel=1e-12)
    assert train[-1]["rows_trained_total"] == 50 and train[-1]["pairs_scored_total"] == 0
    assert (tmp_path / "checkpoints" / "step-000000005" / "COMPLETE").exists()


@pytest.fixture(scope="module")
def uninterrupted(fmnist, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("whole")
    _run(_args(fmnist, run, *RESUME_RUN))
    return run


RESUME_RUN = ["selection.strategy=dissect_momentum", "train.max_steps=16",
              "train.checkpoint_every=4", "train.record_samples=true", "train.epochs=2"]


@pytest.mark.parametrize("when", ["during_checkpoint_write", "between_checkpoints"])
def test_killed_run_resumes_to_the_uninterrupted_result(fmnist, uninterrupted, tmp_path, when):
    run = tmp_path / "killed"
    p = _launch(_args(fmnist, run, *RESUME_RUN))
    ckpt = run / "checkpoints"
    tag8 = ckpt / "step-000000008"
    samples = run / "samples-rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if when == "during_checkpoint_write" and tag8.exists():
            assert not (tag8 / "COMPLETE").exists()  # caught while step 8 is being written
            break
        if when == "between_checkpoints" and samples.exists() and \
                len(samples.read_text().splitlines()) >= 10:
            break
        assert p.proc.poll() is None, p.output()[-3000:]
        time.sleep(0.005)
    p.kill()  # kill -9 the launcher and both ranks
    latest = (ckpt / "latest").read_text()
    if not (tag8 / "COMPLETE").exists():
        assert latest == "step-000000004"  # a torn checkpoint is never "latest"
    out = _run(_args(fmnist, run, *RESUME_RUN) + ["--resume", "latest"])
    assert "resumed from step-00000000" in out

    for r in (0, 1):
        a = (uninterrupted / f"samples-rank{r}.jsonl").read_text().splitlines()
        b = (run / f"samples-rank{r}.jsonl").read_text().splitlines()
        assert len(a) == 16 and a == b  # same samples, same keep decisions, every step
    sa, ma = _final_state(uninterrupted, 16)
    sb, mb = _final_state(run, 16)
    assert np.array_equal(sa.view(np.uint16), sb.view(np.uint16))  # same store, bit for bit
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k  # same model, bit for bit (CPU, fp32)


def test_resume_mid_epoch_with_another_world_size_is_refused(fmnist, tmp_path):
    common = ["train.max_steps=3", "train.checkpoint_every=3"]
    _run(_args(fmnist, tmp_path, *common))
    p = _launch(_args(fmnist, tmp_path, "train.max_steps=5") + ["--resume", "latest"], nproc=1)
    rc, out = procs.finish(p, 300)
    assert rc != 0
    assert "mid-epoch" in out and "resume with the same values" in out


def test_bad_config_fails_before_any_process_group(tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"),
                        "--config", str(REPO / "launch" / "configs" / "tiny-cpu.yaml"),
                        "selection.ratio=1.5"], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "config error: selection.ratio: 1.5: need 0 < r <= 1" in r.stderr
    assert "init_distributed" not in r.stdout + r.stderr and time.time() - t0 < 60


def test_eval_every_epoch_evaluates_without_a_noise_ledger(fmnist, tmp_path):
    """train.eval_every=-1 logs zero-shot accuracy at every epoch end; the noise ledger
    only adds the clean-vs-noisy metrics to that row."""
    zs = tmp_path / "zs"  # the first 100 test images: a quick zero-shot set
    (zs / "test").mkdir(parents=True)
    shutil.copy(fmnist / "classes.json", zs / "classes.json")
    test = Manifest.load(str(fmnist / "test" / "manifest.json"))
    Manifest(test.urls[:1], test.counts[:1]).save(str(zs / "test" / "manifest.json"))
    run = tmp_path / "run"
    _run(_args(fmnist, run, "data.noise_ledger=null", f"data.zeroshot_dir={zs}",
               "data.batch_size=64", "train.epochs=2", "train.eval_every=-1"))
    epochs = [m for m in _metrics(run) if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [0, 1]  # 640 pairs / (2 x 64) = 5 steps each
    assert all(0.0 <= m["zeroshot_acc"] <= 1.0 for m in epochs)


@contextlib.contextmanager
def _tmpfs(path: Path, mib: int) -> Iterator[Path]:
    """A small filesystem of its own at path, unmounted afterwards whatever happens."""
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"needs to mount a tmpfs (root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _run_to_exit(p: Bounded, timeout: int = 300) -> tuple[int, str]:
    return procs.finish(p, timeout)


# A checkpoint of this run (tiny-vit-28, fp32, AdamW) takes 41 MB.
SPACE_RUN = ["train.max_steps=4", "train.checkpoint_every=2"]


def _assert_stopped_cleanly(rc: int, out: str, ckpt: Path, cause: str) -> None:
    """Every rank printed the one line (path, cause, free vs needed, the kept `latest`,
    how to go on) and exited with status 3; step 4's debris is gone, step 2 is `latest`
    and loads."""
    assert rc == 3, out[-5000:]
    assert "Traceback" not in out and "Connection closed by peer" not in out, out[-5000:]
    sizes = []
    for r in (0, 1):
        lines = [ln for ln in out.splitlines() if ln.startswith(f"[rank {r}] checkpoint ")]
        assert len(lines) == 1, out[-5000:]
        line = lines[0]
        assert f"checkpoint {ckpt}/step-000000004 not written: {cause}" in line, line
        assert "latest is still step-000000002 (complete)" in line, line
        assert "then rerun with --resume latest" in line, line
        m = re.search(r"([\d.]+) (KiB|MiB) free.*?about ([\d.]+) (KiB|MiB) needed", line)
        assert m, line
        scale = {"KiB": 1, "MiB": 1024}
        sizes.append((float(m[1]) * scale[m[2]], float(m[3]) * scale[m[4]]))
    assert sizes[0] == sizes[1]  # one message, the same on every rank
    assert sizes[0][0] < sizes[0][1]  # less free than needed
    assert (ckpt / "latest").read_text() == "step-000000002"
    assert not (ckpt / "step-000000004").exists()  # removed: it does not eat the space left
    assert (ckpt / "step-000000002" / "COMPLETE").exists()
    assert ScoreStore.load(str(ckpt / "step-000000002" / "scores")).loaded_record is not None


def test_checkpoint_that_does_not_fit_stops_every_rank_and_keeps_latest(fmnist, tmp_path):
    """The second checkpoint does not fit: the free-space check stops the run before
    anything is written, and the run resumes from the first on a roomy disk."""
    run = tmp_path / "full"
    with _tmpfs(run / "checkpoints", 60) as ckpt:  # room for one checkpoint, not two
        rc, out = _run_to_exit(_launch(_args(fmnist, run, *SPACE_RUN)))
        _assert_stopped_cleanly(rc, out, ckpt, "no space: ")
        assert "checked before writing" in out
        # The estimate the check used is calibrated on a real checkpoint: it covers it,
        # with little to spare.
        first = ckpt / "step-000000002"
        written = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
        estimate = json.loads((first / "run.json").read_text())["bytes_estimate"]
        assert written <= estimate <= 1.1 * written
        roomy = tmp_path / "roomy"
        shutil.copytree(ckpt, roomy / "checkpoints")
    out = _run(_args(fmnist, roomy, "train.max_steps=3") + ["--resume", "latest"])
    assert "resumed from step-000000002 (step 2" in out
    assert (roomy / "checkpoints" / "latest").read_text() == "step-000000003"


@pytest.mark.parametrize("at,rank", [("scores", 1), ("model", 0)])
def test_disk_filled_during_a_checkpoint_stops_every_rank_and_keeps_latest(
        fmnist, tmp_path, at, rank):
    """The check passed, then another process filled the disk: the score-store snapshot
    (rank 1 filled it) or DeepSpeed's model file (rank 0) fails with a real ENOSPC
    inside a collective write, and every rank still ends with the one message."""
    run = tmp_path / "run"
    with _tmpfs(run / "checkpoints", 120) as ckpt:  # room for both checkpoints
        env = {"FILL_FILE": str(ckpt / "ballast"), "FILL_STEP": "4", "FILL_AT": at,
               "FILL_RANK": str(rank)}
        p = _launch(_args(fmnist, run, *SPACE_RUN), script=REPO / "tests" / "scripts" /
                    "full_disk_train.py", env=env)
        rc, out = _run_to_exit(p)
        assert f"[rank {rank}] filled the disk before the {at} of step 4" in out
        _assert_stopped_cleanly(rc, out, ckpt, "no space while writing (")


def test_profile_writes_a_trace_of_the_chosen_steps_on_every_rank(fmnist, tmp_path):
    """train.profile_at=3, profile_steps=2: each rank writes a Chrome trace holding exactly
    the launch's steps 3 and 4 (the profiler's steps 2 and 3; step 2 is its warm-up) and
    an operator table; the run itself ends normally."""
    run = tmp_path / "run"
    _run(_args(fmnist, run, "selection.strategy=dissect_momentum", "train.max_steps=6",
               "train.profile_at=3", "train.profile_steps=2"))
    for r in (0, 1):
        trace = json.loads((run / "profile" / f"rank{r}.trace.json").read_text())
        steps = sorted({e["name"] for e in trace["traceEvents"]
                        if str(e.get("name", "")).startswith("ProfilerStep#")})
        assert steps == ["ProfilerStep#2", "ProfilerStep#3"], steps
        table = (run / "profile" / f"rank{r}.txt").read_text()
        assert "aten::" in table and "Self CPU" in table
    assert [m["step"] for m in _metrics(run) if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
