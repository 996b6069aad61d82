"""Dataset builders that write img2dataset-style WebDataset shards and a manifest:
Fashion-MNIST (Debian's dataset-fashion-mnist), the icon fonts inside the qtawesome
wheel, and a folder of images with a CSV/TSV of captions.

Noisy correspondence is injected at a given rate: a pair's caption is replaced by the
caption of another class (Fashion-MNIST) or of another icon (icons). The ids of the
corrupted pairs go to a noise ledger beside the shards, for evaluation only.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dissect_dist.data.manifest import Manifest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot"]
FASHION_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.",
                     "a product photo of a {}.", "a {} on a plain background.",
                     "a black and white photo of a {}.", "a small photo of a {}.",
                     "a catalogue image of a {}."]

Sample = tuple[bytes, str, str, dict[str, Any]]  # (image bytes, image ext, caption, metadata)


class ShardWriter:
    """Writes samples into OUT/shard-000000.tar, ... with img2dataset-style
    *_stats.json per shard, then a manifest.json. Deterministic bytes (mtime 0)."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.urls: list[str] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._n_in_shard = 0
        self.total = 0

    def _open(self) -> None:
        path = self.out / f"shard-{len(self.urls):06d}.tar"
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.urls.append(str(path))
        self.counts.append(0)

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            stats = Path(self.urls[-1][:-4] + "_stats.json")
            stats.write_text(json.dumps({"count": self.counts[-1], "successes": self.counts[-1],
                                         "failed_to_download": 0}))
            self._tar = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, image: bytes, ext: str, caption: str, meta: dict[str, Any]) -> int:
        """Append one sample; returns its dense id."""
        if self._tar is None or self.counts[-1] >= self.shard_size:
            self._close()
            self._open()
        key = f"{self.total:09d}"
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.txt", caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps({"key": key, **meta}).encode())
        self.counts[-1] += 1
        self.total += 1
        return self.total - 1

    def finish(self) -> Manifest:
        self._close()
        m = Manifest(tuple(self.urls), np.asarray(self.counts, dtype=np.int64))
        m.save(str(self.out / "manifest.json"))
        return m


def write_ledger(out: Path, noisy_ids: np.ndarray, n: int, rate: float, seed: int) -> None:
    np.save(out / "noise_ledger.npy", np.sort(noisy_ids).astype(np.int64))
    (out / "noise_ledger.json").write_text(json.dumps({
        "requested_rate": rate, "actual_rate": len(noisy_ids) / max(n, 1),
        "noisy": int(len(noisy_ids)), "total": n, "seed": seed,
        "note": "ids of pairs whose caption was replaced; for evaluation only",
    }, indent=1))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _noise_mask(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(rate * n) corrupted pairs, chosen uniformly."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate {rate}: need 0 <= rate < 1")
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    return mask


# ------------------------------------------------------------------ Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def build_fashion_mnist(out: str, *, noise: float, seed: int = 0, subset: int | None = None,
                        shard_size: int = 1000, source: str = FASHION_MNIST_DIR
                        ) -> dict[str, Any]:
    src = Path(source)
    if not (src / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {src}: install it with "
            "`apt-get install dataset-fashion-mnist` (the project's setup does)"
        )
    rng = np.random.default_rng(seed)
    images = _read_idx(src / "train-images-idx3-ubyte.gz")
    labels = _read_idx(src / "train-labels-idx1-ubyte.gz").astype(np.int64)
    order = rng.permutation(labels.size)[: subset or labels.size]
    noisy = _noise_mask(order.size, noise, rng)
    k = len(FASHION_CLASSES)
    root = Path(out)
    w = ShardWriter(root / "train", shard_size)
    noisy_ids = []
    for i, src_i in enumerate(order):
        label = int(labels[src_i])
        shown = label if not noisy[i] else int((label + rng.integers(1, k)) % k)
        caption = FASHION_TEMPLATES[rng.integers(len(FASHION_TEMPLATES))].format(
            FASHION_CLASSES[shown])
        sid = w.write(_png(images[src_i]), "png", caption, {"source_index": int(src_i)})
        if noisy[i]:
            noisy_ids.append(sid)
    train = w.finish()
    write_ledger(root / "train", np.asarray(noisy_ids), train.total, noise, seed)
    timg = _read_idx(src / "t10k-images-idx3-ubyte.gz")
    tlab = _read_idx(src / "t10k-labels-idx1-ubyte.gz")
    tw = ShardWriter(root / "test", shard_size)
    for img, lab in zip(timg, tlab.tolist()):
        tw.write(_png(img), "png", FASHION_CLASSES[lab], {"label": int(lab)})
    test = tw.finish()
    (root / "classes.json").write_text(json.dumps(
        {"classes": FASHION_CLASSES, "templates": FASHION_TEMPLATES}, indent=1))
    return {"train": train.total, "test": test.total, "noisy": len(noisy_ids), "out": str(root)}


