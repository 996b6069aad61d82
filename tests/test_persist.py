"""Invariant 2: snapshots round-trip bit-exactly; a torn save is never loaded; damage
and mismatches are refused with an error that says what is wrong."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from store import Momentum, ScoreStore, SnapshotError, list_steps, read_commit
from tests.scripts.saver import values_for

REPO = Path(__file__).resolve().parents[1]
SAVER = [sys.executable, str(REPO / "tests" / "scripts" / "saver.py")]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16)


def _scored_store(n: int = 5000, seed: int = 0) -> ScoreStore:
    s = ScoreStore(n, chunk_target=128, shard_target=512)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (n // 2,), generator=g)
    s.exchange(ids, 100 * torch.rand(ids.numel(), generator=g), Momentum(0.9))
    return s


@pytest.mark.parametrize("url", ["file", "memory://persist-test/run1", "plain"])
def test_round_trip_is_bit_exact_on_each_backend(tmp_path: Path, url: str) -> None:
    target = {"file": f"file://{tmp_path}/s", "plain": str(tmp_path / "s")}.get(url, url)
    s = _scored_store()
    s.save(target, 10, extra={"run": "x"})
    back = ScoreStore.load(target, n=s.n)
    assert np.array_equal(_bits(back.local_numpy()), _bits(s.local_numpy()))
    assert back.loaded_record["extra"] == {"run": "x"}


def test_newest_committed_snapshot_is_loaded_unless_a_step_is_named(tmp_path: Path) -> None:
    a, b = _scored_store(seed=1), _scored_store(seed=2)
    a.save(str(tmp_path), 100)
    b.save(str(tmp_path), 200)
    assert np.array_equal(_bits(ScoreStore.load(str(tmp_path)).local_numpy()),
                          _bits(b.local_numpy()))
    assert np.array_equal(_bits(ScoreStore.load(str(tmp_path), step=100).local_numpy()),
                          _bits(a.local_numpy()))


def test_a_save_killed_before_its_commit_is_never_loaded(tmp_path: Path) -> None:
    r = subprocess.run([*SAVER, str(tmp_path), "torn"], env=ENV, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert list_steps(str(tmp_path)) == [(1, True), (2, False)]  # step 2's shards exist
    loaded = ScoreStore.load(str(tmp_path))
    assert loaded.loaded_record["step"] == 1
    assert np.array_equal(_bits(loaded.local_numpy()), _bits(values_for(1)))
    with pytest.raises(SnapshotError, match="step 2 is torn"):
        ScoreStore.load(str(tmp_path), step=2)
    # A later save at the torn step clears the debris and commits.
    s = ScoreStore(loaded.n, chunk_target=4096, shard_target=16384)
    s.values.copy_(torch.from_numpy(values_for(2)))
    s.save(str(tmp_path), 2)
    assert np.array_equal(_bits(ScoreStore.load(str(tmp_path)).local_numpy()),
                          _bits(values_for(2)))


def test_kill_at_random_moments_leaves_the_newest_commit_whole(tmp_path: Path) -> None:
    rng = random.Random(7)
    for trial in range(4):
        root = tmp_path / f"t{trial}"
        p = subprocess.Popen([*SAVER, str(root), "loop", "50"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while not p.stdout.readline():  # wait for the first commit, then kill mid-run
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 0.4))
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
        loaded = ScoreStore.load(str(root))
        step = loaded.loaded_record["step"]
        assert np.array_equal(_bits(loaded.local_numpy()), _bits(values_for(step)))


def test_flipped_byte_in_a_chunk_is_detected(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    shard = sorted((tmp_path / "step-000000000001" / "scores" / "c").iterdir())[3]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="corrupted|checksum"):
        ScoreStore.load(str(tmp_path))


def test_missing_shard_object_is_detected_not_read_as_never_scored(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    (tmp_path / "step-000000000001" / "scores" / "c" / "2").unlink()
    with pytest.raises(SnapshotError, match=r"shards \[2\] do not match"):
        ScoreStore.load(str(tmp_path))


def test_wrong_sample_count_is_refused_naming_both(tmp_path: Path) -> None:
    _scored_store(n=5000).save(str(tmp_path), 1)
    with pytest.raises(SnapshotError, match="N=5000 samples, this run expects N=6000"):
        ScoreStore.load(str(tmp_path), n=6000)


def test_wrong_dtype_on_disk_is_refused(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    meta = tmp_path / "step-000000000001" / "scores" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "float32"
    meta.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="float32.*commit record says"):
        ScoreStore.load(str(tmp_path))


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    rec = tmp_path / "step-000000000001" / "COMMIT.json"
    doc = json.loads(rec.read_text())
    doc["format_version"] = 99
    rec.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="v99"):
        read_commit(str(tmp_path))


def test_committed_step_is_not_overwritten_silently(tmp_path: Path) -> None:
    s = _scored_store()
    s.save(str(tmp_path), 1)
    with pytest.raises(SnapshotError, match="already committed"):
        s.save(str(tmp_path), 1)
    s.save(str(tmp_path), 1, overwrite=True)


def test_loading_where_nothing_was_saved_says_so(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no committed score-store snapshot"):
        ScoreStore.load(str(tmp_path / "nothing"))


def test_any_id_range_reads_back_exactly_across_read_blocks(tmp_path: Path, monkeypatch) -> None:
    """Loading under a new world reads ranges that start and end mid-shard of the
    saved layout; the blocked reader must stitch them exactly."""
    from store import persist

    s = _scored_store(n=5000)
    s.save(str(tmp_path), 1)
    want = s.local_numpy()
    monkeypatch.setattr(persist, "READ_BLOCK_SHARDS", 2)
    record = read_commit(str(tmp_path))
    rng = np.random.default_rng(0)
    for lo, hi in [(0, 5000), (1, 4999), (511, 513), (1024, 2048), (4999, 5000),
                   *[sorted(rng.integers(0, 5001, 2)) for _ in range(20)]]:
        got = np.full(hi - lo, np.nan, np.float16)
        for off, block in persist.read_range(str(tmp_path), record, int(lo), int(hi)):
            got[off:off + block.size] = block
        assert np.array_equal(_bits(got), _bits(want[lo:hi])), (lo, hi)


@pytest.mark.parametrize("n,chunk,shard", [(5000, 128, 512), (1000, 64, 256), (7, 7, 7),
                                           (4097, 1024, 4096)])
def test_shards_are_byte_identical_to_zarrs_own_writer(tmp_path: Path, n: int, chunk: int,
                                                       shard: int) -> None:
    """Saves encode shards themselves (for speed); Zarr must not be able to tell."""
    import zarr

    from store import persist

    s = ScoreStore(n, chunk_target=chunk, shard_target=shard)
    g = torch.Generator().manual_seed(n)
    s.values.copy_((25 + 4 * torch.randn(n, generator=g)).clamp(0, 100))
    s.values[: n // 3] = float("nan")  # never-scored stretches, a whole NaN chunk among them
    s.save(str(tmp_path / "ours"), 1)
    persist.prepare(str(tmp_path / "zarr"), 1, s.layout, overwrite=False)
    arr = zarr.open_array(store=persist._zarr_store(str(tmp_path / "zarr"), 1, None, False),
                          mode="r+")
    arr[:] = s.local_numpy()
    ours = tmp_path / "ours" / "step-000000000001" / "scores" / "c"
    theirs = tmp_path / "zarr" / "step-000000000001" / "scores" / "c"
    names = sorted(p.name for p in theirs.iterdir())
    assert names == sorted(p.name for p in ours.iterdir())
    # Wholly never-scored shards are not stored, by Zarr or by us.
    assert len(names) == s.layout.num_shards - (n // 3) // shard
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
