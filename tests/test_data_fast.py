"""The JPEG fast path: the same crops as the full-size transform, images close to it
(bit-identical without reduced decoding under exact resampling, within one grey level
under the fast one), normalisation on the device bit-identical to
ToTensor + Normalize, captions tokenised once and refused under another tokenizer, and
bad input (reduced decoding rejected, CMYK, 16-bit, EXIF rotation, decompression bomb,
over-long caption) handled."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from dissect_dist.data import Manifest, WebDatasetLoader
from dissect_dist.data.builders import ShardWriter
from dissect_dist.data.decode import ImagePlan, PlanError
from dissect_dist.data.order import rank_batches
from dissect_dist.data.tokens import TokenCache, TokenizerMismatch

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
BIC = T.InterpolationMode.BICUBIC
TRAIN = T.Compose([T.RandomResizedCrop(64, scale=(0.5, 1.0), interpolation=BIC), T.ToTensor(),
                   T.Normalize(MEAN, STD)])
EVAL = T.Compose([T.Resize(64, interpolation=BIC), T.CenterCrop(64), T.ToTensor(),
                  T.Normalize(MEAN, STD)])


def photo(seed: int, w: int = 400, h: int = 300) -> Image.Image:
    """A smooth random picture (JPEG-friendly, like a photograph)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def full(transform, data: bytes) -> torch.Tensor:
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))


# Mean absolute difference from the full-size transform, in normalised units, allowed
# with reduced decoding: the same region resampled from fewer pixels (measured <= 0.015 on
# these pictures); the fast resampling also rounds the box to whole decoded pixels, its
# edges moving by up to half an output pixel, which on these high-frequency pictures
# costs up to ~0.13 (a box off by a whole decoded pixel: ~0.15-0.2).
CLOSE = {"exact": 0.02, "fast": 0.15}


@pytest.mark.parametrize("resampling", ["exact", "fast"])
def test_crop_boxes_are_the_same_with_and_without_reduced_decoding(monkeypatch, resampling):
    data = jpeg(photo(0))
    plan = ImagePlan.from_transform(TRAIN, resampling=resampling)
    scales = []
    orig = JpegImageFile.draft

    def spy(self, mode, size):
        scales.append(self.size[0] // size[0])
        return orig(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    for seed in range(20):
        torch.manual_seed(seed)
        ours = plan._box(300, 400)
        torch.manual_seed(seed)
        i, j, h, w = T.RandomResizedCrop.get_params(Image.new("RGB", (400, 300)), [0.5, 1.0],
                                                    [3 / 4, 4 / 3])
        assert ours == (j, i, j + w, i + h)
        torch.manual_seed(seed)
        got = plan.normalize(plan.decode(data)[None], "cpu")[0]
        torch.manual_seed(seed)
        want = full(TRAIN, data)
        assert (got - want).abs().mean() < CLOSE[resampling], seed
    assert max(scales) >= 2  # reduced decoding did happen


@pytest.mark.parametrize("scale, ratio", [((0.9, 1.0), (3 / 4, 4 / 3)),
                                          ((0.08, 1.0), (3 / 4, 4 / 3)),
                                          ((0.5, 1.0), (1.0, 1.0)), ((0.9, 1.0), (0.5, 2.0))])
def test_boxes_equal_torchvisions_where_no_try_can_fit_too(scale, ratio):
    """Where none of RandomResizedCrop's ten tries can fit, the plan skips the draws and
    takes torchvision's central-crop fallback: the same box as get_params, for images of
    every size and aspect (open_clip's scale 0.9-1 skips most of them)."""
    plan = ImagePlan.from_transform(T.Compose([T.RandomResizedCrop(64, scale=scale, ratio=ratio),
                                               T.ToTensor()]))
    g = np.random.default_rng(1)
    skipped = 0
    for k in range(600):
        h = int(g.integers(1, 1500))
        w = int(h * g.uniform(0.9, 1.5)) + 1 if k % 2 else int(g.integers(1, 1500))
        skipped += not plan._a_try_can_fit(h, w)
        torch.manual_seed(k)
        ours = plan._box(h, w)
        torch.manual_seed(k)
        i, j, bh, bw = T.RandomResizedCrop.get_params(torch.empty(1).expand(3, h, w),
                                                      list(scale), list(ratio))
        assert ours == (j, i, j + bw, i + bh), (h, w)
    if scale[0] >= 0.9:  # the shortcut is exercised, not only the draws
        assert skipped > 100, skipped


def test_without_reduced_decoding_exact_resampling_is_bit_identical_to_the_transform():
    data = jpeg(photo(1))
    for transform in (TRAIN, EVAL):
        plan = ImagePlan.from_transform(transform, draft=False, resampling="exact")
        torch.manual_seed(3)
        got = plan.normalize(plan.decode(data)[None], "cpu")[0]
        torch.manual_seed(3)
        assert torch.equal(got, full(transform, data))


def _grey_levels(x: torch.Tensor) -> torch.Tensor:
    """A normalised image back to 0..255 grey levels (float)."""
    return (x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]) * 255


@pytest.mark.parametrize("size", [(400, 300), (90, 70), (50, 40)])  # shrinking; enlarging
def test_fast_resampling_is_within_one_grey_level_of_the_transform(size):
    """Without reduced decoding, torch's antialiased kernels against PIL's resize in the
    transform itself: the same box, at most one grey level apart, almost all equal."""
    data = jpeg(photo(4, *size))
    for transform in (TRAIN, EVAL):
        plan = ImagePlan.from_transform(transform, draft=False)
        assert plan.resampling == "fast"
        for seed in range(5):
            torch.manual_seed(seed)
            got = plan.decode(data)
            torch.manual_seed(seed)
            want = _grey_levels(full(transform, data))
            diff = (got.float() - want).abs()
            assert diff.max() < 1.0 + 1e-3 and (diff > 0.5).float().mean() < 0.05, \
                (transform, seed, diff.max(), (diff > 0.5).float().mean())


# EXIF orientation -> the transpose that makes a stored picture from an upright one (the
# inverse of what a viewer applies to show it)
_TO_STORED = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
              6: "ROTATE_90", 7: "TRANSVERSE", 8: "ROTATE_270"}