def build_fashion_mnist_reference(out: str, *, subset: int, size: int, seed: int = 0,
                                  shard_size: int = 1000, source: str = FASHION_MNIST_DIR
                                  ) -> dict[str, Any]:
    """`size` clean pairs (every caption names its image's class) drawn from Fashion-MNIST's
    training split after the `subset` that build_fashion_mnist(seed=seed, subset=subset)
    uses (the same permutation), so none of them is a training pair: the data a reference
    model is trained on. OUT/manifest.json; captions from the same templates."""
    src = Path(source)
    images = _read_idx(src / "train-images-idx3-ubyte.gz")
    labels = _read_idx(src / "train-labels-idx1-ubyte.gz").astype(np.int64)
    order = np.random.default_rng(seed).permutation(labels.size)[subset:subset + size]
    if order.size < size:
        raise ValueError(f"{size} reference pairs after {subset} training pairs exceed the "
                         f"{labels.size} of Fashion-MNIST's training split")
    rng = np.random.default_rng([seed, 1])  # the captions' templates
    w = ShardWriter(Path(out), shard_size)
    for src_i in order:
        caption = FASHION_TEMPLATES[rng.integers(len(FASHION_TEMPLATES))].format(
            FASHION_CLASSES[int(labels[src_i])])
        w.write(_png(images[src_i]), "png", caption, {"source_index": int(src_i)})
    return {"pairs": w.finish().total, "out": out}


# ------------------------------------------------------------------ icons
def icon_fonts() -> list[tuple[Path, Path]]:
    """(ttf, charmap json) pairs shipped in the qtawesome wheel (read as files: the
    package itself, which needs Qt, is never imported)."""
    spec = importlib.util.find_spec("qtawesome")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("qtawesome is not installed: `pip install qtawesome` "
                                "(the project's setup installs it)")
    fonts = Path(list(spec.submodule_search_locations)[0]) / "fonts"
    out = []
    for ttf in sorted(fonts.glob("*.ttf")):
        stem, _, version = ttf.stem.rpartition("-")
        cm = fonts / f"{stem}-charmap-{version}.json"
        if cm.exists():
            out.append((ttf, cm))
    return out


def _icon_name(name: str) -> str:
    return " ".join(name.replace("_", "-").split("-")).strip()


def iter_icons(size: int = 32) -> Iterator[tuple[bytes, str]]:
    """(PNG bytes, human name) for every distinct icon name that renders visibly."""
    from PIL import Image, ImageDraw, ImageFont

    seen: set[str] = set()
    for ttf, cm in icon_fonts():
        charmap = json.loads(cm.read_text())
        font = ImageFont.truetype(str(ttf), int(size * 0.8))
        for name, code in sorted(charmap.items()):
            caption = _icon_name(name)
            if not caption or caption in seen:
                continue
            ch = chr(int(code, 16) if isinstance(code, str) else int(code))
            im = Image.new("L", (size, size), 255)
            d = ImageDraw.Draw(im)
            box = d.textbbox((0, 0), ch, font=font)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            d.text(((size - (box[2] - box[0])) / 2 - box[0],
                    (size - (box[3] - box[1])) / 2 - box[1]), ch, font=font, fill=0)
            arr = np.asarray(im)
            if arr.min() == 255:
                continue
            seen.add(caption)
            yield _png(arr), caption


