"""The image fast path: a torchvision/open_clip transform compiled into an `ImagePlan`
that decodes each JPEG at the smallest DCT scale that still covers the output, crops
and resizes it (torch's vectorised kernels, or PIL's), and returns uint8 (3, H, W)
tensors; the float conversion and normalisation run on the training device
(`ImagePlan.normalize`).

Why the crop distribution is unchanged. RandomResizedCrop draws its box (top, left,
height, width) from the image's height and width only, through torch's global RNG.
The plan reads the full-size geometry from the JPEG header (after the EXIF orientation,
which only swaps the two sides) before anything is decoded, seeds nothing itself, and
calls torchvision's own `RandomResizedCrop.get_params` with that geometry: the same
draws from the same RNG state give the same box, sample by sample, with or without
reduced decoding. Only then is the decode scale chosen, as the largest s in
{8, 4, 2, 1} with box height / s >= output height and box width / s >= output width;
libjpeg's DCT scaling at 1/s maps full-size coordinate x to x / s, so the box is
divided by s and the crop's content is the same region of the photograph, resampled
from fewer source pixels (never fewer than the output has: the resize still only
shrinks).

How the crop is resampled (`resampling`). "exact": PIL's own resize of the exact (fractional)
box, as the transform does: at s = 1 the pixels are bit-identical to the full-decode
transform. "fast" (the default): torch's antialiased uint8 resampling
(`F.interpolate(..., antialias=True)`, whose kernels are PIL's bilinear and bicubic,
vectorised: ~6x faster than PIL's on a 400 px crop), at most 1 grey level from PIL's
result (tests), on the box rounded to whole pixels of the decoded image (at s > 1 its
edges move by at most s / 2 full-size pixels, under half an output pixel; at s = 1 the
box is whole already). Other PIL filters (nearest, box, hamming, lanczos) always take
PIL's path.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import warnings
from typing import Any, Literal

import numpy as np
import torch

from dissect_dist.data.manifest import IMAGE_EXTS

JPEG_SCALES = (8, 4, 2, 1)  # libjpeg's DCT scaling factors that PIL's draft exposes
# EXIF orientation tag -> the PIL transpose that shows the image upright (EXIF 2.3, tag 0x0112).
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
# EXIF orientation -> (upright x, upright y) run against the stored axis they come from. At
# DCT scale 1/s a stored side L decodes to ceil(L / s) pixels, the last one covering only
# L - s * (ceil(L / s) - 1) full-size pixels; on a reversed axis that partial pixel comes
# first, so full-size coordinate u sits at (u + s * ceil(L / s) - L) / s, not u / s.
_REVERSED = {2: (True, False), 3: (True, True), 4: (False, True), 5: (False, False),
             6: (True, False), 7: (True, True), 8: (False, True)}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
_TORCH_MODES = {3: "bicubic", 2: "bilinear"}  # PIL filter -> F.interpolate mode (antialiased)


class PlanError(ValueError):
    """A transform the fast path cannot reproduce."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImagePlan:
    """What the fast path does to every image; see the module docstring.

    kind "random_resized_crop": torchvision's RandomResizedCrop(size, scale, ratio).
    kind "resize_center_crop": Resize(resize) (shorter side, max_size None) then
    CenterCrop(size) (open_clip's eval transform), or Resize((h, w)) alone (size = resize).
    """

    kind: str
    size: tuple[int, int]  # (h, w) of the output
    resample: int  # PIL resampling filter
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int | tuple[int, int] = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True  # reduced-size JPEG decoding; False decodes every JPEG at full size
    resampling: Literal["fast", "exact"] = "fast"  # see the module docstring
    transform: Any = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_transform(cls, transform: Any, *, draft: bool = True,
                       resampling: Literal["fast", "exact"] = "fast",
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePlan:
        """Compile a torchvision Compose (open_clip's train or eval transform). Raises
        PlanError naming the first step it cannot reproduce."""
        import torchvision.transforms as T
        from torchvision.transforms.functional import pil_modes_mapping

        steps = list(getattr(transform, "transforms", [transform]))
        geo: dict[str, Any] = {}
        mean: tuple[float, ...] = (0.0, 0.0, 0.0)
        std: tuple[float, ...] = (1.0, 1.0, 1.0)
        to_tensor = False
        for step in steps:
            name = type(step).__name__
            if isinstance(step, T.RandomResizedCrop) and not geo:
                geo = {"kind": "random_resized_crop", "size": tuple(step.size),
                       "scale": tuple(step.scale), "ratio": tuple(step.ratio),
                       "resample": pil_modes_mapping[step.interpolation]}
            elif isinstance(step, T.Resize) and not geo and step.max_size is None:
                r = step.size
                r = r[0] if isinstance(r, (list, tuple)) and len(r) == 1 else r
                geo = {"kind": "resize_center_crop", "resize": r if isinstance(r, int)
                       else (int(r[0]), int(r[1])),
                       "size": (r, r) if isinstance(r, int) else (int(r[0]), int(r[1])),
                       "resample": pil_modes_mapping[step.interpolation]}
            elif isinstance(step, T.CenterCrop) and geo.get("kind") == "resize_center_crop" \
                    and "crop" not in geo:
                geo["size"] = geo["crop"] = tuple(step.size)
            elif (name == "MaybeConvertMode" and getattr(step, "mode", "RGB") == "RGB") or \
                    getattr(step, "__name__", "") == "_convert_to_rgb":
                continue  # the plan always converts to RGB
            elif isinstance(step, T.ToTensor) and not to_tensor:
                to_tensor = True
            elif isinstance(step, T.Normalize) and to_tensor and not step.inplace:
                mean, std = tuple(map(float, step.mean)), tuple(map(float, step.std))
            else:
                raise PlanError(
                    f"transform step {step!r} is not one the JPEG fast path reproduces "
                    "(it knows RandomResizedCrop, Resize + CenterCrop, RGB conversion, "
                    "ToTensor, Normalize, in that order): pass the transform itself as "
                    "preprocess to decode at full size through it")
        if not geo or not to_tensor:
            missing = "resize or crop" if not geo else "ToTensor"
            raise PlanError(f"transform {transform!r} has no {missing} step: the fast path "
                            "needs both")
        if geo["kind"] == "resize_center_crop" and isinstance(geo["resize"], int) \
                and "crop" not in geo:
            raise PlanError(f"transform {transform!r} resizes the shorter side alone, which "
                            "gives images of different shapes that cannot be batched: add a "
                            "CenterCrop, or resize to (height, width)")
        geo.pop("crop", None)
        geo["size"] = (int(geo["size"][0]), int(geo["size"][1]))
        if resampling not in ("fast", "exact"):
            raise PlanError(f"resampling={resampling!r}: choose 'fast' or 'exact'")
        return cls(**geo, mean=mean, std=std, draft=draft, resampling=resampling,
                   max_pixels=max_pixels, transform=transform)

    def __call__(self, image: Any) -> torch.Tensor:
        """The original transform on a PIL image (float, normalised), for callers that
        build single rows outside the loader."""
        if self.transform is None:
            raise PlanError("this plan was not compiled from a transform")
        out: torch.Tensor = self.transform(image)
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (3, H, W) from encoded image bytes, written into `out` when given (a
        slot of a batch: no separate copy per image). Raises OSError/ValueError (or
        PIL's UnidentifiedImageError / DecompressionBombError) on bad input; the torch
        RNG must be seeded by the caller, as for the transform."""
        im, orient, w, h = self._header(data)
        box = self._box(h, w)  # (left, top, right, bottom) on the upright full-size image
        return self._decode(im, orient, w, h, box, self.draft, out)

    def _header(self, data: bytes) -> tuple[Any, int, int, int]:
        """The opened (not decoded) image, its EXIF orientation and its upright width and
        height; TooManyPixels over the limit."""
        from PIL import Image

        im: Any = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > self.max_pixels:
            raise TooManyPixels(f"{w}x{h} = {w * h} pixels > {self.max_pixels}")
        orient = _orientation(im)
        if orient in (5, 6, 7, 8):
            w, h = h, w  # the upright geometry the transform would see
        return im, orient, w, h

    def _decode(self, im: Any, orient: int, w: int, h: int,
                box: tuple[float, float, float, float], draft: bool,
                out: torch.Tensor | None) -> torch.Tensor:
        from PIL import Image

        out_h, out_w = self.size
        if self.kind == "random_resized_crop":
            need_w, need_h = box[2] - box[0], box[3] - box[1]
        else:  # the whole image is resized to the `_resized` geometry, then cropped
            need_w, need_h = w, h
            out_h, out_w = self._resized(h, w)
        s = 1
        if draft and im.format in ("JPEG", "MPO"):
            s = next(a for a in JPEG_SCALES if need_w >= a * out_w and need_h >= a * out_h)
            if s > 1:
                # In the stored (not upright) orientation; the scale applies to both sides.
                sw, sh = im.size
                _, dbox = im.draft("RGB", (sw // s, sh // s))  # type: ignore[misc]
                got = sw / dbox[2]
                if abs(got - s) > 1e-9:
                    raise ValueError(f"reduced JPEG decoding gave scale 1/{got}, wanted 1/{s}")
        im.load()
        off = (0.0, 0.0)  # where full-size coordinate 0 sits in the decoded image, / s
        if orient in _ORIENTATION:
            im = im.transpose(getattr(Image.Transpose, _ORIENTATION[orient]))
            rev_x, rev_y = _REVERSED[orient]
            off = ((-(-w // s) * s - w) / s if rev_x else 0.0,
                   (-(-h // s) * s - h) / s if rev_y else 0.0)
        im = to_rgb(im)
        img = self._finish(im, box, s, off)
        if out is None:
            return img.contiguous()
        return out.copy_(img)

    # ------------------------------------------------- decoding on the training device
    def prepare(self, data: bytes) -> DeviceJob | None:
        """What the training device needs to decode this image itself (data.decode=
        device): the crop box, drawn exactly as decode() draws it (the same RNG calls on
        the same upright geometry), and the EXIF orientation; no pixel is decoded. None,
        before any RNG draw, for an image the device path does not take (not a JPEG in
        YCbCr or greyscale, e.g. CMYK; or a plan that is not device_decodable()):
        decode() it on the host instead. Raises like decode() on a
        header it cannot read, TooManyPixels over the limit."""
        if not self.device_decodable():
            return None
        im, orient, w, h = self._header(data)
        if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L"):
            return None
        box = self._box(h, w)
        return DeviceJob(tuple(int(round(v)) for v in box), orient,  # type: ignore[arg-type]
                         (h, w))

    def device_decodable(self) -> bool:
        """Whether finish_on_device reproduces this plan: the fast resampling with a filter
        torch has (bicubic, bilinear)."""
        return self._torch_mode() is not None

    def _torch_mode(self) -> str | None:
        """The F.interpolate mode of the fast resampling, None where PIL resamples."""
        return _TORCH_MODES.get(self.resample) if self.resampling == "fast" else None

    def decode_job(self, data: bytes, job: DeviceJob) -> torch.Tensor:
        """On the host, at full size, what finish_on_device makes of a decoded JPEG: the
        retry for a JPEG the device decoder rejects (no RNG draw: the box is the job's)."""
        im, orient, w, h = self._header(data)
        return self._decode(im, orient, w, h, tuple(map(float, job.box)),  # type: ignore[arg-type]
                            False, None)

    def finish_on_device(self, decoded: torch.Tensor, job: DeviceJob) -> torch.Tensor:
        """uint8 (3, H, W) on `decoded`'s device from a JPEG decoded there at full size
        in its stored orientation (3, h, w): turned upright, cropped to the job's box,
        resized with the plan's filter (antialiased, in float32, rounded to uint8 after
        each pass: within one grey level of the host's uint8 kernel on the same pixels),
        centre-cropped for the eval transform. ValueError when the decoded size is not
        the header's."""
        import torch.nn.functional as F

        x = _upright(decoded, job.orientation)
        if tuple(x.shape) != (3, *job.size):
            raise ValueError(f"the device decoded a {tuple(x.shape)} image, its header says "
                             f"(3, {job.size[0]}, {job.size[1]}) upright")
        x0, y0, x1, y1 = job.box
        if self.kind == "random_resized_crop":
            x = x[:, y0:y1, x0:x1]
            size: tuple[int, int] = self.size
        else:
            size = self._resized(x.shape[-2], x.shape[-1])
        if tuple(x.shape[-2:]) != tuple(size):
            # Two passes, width then height, rounded and clamped to 8 bits in between, as
            # the host's uint8 kernel (and PIL) does: within one grey level of it, where a
            # single float pass differs by up to ~6 next to hard edges.
            mode = self._torch_mode()
            assert mode is not None, "a plan that is not device_decodable()"
            y = x[None].float()
            for step in ((y.shape[-2], size[1]), (size[0], size[1])):
                if tuple(y.shape[-2:]) != step:
                    y = F.interpolate(y, size=list(step), mode=mode, antialias=True)
                    y = y.round_().clamp_(0, 255)
            x = y[0].to(torch.uint8)
        if self.kind != "random_resized_crop" and tuple(size) != self.size:
            import torchvision.transforms.functional as TF

            x = TF.center_crop(x, list(self.size))
        return x

    def decode_full(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        """As decode, at full size (no DCT scaling): the retry for a JPEG that reduced
        decoding rejects."""
        return dataclasses.replace(self, draft=False).decode(data, out)

    def _box(self, h: int, w: int) -> tuple[float, float, float, float]:
        if self.kind == "random_resized_crop":
            import torchvision.transforms as T

            if not self._a_try_can_fit(h, w):
                i, j, bh, bw = _central_crop(h, w, self.ratio)
            else:  # torchvision reads only the geometry: a stride-0 view stands in
                i, j, bh, bw = T.RandomResizedCrop.get_params(
                    torch.empty(1).expand(3, h, w), list(self.scale), list(self.ratio))
            return (j, i, j + bw, i + bh)
        return (0, 0, w, h)

    def _a_try_can_fit(self, h: int, w: int) -> bool:
        """False when none of RandomResizedCrop.get_params' ten random tries can fit in
        an h x w image, so that it ends in its central-crop fallback whatever it draws:
        the box is then known without the draws (~0.1 ms of torch calls per sample; with
        open_clip's scale 0.9-1, most images whose aspect is past ~1.2). A try draws a
        scale s >= scale[0] and a ratio r in [ratio[0], ratio[1]] and fits when
        round(sqrt(A s r)) <= w and round(sqrt(A s / r)) <= h (A = h w): that needs
        A s / (h + 1/2)^2 < r < (w + 1/2)^2 / (A s), an interval widest at s = scale[0].
        Answers True (draw as torchvision does) unless that interval misses the ratio
        range by a margin far above float rounding. The per-sample seed makes the RNG
        state after the box irrelevant (nothing else draws before the next reseed)."""
        lo_r, hi_r = min(self.ratio), max(self.ratio)
        if self.scale[0] <= 0 or lo_r <= 0 or self.scale[0] > self.scale[1]:
            return True
        area_min = h * w * self.scale[0]
        lo, hi = area_min / (h + 0.5) ** 2, (w + 0.5) ** 2 / area_min
        return not (hi < lo_r * (1 - 1e-3) or lo > hi_r * (1 + 1e-3))

    def _resized(self, h: int, w: int) -> tuple[int, int]:
        """Resize's output geometry, by torchvision's rule (shorter side to `resize`, the
        longer side truncated)."""
        if isinstance(self.resize, tuple):
            return self.resize
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        return (new_long, self.resize) if w <= h else (self.resize, new_long)

    def _finish(self, im: Any, box: tuple[float, float, float, float], s: int,
                off: tuple[float, float]) -> torch.Tensor:
        """Crop and resize the decoded upright image `im`: full-size coordinate (x, y) is
        at (x / s + off[0], y / s + off[1]) in it. uint8 (3, H, W), any memory layout."""
        mode = self._torch_mode()
        if mode is not None:
            return self._finish_torch(im, box, s, off, mode)
        if self.kind == "random_resized_crop":
            # Crop the covering whole-pixel box of the reduced image, then resample the
            # exact (fractional) box from it; at s = 1 this is crop + resize, as torchvision.
            x0, y0, x1, y1 = (v / s + off[i % 2] for i, v in enumerate(box))
            left, top = math.floor(x0), math.floor(y0)
            right, bottom = min(math.ceil(x1), im.width), min(math.ceil(y1), im.height)
            im = im.crop((left, top, right, bottom))
            im = im.resize((self.size[1], self.size[0]), self.resample,
                           box=(x0 - left, y0 - top, min(x1, right) - left,
                                min(y1, bottom) - top))
        else:
            import torchvision.transforms.functional as F

            rh, rw = self._resized(int(box[3]), int(box[2]))
            im = im.resize((rw, rh), self.resample,
                           box=(off[0], off[1], box[2] / s + off[0], box[3] / s + off[1]))
            if (rh, rw) != self.size:
                im = F.center_crop(im, list(self.size))
        return _chw_view(im)

    def _finish_torch(self, im: Any, box: tuple[float, float, float, float], s: int,
                      off: tuple[float, float], mode: str) -> torch.Tensor:
        """`_finish` through torch's antialiased uint8 kernels (resampling "fast")."""
        import torch.nn.functional as F

        if self.kind == "random_resized_crop":
            x0, y0, x1, y1 = (round(v / s + off[i % 2]) for i, v in enumerate(box))
            x1, y1 = min(max(x1, x0 + 1), im.width), min(max(y1, y0 + 1), im.height)
            im = im.crop((x0, y0, x1, y1))
            size = self.size
        else:  # the whole picture: at s > 1 without the partial decoded pixel if under half
            x0, y0 = round(off[0]), round(off[1])
            x1 = min(max(round(box[2] / s + off[0]), x0 + 1), im.width)
            y1 = min(max(round(box[3] / s + off[1]), y0 + 1), im.height)
            if (x0, y0, x1, y1) != (0, 0, im.width, im.height):
                im = im.crop((x0, y0, x1, y1))
            size = self._resized(int(box[3]), int(box[2]))
        # (1, 3, H, W) in channels-last memory, the layout of the vectorised uint8 kernel
        x = _chw_view(im).unsqueeze(0)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=list(size), mode=mode, antialias=True)
        out = x[0]
        if self.kind != "random_resized_crop" and tuple(size) != self.size:
            import torchvision.transforms.functional as TF

            out = TF.center_crop(out, list(self.size))
        return out

    # ------------------------------------------------------------------ on the device
    def normalize(self, images: torch.Tensor, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (k, 3, H, W) -> normalised `dtype` on `device`, through `table()`: the
        values are bit-identical to the CPU transform's (ToTensor + Normalize) before the
        cast to `dtype`."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"ImagePlan.normalize takes uint8 (k, C, H, W) batches, got "
                            f"{images.dtype} {tuple(images.shape)}")
        images = images.to(device, non_blocking=True)
        if images.device.type == "cpu":
            return _lookup_numpy(images, _table_on(self.mean, self.std, images.device,
                                                   torch.float32)).to(dtype)
        return _lookup_torch(images, _table_on(self.mean, self.std, images.device, dtype))

    def table(self) -> torch.Tensor:
        """(C, 256) float32: ToTensor + Normalize of each uint8 value of each channel, the
        same float32 operations on the CPU (x / 255, then (x - mean) / std), so a lookup
        gives the transform's bits on any device (a GPU's own `x.div(255)` multiplies by
        a rounded 1/255 instead) and costs one read per value instead of three float
        passes over the batch (~0.3x on a CPU)."""
        return _table(self.mean, self.std)


def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.arange(256, dtype=torch.float32).expand(len(mean), 256).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32)[:, None]
    s = torch.as_tensor(std, dtype=torch.float32)[:, None]
    return x.sub(m).div(s)


@functools.lru_cache(maxsize=16)
def _table_on(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """`_table` in `dtype` on `device`, made once per (plan statistics, device, dtype):
    no per-batch table arithmetic or host-to-device copy. Read only."""
    return _table(mean, std).to(device).to(dtype)


def _lookup_numpy(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float32 table[c][images[:, c]] on the CPU (numpy's take reads uint8 indices as
    they are; they are always in range), one contiguous (H, W) plane at a time: ~1.5x
    faster than one strided (k, H, W) channel at a time."""
    src, tab = images.numpy(), table.numpy()
    out = np.empty(src.shape, dtype=np.float32)
    for n in range(src.shape[0]):
        for c in range(src.shape[1]):
            np.take(tab[c], src[n, c], out=out[n, c], mode="clip")
    return torch.from_numpy(out)


def _lookup_torch(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[c][images[:, c]] in the table's dtype, on the images' device (`table` already
    there; int32 indices, one channel at a time: the transient index tensor is 4 bytes
    per value of one channel)."""
    out = torch.empty(images.shape, dtype=table.dtype, device=images.device)
    for c in range(images.shape[1]):
        idx = images[:, c].reshape(-1).to(torch.int32)
        out[:, c] = table[c].index_select(0, idx).view(out[:, c].shape)
    return out


def _central_crop(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params' fallback after ten failed tries, as torchvision
    computes it: (top, left, height, width)."""
    in_ratio = float(w) / float(h)
    if in_ratio < min(ratio):
        bw = w
        bh = int(round(bw / min(ratio)))
    elif in_ratio > max(ratio):
        bh = h
        bw = int(round(bh * max(ratio)))
    else:
        bw, bh = w, h
    return (h - bh) // 2, (w - bw) // 2, bh, bw


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceJob:
    """ImagePlan.prepare's answer: the crop box on the upright full-size image (left,
    top, right, bottom; whole pixels), the EXIF orientation tag (1 = as stored) and the
    upright (height, width) the header gives."""

    box: tuple[int, int, int, int]
    orientation: int
    size: tuple[int, int]


def _upright(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> as EXIF orientation 1..8 says it is shown (PIL's transposes
    in `_ORIENTATION`, on a tensor)."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip((-2, -1))
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return x.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return x.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return x.transpose(-2, -1).flip(-2)
    return x


def _chw_view(im: Any) -> torch.Tensor:
    """uint8 (3, H, W) view of an RGB PIL image's pixels (channels-last memory, no copy
    beyond numpy's export; read only: nothing writes to it)."""
    with warnings.catch_warnings():  # PIL's buffer is read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(im)).permute(2, 0, 1)


class TooManyPixels(ValueError):
    """The header's geometry is over the plan's decompression-bomb limit."""


def _orientation(im: Any) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1  # unreadable EXIF: show as stored


def to_rgb(im: Any) -> Any:
    """RGB from any PIL mode, 16-bit and 32-bit integer greyscale scaled to 8 bits
    (PIL's own conversion clips them at 255, which whitens most of the picture)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        top = 65535 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        from PIL import Image

        arr8 = (np.clip(arr, 0, top) * 255 // max(top, 1)).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA") or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
    return im.convert("RGB")


def image_member(members: dict[str, bytes]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in members), None)
