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

from store import Momentum, ScoreStore, SnapshotError, SnapshotLocation
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
    assert back.loaded_record.extra == {"run": "x"}


def test_newest_committed_snapshot_is_loaded_unless_a_step_is_named(tmp_path: Path) -> None:
    a, b = _scored_store(seed=1), _scored_store(seed=2)
    a.save(str(tmp_path), 100)
    b.save(str(tmp_path), 200)
    assert np.array_equal(_bits(ScoreStore.load(str(tmp_path)).local_numpy()),
                          _bits(b.local_numpy()))
    assert np.array_equal(_bits(ScoreStore.load(str(tmp_path), step=100).local_numpy()),
                          _bits(a.local_numpy()))


def test_a_save_killed_before_its_commit_is_never_loaded(tmp_path: Path) -> None:
    r = subprocess.run([*SAVER, str(tmp_path), "torn"], env=ENV, capture_output=True,
                       timeout=120)  # one process, no children: killed at the timeout
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    # step 2 is listed: its shards exist
    assert SnapshotLocation(str(tmp_path)).steps() == [(1, True), (2, False)]
    loaded = ScoreStore.load(str(tmp_path))
    assert loaded.loaded_record.step == 1
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
        step = loaded.loaded_record.step
        assert np.array_equal(_bits(loaded.local_numpy()), _bits(values_for(step)))


def test_flipped_byte_in_a_chunk_is_detected(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    shard = sorted((tmp_path / "step-000000001" / "scores" / "c").iterdir())[3]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="corrupted|checksum"):
        ScoreStore.load(str(tmp_path))


def test_missing_shard_object_is_detected_not_read_as_never_scored(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    (tmp_path / "step-000000001" / "scores" / "c" / "2").unlink()
    with pytest.raises(SnapshotError, match=r"shards \[2\] do not match"):
        ScoreStore.load(str(tmp_path))


def test_wrong_sample_count_is_refused_naming_both(tmp_path: Path) -> None:
    _scored_store(n=5000).save(str(tmp_path), 1)
    with pytest.raises(SnapshotError, match="N=5000 samples, this run expects N=6000"):
        ScoreStore.load(str(tmp_path), n=6000)


def test_wrong_dtype_on_disk_is_refused(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    meta = tmp_path / "step-000000001" / "scores" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "float32"
    meta.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="float32.*commit record says"):
        ScoreStore.load(str(tmp_path))


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    rec = tmp_path / "step-000000001" / "COMMIT.json"
    doc = json.loads(rec.read_text())
    doc["format_version"] = 99
    rec.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="v99"):
        SnapshotLocation(str(tmp_path)).read_commit()


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
    loc = SnapshotLocation(str(tmp_path))
    record = loc.read_commit()
    rng = np.random.default_rng(0)
    for lo, hi in [(0, 5000), (1, 4999), (511, 513), (1024, 2048), (4999, 5000),
                   *[sorted(rng.integers(0, 5001, 2)) for _ in range(20)]]:
        got = np.full(hi - lo, np.nan, np.float16)
        for off, block in loc.read(record, int(lo), int(hi)):
            got[off:off + block.size] = block
        assert np.array_equal(_bits(got), _bits(want[lo:hi])), (lo, hi)


@pytest.mark.parametrize("n,chunk,shard", [(5000, 128, 512), (1000, 64, 256), (7, 7, 7),
                                           (4097, 1024, 4096)])
