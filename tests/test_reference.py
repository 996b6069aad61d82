"""Reference scores through DeepSpeed's launcher on 2 CPU ranks: launch/score.py scores
every pair once into a snapshot equal to a one-process recomputation, resumes after a
SIGKILL to the same snapshot, refuses another model or manifest; the trainer's
learnability and reference_filter steps rank by those scores and pay their cost."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dissect_dist import model as modellib
from dissect_dist.data import Manifest
from dissect_dist.data.builders import build_fashion_mnist
from dissect_dist.data.loader import ShardReader, decode_sample
from dissect_dist.launching import Bounded
from store import ScoreStore, SnapshotLocation
from tests import procs
from tests.rank_pool import free_port

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
DS = str(Path(sys.executable).parent / "deepspeed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
CONFIG = str(REPO / "launch" / "configs" / "tiny-cpu.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    build_fashion_mnist(str(root / "data"), noise=0.4, seed=0, subset=640, shard_size=10)
    # another manifest: other shard counts (a manifest is known by its shard names and counts)
    build_fashion_mnist(str(root / "other"), noise=0.4, seed=1, subset=630, shard_size=10)
    models = []
    for seed in (0, 1):  # two reference models (random initialisations suffice here)
        torch.manual_seed(seed)
        m, *_ = modellib.create("tiny-vit-28", None)
        path = root / f"model{seed}.pt"
        modellib.export_open_clip(m, str(path))
        models.append(path)
    out = root / "scores"
    rc, log = procs.finish(_score(root / "data", models[0], out), 300)
    assert rc == 0, log[-4000:]
    return root, models, out


def _score(data: Path, model: Path, out: Path, *extra: str) -> Bounded:
    cmd = [DS, "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "score.py"), "--config", CONFIG, "--model", str(model),
           "--out", str(out), f"data.train_manifest={data}/train/manifest.json",
           "data.noise_ledger=null", "data.zeroshot_dir=null", *extra]
    return procs.start(cmd, env=ENV)


def _values(out: Path) -> np.ndarray:
    return ScoreStore.load(str(out)).local_numpy()


def test_every_pair_is_scored_once_as_one_process_scores_it(setup):
    root, models, out = setup
    got = _values(out)
    manifest = Manifest.load(str(root / "data" / "train" / "manifest.json"))
    assert got.shape == (640,) and np.isfinite(got).all()
    m, _, pre, tok = modellib.create("tiny-vit-28", str(models[0]))
    m.eval()
    reader = ShardReader(manifest)
    ids = [0, 9, 10, 333, 639]  # shards of both ranks
    shard, pos = manifest.locate(np.asarray(ids))
    with torch.no_grad():
        for i, s, p in zip(ids, shard.tolist(), pos.tolist()):
            image, caption = decode_sample(reader.read(s, p)[1], pre)
            fi, ft = modellib.encode(m, image[None], tok([caption]))
            want = np.float16(modellib.clipscore(fi, ft).item())
            assert got[i] == want, i
    reader.close()
    extra = SnapshotLocation(str(out)).read_commit(0).extra
    assert extra["manifest_fingerprint"] == manifest.fingerprint()
    assert extra["model_name"] == "tiny-vit-28" and extra["pairs_scored"] == 640
    assert extra["flops_scoring"] == 640 * extra["row_flops"]["score"]
    assert extra["flops_model_known"] is False  # no metrics.jsonl beside these models
    assert not (root / "scores.parts").exists()  # removed once committed


def test_a_killed_job_resumes_to_the_same_snapshot(setup):
    root, models, out = setup
    killed = root / "killed"
    # one pair per forward: 32 shards per rank take long enough to be caught midway
    p = _score(root / "data", models[0], killed, "data.batch_size=1")
    parts = root / "killed.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("shard-*.npy"))) < 4:
        assert p.proc.poll() is None, p.output()[-3000:]
        time.sleep(0.005)
    p.kill()
    done = len(list(parts.glob("shard-*.npy")))
    assert 4 <= done < 64 and not (killed / "step-000000000").exists()
    rc, log = procs.finish(_score(root / "data", models[0], killed, "data.batch_size=1"), 300)
    assert rc == 0, log[-4000:]
    assert log.count("[score] rank 0: shard") < 32  # rank 0 skipped what it had finished
    assert np.array_equal(_values(killed).view(np.uint16), _values(out).view(np.uint16))


def test_another_model_or_manifest_is_refused(setup):
    root, models, out = setup
    rc, log = procs.finish(_score(root / "data", models[1], out), 300)
    assert rc == 2 and "score error:" in log and "model_sha256" in log, log[-3000:]
    rc, log = procs.finish(_score(root / "other", models[0], out), 300)
    assert rc == 2 and "manifest_fingerprint" in log, log[-3000:]
    rc, log = procs.finish(_score(root / "data", models[0], out), 300)
    assert rc == 0 and "already holds this model's scores" in log, log[-3000:]


def _train(root: Path, run: Path, strategy: str, out: Path) -> None:
    cmd = [DS, "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--config", CONFIG,
           f"data.train_manifest={root}/data/train/manifest.json",
           f"data.noise_ledger={root}/data/train/noise_ledger.npy", "data.zeroshot_dir=null",
           "data.batch_size=16", "data.workers=0", f"train.run_dir={run}",
           "train.log_every=1", "train.max_steps=3", "train.record_samples=true",
           f"selection.strategy={strategy}", f"selection.reference={out}"]
    rc, log = procs.finish(procs.start(cmd, env=ENV), 400)
    assert rc == 0, log[-4000:]


def _records(run: Path) -> list[dict]:
    per_rank = [[json.loads(x) for x in (run / f"samples-rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    return [{k: np.concatenate([np.asarray(x[k], dtype=float) for x in rows])
             for k in ("ids", "keep", "key", "curr") if rows[0].get(k) is not None}
            for rows in zip(*per_rank)]


@pytest.mark.parametrize("strategy", ["learnability", "reference_filter"])
def test_the_step_ranks_by_the_reference_and_pays_for_it(setup, tmp_path, strategy):
    root, _, out = setup
    _train(root, tmp_path, strategy, out)
    ref = _values(out).astype(np.float64)
    extra = SnapshotLocation(str(out)).read_commit(0).extra
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[0]["flops_reference"] == extra["flops_scoring"] + extra["flops_model"]
    assert train[-1]["flops_reference_total"] == train[0]["flops_reference"]
    steps = _records(tmp_path)
    assert len(steps) == 3
    if strategy == "learnability":  # key = ref - curr, the global top round(0.3 x 32)
        for s in steps:
            ids = s["ids"].astype(int)
            assert np.allclose(s["key"], ref[ids] - s["curr"], atol=1e-4)
            keep = s["keep"].astype(bool)
            assert keep.sum() == 10 and s["key"][keep].min() >= s["key"][~keep].max()
    else:  # no scoring pass; kept: reference score >= the data set's top-30% threshold
        t = np.sort(ref)[::-1][round(0.3 * ref.size) - 1]
        assert all(r["pairs_scored"] == 0 for r in train)
        for s in steps:
            ids = s["ids"].astype(int)
            assert np.array_equal(s["keep"].astype(bool), ref[ids] >= t)
