"""Decoding JPEGs on the training device (data.decode=device), here with the CPU as the
device: torchvision's decode_jpeg takes the same code path on CPU as on CUDA (where it
runs nvJPEG; the CUDA test runs where a GPU is). The same crops as the workers' path
(within a grey level of its full-size decode), the same order, augmentation by sample and
resume; images the device path does not take decoded by the workers; a JPEG the device
rejects decoded on the host from the same box; one nothing reads dropped together with
its id, caption and tokens."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dissect_dist.data import WebDatasetLoader
from dissect_dist.data.decode import ImagePlan
from tests.test_data_fast import EVAL, TRAIN, _sof_patched, _tok, jpeg, photo, write_set

# EXIF orientation -> the transpose that stores an upright picture that way
_TO_STORED = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
              6: "ROTATE_90", 7: "TRANSVERSE", 8: "ROTATE_270"}


def _loader(m, decode, *, workers=0, plan=None, bs=8, tok=None):
    return WebDatasetLoader(m, rank=0, world_size=1, batch_size=bs, seed=5,
                            preprocess=plan or ImagePlan.from_transform(TRAIN), tokenizer=tok,
                            num_workers=workers, shuffle_window=2, decode=decode)


def _decoded(b, device="cpu") -> torch.Tensor:
    """The batch's uint8 images after decoding on `device` (images_on decodes once; the
    batch then holds them)."""
    b.images_on(device, torch.float32)
    assert b.encoded is None and b.images.device.type == torch.device(device).type
    return b.images


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Within two grey levels everywhere, and equal almost everywhere (the device resizes
    in float32, the workers in 8-bit fixed point)."""
    d = (a.int() - b.int()).abs()
    assert a.shape == b.shape and d.max() <= 2 and d.float().mean() < 0.02, \
        (d.max(), d.float().mean())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    pics = [photo(i, 300 + 7 * i, 200 + 5 * i) for i in range(24)]
    pics[3], pics[9] = pics[3].convert("L"), pics[9].convert("L")  # greyscale JPEGs too
    return write_set(root, [jpeg(p, progressive=i % 4 == 1) for i, p in enumerate(pics)],
                     [f"a picture number {i}" for i in range(24)])


@pytest.mark.parametrize("transform", [TRAIN, EVAL], ids=["train", "eval"])
@pytest.mark.parametrize("workers", [0, 2])
def test_the_device_decodes_the_workers_crops(photos, transform, workers):
    """Against the workers' path at full size (draft off): the same boxes from the same
    RNG draws, so the pixels agree to a grey level; a box drawn differently would be tens
    of levels off on these pictures."""
    plan = ImagePlan.from_transform(transform)
    host = list(_loader(photos, "workers", plan=ImagePlan.from_transform(transform, draft=False)))
    dev = list(_loader(photos, "device", workers=workers, plan=plan, tok=_tok()))
    assert [b.ids.tolist() for b in host] == [b.ids.tolist() for b in dev]
    for h, d in zip(host, dev):
        assert d.jobs is not None and len(d.jobs) == len(d.ids) and len(d.host_rows) == 0
        got = d.images_on("cpu", torch.float32)
        _close(d.images, h.images)
        assert torch.equal(got, plan.normalize(d.images, "cpu"))
        assert torch.equal(d.images_on("cpu", torch.float32), got)  # decoded once
        assert d.texts.shape == (len(d.ids), 77)


def test_device_decoding_resumes_to_the_uninterrupted_batches(photos):
    whole = [(b.ids.tolist(), _decoded(b)) for b in _loader(photos, "device")]
    first = _loader(photos, "device")
    it = iter(first)
    head = [next(it).ids.tolist() for _ in range(2)]
    resumed = _loader(photos, "device", workers=2)
    resumed.load_state_dict(first.state_dict())
    tail = [(b.ids.tolist(), _decoded(b)) for b in resumed]
    assert head + [t[0] for t in tail] == [w[0] for w in whole]
    assert all(torch.equal(t[1], w[1]) for t, w in zip(tail, whole[2:]))