@pytest.mark.parametrize("resampling", ["exact", "fast"])
@pytest.mark.parametrize("orientation", sorted(_TO_STORED))
def test_exif_oriented_jpegs_at_reduced_scale_crop_the_same_region(orientation, resampling):
    """Sides that are not multiples of the DCT scale (403 x 301): after a mirror or
    rotation the partial last decoded pixel comes first, and the box must account for it."""
    upright = photo(7, 403, 301)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(getattr(Image.Transpose, _TO_STORED[orientation]))
    data = jpeg(stored, exif=exif.tobytes())
    plain = jpeg(upright)  # the same picture stored upright, decoded at full size
    for transform in (TRAIN, EVAL):
        plan = ImagePlan.from_transform(transform, resampling=resampling)
        for seed in range(4):
            torch.manual_seed(seed)
            got = plan.normalize(plan.decode(data)[None], "cpu")[0]
            torch.manual_seed(seed)
            assert (got - full(transform, plain)).abs().mean() < CLOSE[resampling], (
                transform, seed)


def test_an_unknown_resampling_is_refused_by_name():
    with pytest.raises(PlanError, match="resampling='nearest'"):
        ImagePlan.from_transform(TRAIN, resampling="nearest")  # type: ignore[arg-type]


def test_eval_plan_is_close_to_resize_and_center_crop():
    data = jpeg(photo(2, 500, 350))
    plan = ImagePlan.from_transform(EVAL)
    got = plan.normalize(plan.decode(data)[None], "cpu")[0]
    assert got.shape == (3, 64, 64)
    assert (got - full(EVAL, data)).abs().mean() < 0.05