def test_shards_are_byte_identical_to_zarrs_own_writer(tmp_path: Path, n: int, chunk: int,
                                                       shard: int) -> None:
    """Saves encode shards themselves (for speed); Zarr must not be able to tell."""
    import zarr

    s = ScoreStore(n, chunk_target=chunk, shard_target=shard)
    g = torch.Generator().manual_seed(n)
    s.values.copy_((25 + 4 * torch.randn(n, generator=g)).clamp(0, 100))
    s.values[: n // 3] = float("nan")  # never-scored stretches, a whole NaN chunk among them
    s.save(str(tmp_path / "ours"), 1)
    theirs_loc = SnapshotLocation(str(tmp_path / "zarr"))
    theirs_loc.prepare(1, s.layout, overwrite=False)
    arr = zarr.open_array(store=theirs_loc._array_store(f"{theirs_loc.root}/step-000000001",
                                                        read_only=False), mode="r+")
    arr[:] = s.local_numpy()
    ours = tmp_path / "ours" / "step-000000001" / "scores" / "c"
    theirs = tmp_path / "zarr" / "step-000000001" / "scores" / "c"
    names = sorted(p.name for p in theirs.iterdir())
    assert names == sorted(p.name for p in ours.iterdir())
    # Wholly never-scored shards are not stored, by Zarr or by us.
    assert len(names) == s.layout.num_shards - (n // 3) // shard
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_snapshots_named_with_twelve_digits_still_load(tmp_path: Path) -> None:
    """Snapshot directories were once named step-000000000001 (12 digits); a root holding
    such snapshots lists, loads, and takes new saves (named with 9 digits) beside them."""
    old = {1: _scored_store(seed=1), 2: _scored_store(seed=2)}
    for step, s in old.items():
        s.save(str(tmp_path), step)
        (tmp_path / f"step-{step:09d}").rename(tmp_path / f"step-{step:012d}")
    loc = SnapshotLocation(str(tmp_path))
    assert loc.steps() == [(1, True), (2, True)]
    for step in (1, 2):
        back = ScoreStore.load(loc, n=5000, step=step)
        assert np.array_equal(_bits(back.local_numpy()), _bits(old[step].local_numpy()))
    assert ScoreStore.load(loc).loaded_record.step == 2  # newest by step
    with pytest.raises(SnapshotError, match="already committed"):
        old[1].save(loc, 1)  # a committed old-width step is not overwritten silently
    new = _scored_store(seed=3)
    new.save(loc, 2, overwrite=True)  # replaces the 12-digit directory of step 2
    new.save(loc, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000000001", "step-000000002", "step-000000010"]
    assert loc.steps() == [(1, True), (2, True), (10, True)]
    assert np.array_equal(_bits(ScoreStore.load(loc, step=2).local_numpy()),
                          _bits(new.local_numpy()))
    assert np.array_equal(_bits(ScoreStore.load(loc, step=1).local_numpy()),
                          _bits(old[1].local_numpy()))


def test_a_torn_twelve_digit_snapshot_is_never_loaded_and_is_cleared_by_a_save(
        tmp_path: Path) -> None:
    _scored_store(seed=1).save(str(tmp_path), 1)
    _scored_store(seed=2).save(str(tmp_path), 2)
    (tmp_path / "step-000000002" / "COMMIT.json").unlink()
    (tmp_path / "step-000000002").rename(tmp_path / "step-000000000002")
    loc = SnapshotLocation(str(tmp_path))
    assert loc.steps() == [(1, True), (2, False)]
    assert ScoreStore.load(loc).loaded_record.step == 1
    with pytest.raises(SnapshotError, match="step 2 is torn"):
        ScoreStore.load(loc, step=2)
    _scored_store(seed=2).save(loc, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001", "step-000000002"]


def test_commit_record_round_trips_and_an_older_one_reads_seed_and_counter_as_zero(
        tmp_path: Path) -> None:
    s = _scored_store()
    s.save(str(tmp_path), 4, extra={"run": "x"})
    loc = SnapshotLocation(str(tmp_path))
    record = loc.read_commit()
    doc = json.loads((tmp_path / "step-000000004" / "COMMIT.json").read_text())
    assert record.to_dict() == doc
    assert (record.step, record.n, record.exchanges, record.layout) == (4, 5000, 1, s.layout)
    del doc["seed"], doc["exchanges"]  # a record written before they were kept
    (tmp_path / "step-000000004" / "COMMIT.json").write_text(json.dumps(doc))
    assert (loc.read_commit().seed, loc.read_commit().exchanges) == (0, 0)


def test_a_commit_record_missing_a_field_is_refused_as_damaged(tmp_path: Path) -> None:
    _scored_store().save(str(tmp_path), 1)
    rec = tmp_path / "step-000000001" / "COMMIT.json"
    doc = json.loads(rec.read_text())
    del doc["shard_crc32"]
    rec.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="step 1: commit record is incomplete.*'shard_crc32'"):
        ScoreStore.load(str(tmp_path))


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    from store.persist import atomic_write

    target = tmp_path / "latest"
    atomic_write(target, b"step-000000001")
    atomic_write(target, b"step-000000002")
    assert target.read_bytes() == b"step-000000002"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