def test_exif_orientations_are_applied_on_the_device(tmp_path):
    upright = photo(7, 403, 301)
    data = []
    for o, name in sorted(_TO_STORED.items()):
        exif = Image.Exif()
        exif[0x0112] = o
        data.append(jpeg(upright.transpose(getattr(Image.Transpose, name)), exif=exif.tobytes()))
    m = write_set(tmp_path / "d", data, [f"o{o}" for o in sorted(_TO_STORED)])
    for transform in (TRAIN, EVAL):
        host = next(iter(_loader(m, "workers", bs=7,
                                 plan=ImagePlan.from_transform(transform, draft=False))))
        dev = next(iter(_loader(m, "device", bs=7, plan=ImagePlan.from_transform(transform))))
        assert dev.captions == host.captions
        assert sorted(dev.jobs[:, 7].tolist()) == sorted(_TO_STORED)
        _close(_decoded(dev), host.images)


def test_images_the_device_does_not_take_are_decoded_by_the_workers(tmp_path):
    cmyk = jpeg(photo(8).convert("CMYK"))
    buf = io.BytesIO()
    photo(10).save(buf, format="PNG")
    bomb = _sof_patched(jpeg(photo(9)), 10000, 10000)
    m = write_set(tmp_path / "d", [jpeg(photo(11)), cmyk, buf.getvalue(), bomb, jpeg(photo(12))],
                  ["rgb", "cmyk", "png", "bomb", "rgb2"])
    plan = ImagePlan.from_transform(TRAIN)
    host_loader, dev_loader = _loader(m, "workers", bs=5), _loader(m, "device", bs=5, plan=plan)
    host, dev = next(iter(host_loader)), next(iter(dev_loader))
    assert dev.captions == host.captions and set(dev.captions) == {"rgb", "cmyk", "png", "rgb2"}
    assert host_loader.skipped == dev_loader.skipped == {"too_many_pixels": 1}
    on_host = sorted(dev.captions[r] for r in dev.host_rows)
    assert on_host == ["cmyk", "png"] and len(dev.jobs) == 2
    rows = dev.host_rows.tolist()
    got = _decoded(dev)
    for r in rows:  # the workers' own decode, bit for bit
        assert torch.equal(got[r], host.images[r])