def test_device_normalisation_is_bit_identical_to_totensor_normalize():
    """Both lookups, the CPU's (numpy) and the one other devices run (torch), here on CPU
    tensors; on a GPU the test below runs it on the GPU."""
    from dissect_dist.data.decode import _lookup_numpy, _lookup_torch

    arr = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    arr[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]  # the ends of the table
    want = T.Normalize(MEAN, STD)(T.ToTensor()(Image.fromarray(arr)))
    plan = ImagePlan.from_transform(EVAL)
    u8 = torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None]
    assert torch.equal(_lookup_numpy(u8, plan.table())[0], want)
    assert torch.equal(_lookup_torch(u8, plan.table())[0], want)
    assert torch.equal(_lookup_torch(u8, plan.table().to(torch.bfloat16))[0],
                       want.to(torch.bfloat16))
    assert torch.equal(plan.normalize(u8, "cpu", torch.float32)[0], want)
    assert torch.equal(plan.normalize(u8, "cpu", torch.bfloat16)[0], want.to(torch.bfloat16))
    channels_last = u8.contiguous(memory_format=torch.channels_last)  # any strides
    assert torch.equal(plan.normalize(channels_last, "cpu")[0], want)
    with pytest.raises(TypeError, match="uint8"):
        plan.normalize(u8.float(), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_normalisation_is_bit_identical_to_totensor_normalize():
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    want = T.Normalize(MEAN, STD)(T.ToTensor()(Image.fromarray(arr)))
    u8 = torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None]
    got = ImagePlan.from_transform(EVAL).normalize(u8, "cuda", torch.float32)
    assert torch.equal(got[0].cpu(), want)


def test_a_transform_step_the_plan_cannot_reproduce_is_refused_by_name():
    with pytest.raises(PlanError, match="ColorJitter"):
        ImagePlan.from_transform(T.Compose([T.RandomResizedCrop(8), T.ColorJitter(0.1),
                                            T.ToTensor()]))
    with pytest.raises(PlanError, match="shorter side alone"):  # not square: not batchable
        ImagePlan.from_transform(T.Compose([T.Resize(8), T.ToTensor()]))
    assert ImagePlan.from_transform(T.Compose([T.Resize((8, 12)), T.ToTensor()])).size == (8, 12)


# ------------------------------------------------------------------ through the loader
def _tok():
    import open_clip

    return open_clip.get_tokenizer("RN50")


def write_set(root: Path, images: list[bytes], captions: list[str], ext: str = "jpg",
              shard_size: int = 10) -> Manifest:
    w = ShardWriter(root, shard_size)
    for data, cap in zip(images, captions):
        w.write(data, ext, cap, {})
    return w.finish()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Manifest:
    root = tmp_path_factory.mktemp("photos")
    return write_set(root, [jpeg(photo(i, 300 + 7 * i, 200 + 5 * i)) for i in range(40)],
                     [f"a picture number {i}" for i in range(40)])


def _loader(m, workers=0, token_cache=None, tok=None, plan=None, bs=8):
    return WebDatasetLoader(m, rank=0, world_size=1, batch_size=bs, seed=5,
                            preprocess=plan or ImagePlan.from_transform(TRAIN), tokenizer=tok,
                            num_workers=workers, shuffle_window=2, token_cache=token_cache)


def test_fast_loader_keeps_the_order_and_augments_by_sample_whatever_the_workers(photos):
    a, b = list(_loader(photos, workers=0)), list(_loader(photos, workers=2))
    assert [x.ids.tolist() for x in a] == rank_batches(photos.counts, _loader(photos).spec,
                                                        0, 0).tolist()
    assert [x.ids.tolist() for x in a] == [x.ids.tolist() for x in b]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert a[0].images.dtype == torch.uint8 and a[0].images.shape[1:] == (3, 64, 64)
    x = a[0].images_on("cpu", torch.float32)
    assert x.dtype == torch.float32 and -3 < float(x.min()) < float(x.max()) < 3


def test_fast_loader_resume_equals_uninterrupted(photos):
    whole = [(x.ids.tolist(), x.images) for x in _loader(photos)]
    first = _loader(photos)
    it = iter(first)
    head = [next(it).ids.tolist() for _ in range(2)]
    resumed = _loader(photos)
    resumed.load_state_dict(first.state_dict())
    tail = [(x.ids.tolist(), x.images) for x in resumed]
    assert head + [t[0] for t in tail] == [w[0] for w in whole]
    assert all(torch.equal(t[1], w[1]) for t, w in zip(tail, whole[2:]))


def test_captions_are_tokenised_once_and_equal_the_tokenizer(photos, tmp_path):
    tok = _tok()
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return tok(texts)

    cache = str(tmp_path / "tok")
    epoch0 = list(_loader(photos, token_cache=cache, tok=counting))
    for b in epoch0:
        assert torch.equal(b.texts, tok(b.captions))
    n = len(calls)
    assert sum(calls[-len(photos.urls):]) == photos.total  # one call per shard, whole shard
    list(_loader(photos, token_cache=cache, tok=counting))  # another run over the same cache
    assert len(calls) == n + 1  # only the identity probe: nothing tokenised again