def build_icons(out: str, *, noise: float, seed: int = 0, heldout: float = 0.1,
                size: int = 32, shard_size: int = 1000, limit: int | None = None) -> dict[str, Any]:
    icons = list(iter_icons(size))
    if limit:
        icons = icons[:limit]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(icons))
    n_held = int(round(heldout * len(icons)))
    held, train_idx = order[:n_held], order[n_held:]
    noisy = _noise_mask(train_idx.size, noise, rng)
    root = Path(out)
    w = ShardWriter(root / "train", shard_size)
    noisy_ids = []
    for i, j in enumerate(train_idx):
        png, caption = icons[j]
        if noisy[i]:
            other = train_idx[(i + rng.integers(1, train_idx.size)) % train_idx.size]
            caption = icons[other][1]
        sid = w.write(png, "png", caption, {})
        if noisy[i]:
            noisy_ids.append(sid)
    train = w.finish()
    write_ledger(root / "train", np.asarray(noisy_ids), train.total, noise, seed)
    hw = ShardWriter(root / "heldout", shard_size)
    for j in held:
        hw.write(icons[j][0], "png", icons[j][1], {})
    heldm = hw.finish()
    return {"train": train.total, "heldout": heldm.total, "noisy": len(noisy_ids),
            "out": str(root)}


def build_icons_reference(out: str, *, limit: int, size: int, icon_size: int = 32,
                          shard_size: int = 1000) -> dict[str, Any]:
    """`size` clean icons (each captioned with its own name) that follow the first `limit`
    icons in font order, which build_icons(limit=limit) splits into its training and
    held-out pairs: none of them is a training or held-out icon, and no caption repeats
    one of theirs (names are unique). The data a reference model is trained on.
    OUT/manifest.json."""
    icons = list(itertools.islice(iter_icons(icon_size), limit + size))
    if len(icons) < limit + size:
        raise ValueError(f"{size} reference icons after the first {limit} exceed the "
                         f"{len(icons)} icons the fonts render")
    w = ShardWriter(Path(out), shard_size)
    for png, caption in icons[limit:]:
        w.write(png, "png", caption, {})
    return {"pairs": w.finish().total, "out": out}


# ------------------------------------------------------------------ folder + CSV
def _rows(path: Path, sep: str | None, img_key: str, cap_key: str) -> Iterable[tuple[str, str]]:
    sep = sep or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        if reader.fieldnames is None or img_key not in reader.fieldnames \
                or cap_key not in reader.fieldnames:
            raise ValueError(f"{path}: need columns {img_key!r} and {cap_key!r}, "
                             f"found {reader.fieldnames}")
        for row in reader:
            yield row[img_key], row[cap_key]


def build_from_folder(out: str, *, images: str, captions: str, sep: str | None = None,
                      img_key: str = "filepath", caption_key: str = "title",
                      shard_size: int = 1000) -> dict[str, Any]:
    from PIL import Image

    w = ShardWriter(Path(out), shard_size)
    missing = 0
    for rel, caption in _rows(Path(captions), sep, img_key, caption_key):
        p = Path(rel) if os.path.isabs(rel) else Path(images) / rel
        if not p.exists():
            missing += 1
            continue
        ext = p.suffix.lower().lstrip(".")
        data = p.read_bytes()
        if ext not in ("jpg", "jpeg", "png", "webp"):
            buf = io.BytesIO()
            Image.open(p).convert("RGB").save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
        w.write(data, "jpg" if ext == "jpeg" else ext, caption, {"source": str(rel)})
    m = w.finish()
    return {"train": m.total, "missing_files": missing, "out": out}
