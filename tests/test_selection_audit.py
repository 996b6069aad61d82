"""The selection audit's bookkeeping (class mix, coverage, repetition of kept pairs) on a
hand-made step record, and the label reproduction it relies on: the true class of every
Fashion-MNIST pair the builder wrote equals the class named in its clean caption."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import nc_runner as nc
from benchmarks import selection_audit as sa


def _record(path: Path, rows: list[tuple[int, list[int], list[bool]]]) -> None:
    path.write_text("".join(json.dumps({"step": i, "epoch": e, "ids": ids, "keep": keep}) + "\n"
                            for i, (e, ids, keep) in enumerate(rows)))


def test_audit_counts_kept_pairs_per_epoch(tmp_path: Path):
    labels = np.array([0, 0, 1, 1])  # ids 0, 1 are class 0; ids 2, 3 class 1
    _record(tmp_path / "samples-rank0.jsonl",
            [(0, [0, 2], [True, False]), (1, [0, 3], [True, True])])
    _record(tmp_path / "samples-rank1.jsonl",
            [(0, [1, 3], [True, False]), (1, [1, 2], [False, False])])
    a = sa.audit(tmp_path, labels, epochs=2)
    # epoch 0 kept {0, 1}: both class 0; epoch 1 kept {0, 3}: one of each
    assert a["coverage"] == [0.5, 0.75]
    assert a["class_share_min"] == [0.0, 0.5] and a["class_share_max"] == [1.0, 0.5]
    assert a["class_entropy_bits"] == [0.0, 1.0]
    assert a["kept_again_next_epoch"] == [None, 0.5]  # 0 kept again, 1 not
    assert a["times_trained_per_pair"] == {"min": 0, "median": 1.0, "max": 2, "never": 1}


def test_true_labels_match_clean_captions(tmp_path: Path):
    from dissect_dist.data.builders import (
        FASHION_CLASSES,
        FASHION_MNIST_DIR,
        FASHION_TEMPLATES,
        build_fashion_mnist,
    )
    if not Path(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make setup`")
    reg = nc.REGIMES["quick"]
    build_fashion_mnist(str(tmp_path), noise=0.0, subset=reg.subset)
    labels = sa.true_labels(reg)
    captions = {}
    for shard in sorted((tmp_path / "train").glob("shard-*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".txt"):
                    f = t.extractfile(m)
                    assert f is not None
                    captions[int(m.name[:9])] = f.read().decode()
    assert len(captions) == reg.subset
    caption_class = {tp.format(c): k for k, c in enumerate(FASHION_CLASSES)
                     for tp in FASHION_TEMPLATES}
    assert len(caption_class) == len(FASHION_CLASSES) * len(FASHION_TEMPLATES)
    for i, cap in captions.items():
        assert caption_class[cap] == labels[i], (i, cap)