def test_a_token_cache_built_with_another_tokenizer_is_refused(photos, tmp_path):
    cache = str(tmp_path / "tok")
    list(_loader(photos, token_cache=cache, tok=_tok()))

    def other(texts):
        return torch.zeros(len(texts), 77, dtype=torch.long)

    with pytest.raises(TokenizerMismatch, match="another directory"):
        _loader(photos, token_cache=cache, tok=other)
    with pytest.raises(TokenizerMismatch):
        TokenCache(cache, other)


def test_a_caption_longer_than_the_context_is_truncated_as_the_tokenizer_does(tmp_path):
    tok = _tok()
    long = " ".join(f"word{i}" for i in range(300))
    m = write_set(tmp_path / "d", [jpeg(photo(i)) for i in range(4)], [long] * 4)
    b = next(iter(_loader(m, token_cache=str(tmp_path / "tok"), tok=tok, bs=4)))
    assert b.texts.shape == (4, 77) and torch.equal(b.texts, tok([long] * 4))
    assert int(b.texts[0, -1]) == tok.eot_token_id


# ------------------------------------------------------------------ bad input
def test_a_jpeg_that_reduced_decoding_rejects_is_decoded_at_full_size(photos, monkeypatch):
    orig = ImagePlan.decode

    def picky(self, data, out=None):
        if self.draft:
            raise OSError("broken data stream when reading image file")
        return orig(self, data, out)

    want = list(_loader(photos, plan=ImagePlan.from_transform(TRAIN, draft=False)))
    monkeypatch.setattr(ImagePlan, "decode", picky)
    loader = _loader(photos)
    got = list(loader)
    assert all(torch.equal(g.images, w.images) for g, w in zip(got, want))  # same crops
    assert loader.retried["full_size_retry"] == photos.total and not loader.skipped


def test_retries_are_all_counted_but_only_the_first_ones_logged(photos, monkeypatch, caplog):
    """A retry can be systematic (every JPEG of a kind): 40 here, 20 logged one by one,
    then one line; loader.retried counts them all."""
    orig = ImagePlan.decode

    def picky(self, data, out=None):
        if self.draft:
            raise OSError("broken data stream when reading image file")
        return orig(self, data, out)

    monkeypatch.setattr(ImagePlan, "decode", picky)
    loader = _loader(photos)
    with caplog.at_level("WARNING", logger="dissect_dist.data.loader"):
        list(loader)
    lines = [r.getMessage() for r in caplog.records]
    assert loader.retried["full_size_retry"] == photos.total == 40
    assert sum("reduced-size JPEG decoding failed" in x for x in lines) == 20
    assert sum("no longer logged one by one" in x for x in lines) == 1


def _sof_patched(data: bytes, w: int, h: int) -> bytes:
    """The JPEG with its frame header claiming w x h (a decompression bomb's header)."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 9:]


def test_cmyk_16bit_exif_rotated_bomb_each_handled(tmp_path):
    upright = photo(7, 200, 360)
    cmyk = jpeg(photo(8).convert("CMYK"))
    arr16 = (np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, format="PNG")  # a 16-bit greyscale PNG
    png16 = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: show after a 270-degree turn
    rotated = jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    bomb = _sof_patched(jpeg(photo(9)), 10000, 10000)
    m = write_set(tmp_path / "d", [cmyk, png16, rotated, bomb], ["cmyk", "sixteen", "rot", "bomb"],
                  ext="jpg")
    # the PNG travels under .jpg here; PIL reads by content
    plan = ImagePlan.from_transform(EVAL)
    loader = _loader(m, plan=plan, bs=4)
    b = next(iter(loader))
    by = dict(zip(b.captions, b.images))
    assert set(by) == {"cmyk", "sixteen", "rot"}
    assert loader.skipped == {"too_many_pixels": 1}
    # 16-bit: a full-range ramp, not clipped to white
    assert 80 < float(by["sixteen"].float().mean()) < 175
    # EXIF: the picture as shown upright, close to decoding the upright JPEG
    want = plan.decode(jpeg(upright)).float()
    assert (by["rot"].float() - want).abs().mean() < 6
    stored = plan.decode(jpeg(upright.transpose(Image.Transpose.ROTATE_90))).float()
    assert (by["rot"].float() - stored).abs().mean() > 4 * (by["rot"].float() - want).abs().mean()
