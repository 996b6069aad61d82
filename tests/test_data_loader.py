"""The loader: the order contract with real worker processes, mid-epoch resume equal
to an uninterrupted run, bad input skipped and counted, manifest mismatch refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from dissect_dist.data import Manifest, ManifestError, WebDatasetLoader
from dissect_dist.data.loader import ShardReader
from dissect_dist.data.order import OrderSpec, rank_batches
from tests.datagen import make_dataset, truncate

PRE = T.Compose([T.Resize(8), T.ToTensor()])
SIZES = [37, 120, 5, 64, 90, 33, 71]  # 420 samples, uneven shards


def _loader(m: Manifest, rank: int = 0, world: int = 1, workers: int = 2, bs: int = 16):
    return WebDatasetLoader(m, rank=rank, world_size=world, batch_size=bs, seed=7,
                            preprocess=PRE, num_workers=workers, shuffle_window=2)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Manifest:
    return make_dataset(tmp_path_factory.mktemp("clean"), SIZES)


def _ids(batches) -> list[list[int]]:
    return [b.ids.tolist() for b in batches]


def test_batches_follow_the_pure_order_with_worker_processes(clean):
    got = _ids(_loader(clean, rank=1, world=2, workers=3))
    want = rank_batches(clean.counts, OrderSpec(seed=7, world_size=2, batch_size=16, window=2),
                        0, 1)
    assert got == want.tolist()


def test_batches_carry_decoded_images_and_their_own_captions(clean):
    b = next(iter(_loader(clean, workers=0)))
    assert b.images.shape == (16, 3, 8, 8) and b.images.dtype == torch.float32
    assert b.captions == [f"caption {i}" for i in b.ids.tolist()]


@pytest.mark.parametrize("stop_after", [1, 3, 7, 25])
def test_resume_mid_epoch_equals_uninterrupted(clean, stop_after):
    full = _ids(_loader(clean))
    first = _loader(clean)
    head = []
    for b in first:
        head.append(b.ids.tolist())
        if len(head) == stop_after:
            break
    state = first.state_dict()
    resumed = _loader(clean)
    resumed.load_state_dict(state)
    tail = _ids(resumed)
    assert head + tail == full  # no duplicate, no gap, same order
    second_epoch = _ids(resumed)  # the resumed loader goes on into a new epoch
    assert second_epoch != full and len(second_epoch) == len(full)


def test_resume_reads_nothing_before_the_cursor(clean, monkeypatch):
    reads: list[tuple[int, int]] = []
    orig = ShardReader.read

    def spy(self, shard, pos):
        reads.append((shard, pos))
        return orig(self, shard, pos)

    monkeypatch.setattr(ShardReader, "read", spy)
    first = _loader(clean, workers=0)
    state = {**first.state_dict(), "cursor": 20}
    resumed = _loader(clean, workers=0)
    resumed.load_state_dict(state)
    batches = rank_batches(clean.counts, first.spec, 0, 0)
    list(resumed)
    shard, pos = clean.locate(batches[:20].ravel())
    consumed = set(zip(shard.tolist(), pos.tolist()))
    assert reads and not consumed & set(reads)


def test_changed_world_size_mid_epoch_is_refused_with_reason(clean):
    a = _loader(clean, world=1)
    it = iter(a)
    next(it)
    b = _loader(clean, world=2, rank=0)
    with pytest.raises(ValueError, match="mid-epoch .* resume with the same values"):
        b.load_state_dict(a.state_dict())


BAD = {3: "undecodable_image", 50: "missing_caption", 51: "empty_caption",
       200: "missing_image"}


def test_bad_samples_are_skipped_counted_and_logged_once(tmp_path, caplog):
    m = make_dataset(tmp_path, SIZES, bad=BAD)
    truncate(m.urls[-1], 0.5)  # the last shard (71 samples) is cut in the middle
    loader = _loader(m)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    ids = np.concatenate([b.ids.numpy() for b in batches])
    assert len(batches) == len(loader)  # skips never change the number of batches
    assert not set(BAD) & set(ids.tolist())
    counts = dict(loader.skipped)
    used = set(rank_batches(m.counts, loader.spec, 0, 0).ravel().tolist())
    for i, kind in BAD.items():
        if i in used:
            assert counts.get(kind, 0) == 1
    assert counts.get("truncated", 0) > 10  # about half of the last shard
    assert all(b.images.shape[0] == len(b.ids) == len(b.captions) for b in batches)
    logged = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(logged) == sum(counts.values())  # once per bad sample
    assert any("shard-000000.tar" in s and "000000003" in s for s in logged)
    list(loader)  # the next epoch hits the same bad samples: counted again, not logged
    assert sum(loader.skipped.values()) > sum(counts.values())
    assert len([r for r in caplog.records if "skipped sample" in r.getMessage()]) == len(logged)


def test_manifest_that_disagrees_with_a_shard_fails_naming_it(tmp_path):
    m = make_dataset(tmp_path, SIZES)
    wrong = Manifest(m.urls, m.counts + np.array([0, 1, 0, 0, 0, 0, 0]))
    with pytest.raises(ManifestError, match=r"manifest says .*shard-000001\.tar has 121 "
                                            r"samples, found 120"):
        list(_loader(wrong))


def test_manifest_from_headers_equals_stats_and_round_trips(tmp_path):
    m = make_dataset(tmp_path, SIZES)
    from_tar = Manifest.from_tars(list(m.urls))
    from_stats = Manifest.from_stats(list(m.urls))
    assert from_tar.counts.tolist() == from_stats.counts.tolist() == SIZES
    loaded = Manifest.load(str(Path(tmp_path) / "manifest.json"))
    assert loaded.urls == m.urls and loaded.fingerprint() == m.fingerprint()


def _rp_epoch_ids(ctx, manifest_path: str, workers: int):
    import torch.distributed as dist

    m = Manifest.load(manifest_path)
    loader = WebDatasetLoader(m, rank=dist.get_rank(), world_size=dist.get_world_size(),
                              batch_size=16, seed=7, preprocess=PRE, num_workers=workers)
    batches = [b.ids.tolist() for b in loader]
    return batches, dict(loader.skipped)


@pytest.mark.multirank
def test_exactly_once_with_two_rank_processes_of_two_workers(tmp_path, pools):
    m = make_dataset(tmp_path, SIZES, bad=BAD)
    out = pools(2).run(_rp_epoch_ids, str(tmp_path / "manifest.json"), 2)
    (b0, s0), (b1, s1) = out
    assert len(b0) == len(b1) == 420 // 32  # same number of batches on both ranks
    seen = [i for b in b0 + b1 for i in b]
    assert len(seen) == len(set(seen))  # nothing twice
    skipped = sum(s0.values()) + sum(s1.values())
    assert len(seen) + skipped == (420 // 32) * 32  # every sample of the epoch, once
    spec = OrderSpec(seed=7, world_size=2, batch_size=16, window=4)
    epoch = np.concatenate([rank_batches(m.counts, spec, 0, r).ravel() for r in (0, 1)])
    assert set(seen) == set(epoch.tolist()) - set(BAD)


def test_shards_behind_an_fsspec_url_load_like_local_ones(clean):
    import fsspec

    fs = fsspec.filesystem("memory")
    urls = []
    for u in clean.urls:
        dst = f"memory://loader-test/{Path(u).name}"
        fs.pipe(dst, Path(u).read_bytes())
        urls.append(dst)
    remote = Manifest(tuple(urls), clean.counts)
    assert Manifest.from_tars(urls).counts.tolist() == SIZES
    # memory:// lives in this process only (workers are fresh processes): read in-process
    assert _ids(_loader(remote, workers=0)) == _ids(_loader(clean, workers=0))
    # a URL that worker processes open themselves
    by_url = Manifest(tuple(f"file://{u}" for u in clean.urls), clean.counts)
    assert _ids(_loader(by_url, workers=2)) == _ids(_loader(clean, workers=0))


def test_random_augmentation_is_a_function_of_the_sample_not_the_worker(clean):
    aug = T.Compose([T.RandomResizedCrop(8, scale=(0.3, 1.0)), T.ToTensor()])

    def images(workers, cursor=0):
        ld = WebDatasetLoader(clean, rank=0, world_size=1, batch_size=16, seed=7,
                              preprocess=aug, num_workers=workers)
        ld.cursor = cursor
        return [b.images for b in ld]

    a, b = images(0), images(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a[5:], images(2, cursor=5)))
