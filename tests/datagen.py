"""Small WebDataset shard sets for data tests, with bad samples planted on request."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from dissect_dist.data.builders import ShardWriter
from dissect_dist.data.manifest import Manifest


def png(seed: int, size: int = 8) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(root: Path, sizes: list[int], bad: dict[int, str] | None = None) -> Manifest:
    """Shards of the given sizes; sample id i has caption f"caption {i}". `bad` maps an
    id to what is wrong with it: undecodable_image, missing_caption, empty_caption,
    missing_image."""
    bad = bad or {}
    w = ShardWriter(root, shard_size=10**9)
    sid = 0
    for size in sizes:
        w._close()
        w._open()
        for _ in range(size):
            kind = bad.get(sid)
            key = f"{sid:09d}"
            if kind != "missing_image":
                w._add(f"{key}.png", b"\x89PNG garbage" if kind == "undecodable_image"
                       else png(sid))
            if kind != "missing_caption":
                w._add(f"{key}.txt", b"   " if kind == "empty_caption"
                       else f"caption {sid}".encode())
            w.counts[-1] += 1
            w.total += 1
            sid += 1
    return w.finish()


def truncate(path: str, keep_fraction: float) -> None:
    """Cut a tar file inside one of its members (as a partial download would)."""
    data = Path(path).read_bytes()
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    m = members[int(len(members) * keep_fraction)]
    Path(path).write_bytes(data[: m.offset_data + m.size // 2])
