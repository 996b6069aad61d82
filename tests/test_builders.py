"""Dataset builders write the stated counts, a manifest that matches the shards, and
a noise ledger whose rate and contents are right."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dissect_dist.data import Manifest
from dissect_dist.data.builders import (
    FASHION_CLASSES,
    _read_idx,
    build_fashion_mnist,
    build_fashion_mnist_reference,
    build_from_folder,
    build_icons,
    build_icons_reference,
    iter_icons,
)


def _samples(manifest: Manifest) -> list[dict[str, bytes]]:
    out = []
    for url in manifest.urls:
        with tarfile.open(url) as tf:
            cur: dict[str, bytes] = {}
            key = None
            for m in tf.getmembers():
                k, ext = m.name.split(".", 1)
                if k != key and cur:
                    out.append(cur)
                    cur = {}
                key = k
                cur[ext] = tf.extractfile(m).read()
            if cur:
                out.append(cur)
    return out


def test_fashion_mnist_noise_ledger_marks_exactly_the_swapped_captions(tmp_path: Path):
    res = build_fashion_mnist(str(tmp_path), noise=0.4, seed=1, subset=600, shard_size=250)
    assert res["train"] == 600 and res["test"] == 10_000 and res["noisy"] == 240
    train = Manifest.load(str(tmp_path / "train" / "manifest.json"))
    assert train.counts.tolist() == [250, 250, 100]
    assert Manifest.from_tars(list(train.urls)).counts.tolist() == train.counts.tolist()
    ledger = set(np.load(tmp_path / "train" / "noise_ledger.npy").tolist())
    assert json.loads((tmp_path / "train" / "noise_ledger.json").read_text())["actual_rate"] == 0.4
    labels = _read_idx(Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"))
    for sid, s in enumerate(_samples(train)):
        true = FASHION_CLASSES[labels[json.loads(s["json"])["source_index"]]]
        caption = s["txt"].decode()
        named = [c for c in FASHION_CLASSES if f" {c} " in f" {caption[:-1]} "
                 or caption.endswith(f" {c}.")]
        assert (true not in named) == (sid in ledger), (sid, caption, true)
    test = Manifest.load(str(tmp_path / "test" / "manifest.json"))
    assert test.total == 10_000
    assert json.loads((tmp_path / "classes.json").read_text())["classes"] == FASHION_CLASSES


def test_fashion_mnist_reference_pairs_are_clean_and_not_training_pairs(tmp_path: Path):
    build_fashion_mnist(str(tmp_path / "d"), noise=0.4, seed=0, subset=300, shard_size=1000)
    build_fashion_mnist_reference(str(tmp_path / "r"), subset=300, size=60, seed=0)
    train = _samples(Manifest.load(str(tmp_path / "d" / "train" / "manifest.json")))
    ref = _samples(Manifest.load(str(tmp_path / "r" / "manifest.json")))
    src = {json.loads(s["json"])["source_index"] for s in train}
    labels = _read_idx(Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"))
    assert len(ref) == 60
    for s in ref:
        i = json.loads(s["json"])["source_index"]
        assert i not in src  # held out from training
        caption = s["txt"].decode()
        named = [c for c in FASHION_CLASSES if f" {c} " in f" {caption[:-1]} "
                 or caption.endswith(f" {c}.")]
        assert named == [FASHION_CLASSES[labels[i]]], caption  # clean


def test_icons_have_instance_captions_a_heldout_split_and_a_ledger(tmp_path: Path):
    res = build_icons(str(tmp_path), noise=0.25, seed=0, heldout=0.2, shard_size=100)
    assert res["train"] + res["heldout"] > 10_000  # every distinct icon name that renders
    assert res["noisy"] == round(0.25 * res["train"])
    held = _samples(Manifest.load(str(tmp_path / "heldout" / "manifest.json")))
    caps = [s["txt"].decode() for s in held]
    assert len(set(caps)) == len(caps) == res["heldout"]  # one name per icon
    from PIL import Image

    im = Image.open(io.BytesIO(held[0]["png"]))
    assert im.size == (32, 32) and np.asarray(im).min() < 128  # a visible glyph


def test_icons_reference_pairs_are_clean_and_neither_training_nor_heldout(tmp_path: Path):
    build_icons(str(tmp_path / "d"), noise=0.4, seed=0, heldout=0.1, limit=300)
    res = build_icons_reference(str(tmp_path / "r"), limit=300, size=40)
    used = _samples(Manifest.load(str(tmp_path / "d" / "train" / "manifest.json"))) + \
        _samples(Manifest.load(str(tmp_path / "d" / "heldout" / "manifest.json")))
    ref = _samples(Manifest.load(str(tmp_path / "r" / "manifest.json")))
    assert res["pairs"] == len(ref) == 40 and len(used) == 300
    glyph = {name: png for png, name in itertools.islice(iter_icons(), 340)}  # names are unique
    for s in ref:
        assert glyph[s["txt"].decode()] == s["png"]  # clean: the icon under its own name
    # no name the run trains or evaluates on (some glyphs repeat under other names)
    assert not {s["txt"] for s in ref} & {s["txt"] for s in used}
    assert {s["txt"].decode() for s in ref} == set(list(glyph)[300:])
    with pytest.raises(ValueError, match="exceed"):
        build_icons_reference(str(tmp_path / "x"), limit=10**6, size=1)


def test_folder_with_csv_becomes_shards(tmp_path: Path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    rows = ["filepath,title"]
    for i in range(5):
        Image.new("RGB", (6, 6), (i * 40, 0, 0)).save(tmp_path / "imgs" / f"{i}.jpg")
        rows.append(f"{i}.jpg,red square {i}")
    rows.append("missing.jpg,nothing")
    (tmp_path / "caps.csv").write_text("\n".join(rows))
    res = build_from_folder(str(tmp_path / "out"), images=str(tmp_path / "imgs"),
                            captions=str(tmp_path / "caps.csv"))
    assert res == {"train": 5, "missing_files": 1, "out": str(tmp_path / "out")}
    s = _samples(Manifest.load(str(tmp_path / "out" / "manifest.json")))
    assert [x["txt"].decode() for x in s] == [f"red square {i}" for i in range(5)]
    with pytest.raises(ValueError, match="need columns 'filepath' and 'caption'"):
        build_from_folder(str(tmp_path / "o2"), images=str(tmp_path / "imgs"),
                          captions=str(tmp_path / "caps.csv"), caption_key="caption")


def test_a_dataset_built_under_a_relative_path_loads_from_anywhere(tmp_path: Path, monkeypatch):
    import os

    from dissect_dist.data.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["folder", "--images", ".", "--captions", "caps.csv", "--out", "rel/out"]) == 2
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "caps.csv").write_text("filepath,title\na.png,a black square\n")
    assert main(["folder", "--images", ".", "--captions", "caps.csv", "--out", "rel/out"]) == 0
    os.chdir("/")
    m = Manifest.load(str(tmp_path / "rel" / "out" / "manifest.json"))
    assert [Path(u) for u in m.urls] == [tmp_path / "rel" / "out" / "shard-000000.tar"]
    assert Manifest.from_tars(list(m.urls)).total == 1
