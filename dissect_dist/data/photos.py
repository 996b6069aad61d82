"""A realistic image-caption set for loader benchmarks: the photographs shipped inside
the scikit-image wheel (read as files; no download), re-encoded as web-like JPEGs
(random crop, aspect ratio, scale and flip; short side 300-800 px; quality 75-95; some
progressive, some greyscale) with captions of 5-30 words, in img2dataset's layout
(tar shards of NNNNNNNNN.jpg / .txt / .json, *_stats.json) plus the manifest.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from dissect_dist.data.builders import ShardWriter

# file in skimage/data -> (what it shows, words a caption may add)
PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "astronaut.png": ("an astronaut in a white spacesuit",
                      ("flag", "portrait", "nasa", "smiling", "official", "helmet")),
    "chelsea.png": ("a tabby cat", ("whiskers", "orange", "fur", "close-up", "pet", "looking")),
    "coffee.png": ("a cup of coffee on a saucer",
                   ("spoon", "red", "table", "morning", "cafe", "latte")),
    "hubble_deep_field.jpg": ("galaxies in the deep sky",
                              ("telescope", "stars", "space", "distant", "dark", "universe")),
    "ihc.png": ("stained tissue under a microscope",
                ("cells", "brown", "blue", "pathology", "sample", "slide")),
    "motorcycle_left.png": ("a motorcycle parked indoors",
                            ("engine", "wheel", "garage", "shiny", "bike", "stereo")),
    "motorcycle_right.png": ("a motorbike in a workshop",
                             ("engine", "tank", "chrome", "parked", "vehicle", "tools")),
    "rocket.jpg": ("a rocket on the launch pad",
                   ("launch", "tower", "sky", "spacecraft", "clouds", "white")),
    "retina.jpg": ("a photograph of the human retina",
                   ("eye", "fundus", "vessels", "medical", "red", "optic")),
    "camera.png": ("a man with a camera on a tripod",
                   ("photographer", "field", "black and white", "coat", "grass", "vintage")),
    "coins.png": ("old coins on a dark surface",
                  ("money", "metal", "round", "collection", "grey", "currency")),
    "moon.png": ("the surface of the moon", ("craters", "lunar", "grey", "rocks", "night")),
    "grass.png": ("a patch of grass", ("lawn", "blades", "texture", "green", "garden")),
    "gravel.png": ("gravel on the ground", ("stones", "pebbles", "texture", "path", "grey")),
    "brick.png": ("a brick wall", ("bricks", "mortar", "texture", "building", "old")),
}
_FILLER = ("this", "is", "a", "nice", "picture", "taken", "in", "the", "afternoon", "with",
           "natural", "light", "high", "resolution", "stock", "image", "free", "download",
           "beautiful", "view", "of", "and", "on", "background", "detail", "photo", "best")
SHORT_SIDE = (300, 800)
QUALITY = (75, 95)
CAPTION_WORDS = (5, 30)


def photo_dir() -> Path:
    """skimage/data inside the installed scikit-image (its package is not imported)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed: `pip install scikit-image` "
                                "(the project's setup installs it with the bench extra)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [n for n in PHOTOS if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(f"{d} lacks {missing}: this scikit-image wheel does not ship "
                                "those photos; install scikit-image>=0.22")
    return d


def _caption(rng: np.random.Generator, what: str, words: tuple[str, ...]) -> str:
    n = int(rng.integers(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1))
    base = what.split()
    extra = list(rng.choice(words, size=min(len(words), int(rng.integers(0, 4))),
                            replace=False))
    out = base + extra
    while len(out) < n:
        out.append(str(rng.choice(_FILLER)))
    return " ".join(out[:n])


def make_photo(src: Any, rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """One web-like JPEG from a source photograph, and its metadata."""
    from PIL import Image

    w, h = src.size
    aspect = float(np.exp(rng.uniform(np.log(1 / 2), np.log(2))))  # width / height
    area = rng.uniform(0.35, 1.0) * w * h
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(cw / aspect)))
    cw = max(cw, 16)
    ch = max(ch, 16)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    size = (short, max(short, round(short * ch / cw))) if cw <= ch else \
        (max(short, round(short * cw / ch)), short)
    im = src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    quality = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
    progressive = bool(rng.random() < 0.15)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, progressive=progressive)
    return buf.getvalue(), {"width": size[0], "height": size[1], "original_width": w,
                            "original_height": h, "quality": quality,
                            "progressive": progressive}


def build_photos(out: str, *, samples: int, seed: int = 0, shard_size: int = 1000
                 ) -> dict[str, Any]:
    """`samples` pairs into OUT/shard-*.tar + OUT/manifest.json."""
    from PIL import Image

    if samples < 1:
        raise ValueError(f"--samples {samples}: need >= 1")
    d = photo_dir()
    sources = {}
    for name in PHOTOS:
        with Image.open(d / name) as im:
            im.load()
            sources[name] = im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB")
    names = list(PHOTOS)
    rng = np.random.default_rng(seed)
    w = ShardWriter(Path(out), shard_size)
    nbytes = 0
    for _ in range(samples):
        name = names[int(rng.integers(len(names)))]
        what, words = PHOTOS[name]
        data, meta = make_photo(sources[name], rng)
        caption = _caption(rng, what, words)
        w.write(data, "jpg", caption, {"url": f"skimage/data/{name}", "caption": caption,
                                       "status": "success", **meta})
        nbytes += len(data)
    m = w.finish()
    res = {"train": m.total, "shards": len(m.urls), "jpeg_mb": round(nbytes / 2**20, 1),
           "out": out}
    (Path(out) / "photos.json").write_text(json.dumps({**res, "seed": seed}, indent=1))
    return res