def test_a_jpeg_the_device_rejects_goes_to_the_host_and_one_nothing_reads_is_dropped(
        tmp_path, monkeypatch):
    import torchvision.io

    rejected, good = jpeg(photo(13)), jpeg(photo(14))
    truncated = good[:len(good) // 2]  # its header reads; its pixels do not
    m = write_set(tmp_path / "d", [jpeg(photo(15)), rejected, truncated, jpeg(photo(16))],
                  ["first", "rejected", "truncated", "last"])
    orig = torchvision.io.decode_jpeg

    def picky(data, *a, **kw):  # a device decoder that fails on one valid JPEG
        if any(bytes(d.numpy()) == rejected for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpegDecode failed")
        return orig(data, *a, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    host = next(iter(_loader(m, "workers", bs=4,
                             plan=ImagePlan.from_transform(TRAIN, draft=False))))
    assert sorted(host.captions) == ["first", "last", "rejected"]
    loader = _loader(m, "device", bs=4, tok=_tok())
    dev = next(iter(loader))
    assert len(dev.ids) == 4 and len(dev.jobs) == 4  # every header read
    texts_before = {c: t for c, t in zip(dev.captions, dev.texts)}
    got = _decoded(dev)
    assert got.shape[0] == len(dev.ids) == len(dev.captions) == dev.texts.shape[0] == 3
    assert dev.ids.tolist() == host.ids.tolist() and dev.captions == host.captions
    assert all(torch.equal(t, texts_before[c]) for c, t in zip(dev.captions, dev.texts))
    assert loader.retried == {"device_decode_retry": 1}
    assert loader.skipped == {"undecodable_image": 1}
    i = dev.captions.index("rejected")  # decoded by PIL on the host: the workers' pixels
    assert torch.equal(got[i], host.images[i])
    for c in ("first", "last"):
        j = dev.captions.index(c)
        _close(got[j:j + 1], host.images[j:j + 1])


def test_device_decoding_needs_the_fast_path_and_a_known_mode(photos):
    import torchvision.transforms as T

    with pytest.raises(ValueError, match="decode='device' needs an ImagePlan"):
        _loader(photos, "device", plan=TRAIN)
    with pytest.raises(ValueError, match="decode='gpu': choose"):
        _loader(photos, "gpu")
    with pytest.raises(ValueError, match="resampling 'exact': use decode='workers'"):
        _loader(photos, "device", plan=ImagePlan.from_transform(TRAIN, resampling="exact"))
    lanczos = T.Compose([T.RandomResizedCrop(64, interpolation=T.InterpolationMode.LANCZOS),
                         T.ToTensor()])
    with pytest.raises(ValueError, match="PIL filter 1 and resampling 'fast'"):
        _loader(photos, "device", plan=ImagePlan.from_transform(lanczos))


def test_a_batch_with_nothing_left_to_the_device_is_the_workers_batch(tmp_path):
    pngs = []
    for i in range(4):
        buf = io.BytesIO()
        photo(20 + i).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    m = write_set(tmp_path / "d", pngs, [f"png {i}" for i in range(4)])
    host = next(iter(_loader(m, "workers", bs=4)))
    dev = next(iter(_loader(m, "device", bs=4, workers=2)))  # an empty buffer from a worker
    assert len(dev.jobs) == 0 and sorted(dev.host_rows.tolist()) == [0, 1, 2, 3]
    assert torch.equal(_decoded(dev), host.images)


def test_decoding_in_chunks_gives_the_same_batch(photos, monkeypatch):
    from dissect_dist.data import loader as loader_mod

    whole = [_decoded(b) for b in _loader(photos, "device")]
    calls = []
    orig = loader_mod.Batch._decode_chunk

    def spy(self, jobs, *a):
        calls.append(len(jobs))
        return orig(self, jobs, *a)

    monkeypatch.setattr(loader_mod, "_DEVICE_DECODE_PIXELS", 150_000)  # ~2 of these a chunk
    monkeypatch.setattr(loader_mod.Batch, "_decode_chunk", spy)
    chunked = [_decoded(b) for b in _loader(photos, "device")]
    assert max(calls) <= 3 and sum(calls) == sum(len(x) for x in whole)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_a_decoder_that_fails_on_everything_stops_with_the_way_out(photos, monkeypatch):
    import torchvision.io

    def broken(*a, **kw):
        raise RuntimeError("Couldn't load the image extension")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    b = next(iter(_loader(photos, "device")))
    with pytest.raises(RuntimeError, match="failed for every one of them .* data.decode=workers"):
        b.images_on("cpu", torch.float32)


def test_an_image_decoded_at_another_size_than_its_header_goes_to_the_host(photos, monkeypatch):
    import torchvision.io

    orig = torchvision.io.decode_jpeg

    def shrinks_the_first(data, *a, **kw):
        out = orig(data, *a, **kw)
        out[0] = out[0][:, :-8]
        return out

    host = next(iter(_loader(photos, "workers", plan=ImagePlan.from_transform(TRAIN,
                                                                             draft=False))))
    monkeypatch.setattr(torchvision.io, "decode_jpeg", shrinks_the_first)
    loader = _loader(photos, "device")
    got = _decoded(next(iter(loader)))
    assert loader.retried == {"device_decode_retry": 1} and not loader.skipped
    assert torch.equal(got[0], host.images[0])  # the host's full-size decode of that box


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_on_the_gpu_is_close_to_the_workers(photos, tmp_path):
    """nvJPEG's IDCT and upsampling are not libjpeg's: a looser bound than on the CPU.
    Also EXIF-rotated, CMYK (host) and truncated (dropped) JPEGs through nvJPEG."""
    host = list(_loader(photos, "workers", plan=ImagePlan.from_transform(TRAIN, draft=False)))
    dev = list(_loader(photos, "device"))
    for h, d in zip(host, dev):
        got = _decoded(d, "cuda").cpu()
        diff = (got.int() - h.images.int()).abs().float()
        assert diff.mean() < 1.5, diff.mean()
    upright, good = photo(7, 403, 301), jpeg(photo(14))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    m = write_set(tmp_path / "d", [rotated, jpeg(photo(8).convert("CMYK")),
                                   good[:len(good) // 2], jpeg(photo(15))],
                  ["rotated", "cmyk", "truncated", "plain"])
    want = next(iter(_loader(m, "workers", bs=4,
                             plan=ImagePlan.from_transform(TRAIN, draft=False))))
    loader = _loader(m, "device", bs=4)
    b = next(iter(loader))
    assert [b.captions[r] for r in b.host_rows] == ["cmyk"]
    got = dict(zip(b.captions, _decoded(b, "cuda").cpu()))
    assert len(got) == len(b.ids) == len(b.texts)
    # nvJPEG either rejects the truncated stream (dropped and counted) or fills its tail
    assert loader.skipped == {"undecodable_image": 1} or "truncated" in got
    assert set(got) - {"truncated"} == set(want.captions) == {"rotated", "cmyk", "plain"}
    for c, w in zip(want.captions, want.images):
        if c != "cmyk":  # the host's rows were decoded at reduced scale, `want` at full
            assert (got[c].float() - w.float()).abs().mean() < 1.5, c


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_never_writes_into_memory_that_queued_kernels_still_read(photos):
    """Reads of small tensors queued behind a long matmul chain, the tensors freed, then a
    decode: its outputs (a few hundred KB each, the allocator's small pool, like the
    freed tensors) must not be written before those reads ran. Not yet run on a GPU:
    a device session should also see it fail with the synchronisation in
    Batch._decode_on removed."""
    dev = torch.device("cuda")
    for b in _loader(photos, "device"):
        big = torch.randn(4096, 4096, device=dev)
        for _ in range(30):  # tens of ms of queued work ahead of the reads
            big = big @ big / 64.0
        small = [torch.full((3, 240, 320), 7, dtype=torch.uint8, device=dev) for _ in range(32)]
        acc = torch.zeros((), dtype=torch.int64, device=dev)
        for t in small:
            acc += t.sum(dtype=torch.int64)
        del small, t
        _decoded(b, "cuda")
        assert int(acc) == 32 * 7 * 3 * 240 * 320


@pytest.mark.multirank
@pytest.mark.slow
def test_the_trainer_decodes_on_the_device_under_bf16_zero1(tmp_path):
    """2 CPU ranks through DeepSpeed's launcher, bf16 with ZeRO-1, data.decode=device: a
    JPEG whose pixels cannot be read is dropped from its rank's batch on the device, and
    the step goes on with the rest (ids, tokens and images still aligned)."""
    from tests.test_trainer import _args, _metrics, _run, _steps

    good = [jpeg(photo(i, 300 + 7 * i, 200 + 5 * i)) for i in range(32)]
    bad = 11
    good[bad] = good[bad][:len(good[bad]) // 2]
    m = write_set(tmp_path / "d", good, [f"a picture number {i}" for i in range(32)])
    run = tmp_path / "run"
    assert m.total == 32
    out = _run(_args(tmp_path / "unused", run, f"data.train_manifest={tmp_path}/d/manifest.json",
                     "data.noise_ledger=null", "data.zeroshot_dir=null", "data.batch_size=8",
                     "data.resampling=fast", "data.decode=device", "model.precision=bf16",
                     "train.zero_stage=1", "train.epochs=1", "train.record_samples=true"))
    assert f"skipped sample id {bad} (decoded on the training device): undecodable_image" in out
    seen = np.concatenate([s["ids"] for s in _steps(run)])
    assert sorted(seen.tolist()) == [i for i in range(32) if i != bad]
    losses = [r["loss"] for r in _metrics(run) if r["kind"] == "train"]
    assert losses and all(np.isfinite(losses))
