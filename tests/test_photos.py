"""The realistic benchmark set builds in one command, with web-like JPEGs and captions."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image

from dissect_dist.data import Manifest
from dissect_dist.data.__main__ import main


def test_photos_builds_web_like_jpeg_pairs_in_img2dataset_layout(tmp_path, capsys):
    out = tmp_path / "photos"
    assert main(["photos", "--out", str(out), "--samples", "12", "--shard-size", "5"]) == 0
    m = Manifest.load(str(out / "manifest.json"))
    assert m.total == 12 and len(m.urls) == 3
    assert (out / "shard-000000_stats.json").exists()
    with tarfile.open(m.urls[0]) as tf:
        names = tf.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        for key in (n[:-4] for n in names if n.endswith(".jpg")):
            im = Image.open(io.BytesIO(tf.extractfile(f"{key}.jpg").read()))
            assert im.format == "JPEG" and 300 <= min(im.size) <= 800
            words = tf.extractfile(f"{key}.txt").read().decode().split()
            assert 5 <= len(words) <= 30
            meta = json.loads(tf.extractfile(f"{key}.json").read())
            assert 75 <= meta["quality"] <= 95 and meta["status"] == "success"
