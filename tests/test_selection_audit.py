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


def test_mechanism_splits_scores_by_kept_and_noisy_per_window_of_steps(tmp_path: Path):
    """Two windows of two steps, two ranks, four pairs of which id 3 is noisy."""
    labels = np.array([0, 0, 1, 1])

    def rec(path: Path, rows: list[tuple[int, list[int], list[bool], list[float] | None]]):
        path.write_text("".join(json.dumps({"step": s, "epoch": s, "ids": ids, "keep": keep,
                                            "key": None, "curr": curr}) + "\n"
                                for s, ids, keep, curr in rows))

    rec(tmp_path / "samples-rank0.jsonl",
        [(0, [0, 3], [True, False], [10.0, 2.0]), (1, [1, 2], [True, False], [8.0, 4.0]),
         (2, [3, 0], [True, False], [30.0, 12.0]), (3, [2, 1], [True, False], [9.0, 3.0])])
    rec(tmp_path / "samples-rank1.jsonl",
        [(0, [1, 2], [False, True], [5.0, 7.0]), (1, [0, 3], [False, True], [6.0, 20.0]),
         (2, [1, 2], [True, True], [1.0, 1.0]), (3, [3, 0], [True, False], [40.0, 14.0])])
    m = sa.mechanism(tmp_path, labels, noisy_ids=np.array([3]), windows=2)
    assert m["window_end_step"] == [2, 4]
    # window 0 trained 0, 1, 2, 3 (steps 0-1); window 1 trained 3, 2, 1, 2, 3
    assert m["kept_precision"] == [0.75, 0.6]
    assert m["distinct_trained"] == [1.0, 0.75] and m["kept_again"] == [None, 1.0]
    assert m["class_share_min"] == [0.5, 0.2] and m["class_share_max"] == [0.5, 0.8]
    # the kept noisy pair's score (20, then 30 and 40) against the unkept one's (2)
    assert m["score_kept_noisy"] == [20.0, 35.0] and m["score_unkept_noisy"] == [2.0, None]
    assert m["score_kept_clean"] == [(10 + 8 + 7) / 3, (9 + 1 + 1) / 3]
    assert m["score_unkept_clean"] == [(4 + 5 + 6) / 3, (12 + 3 + 14) / 3]
    # one kept row of two had the higher score at every step (rank 1); where both were
    # kept (rank 1, step 2, equal scores) they share the mean rank, 0.5
    assert m["kept_score_rank"] == [1.0, pytest.approx((1 + 1 + 0.5 + 0.5 + 1) / 5)]
    assert m["times_trained"]["noisy"]["mean"] == 3.0  # steps 1, 2, 3
    assert m["times_trained"]["clean"]["mean"] == 2.0  # ids 0, 1, 2: once, twice, 3 times
    m["heldout"] = {"curve": [[2, 0.3], [4, 0.5]]}
    png = sa.mechanism_plot({"regime": "r", "noise": 0.25, "seed": 0, "runs": {"s": m}},
                            tmp_path / "m.png")
    assert png.stat().st_size > 5000


def test_mechanism_refuses_a_run_without_a_sample_record(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="train.record_samples=true"):
        sa.mechanism(tmp_path, np.array([0]), np.array([], dtype=np.int64))


def test_mechanism_scores_only_the_rows_that_were_scored(tmp_path: Path):
    """A window mixing steps with and without scores (a record resumed across a change of
    strategy) and a run shorter than the windows asked for."""
    (tmp_path / "samples-rank0.jsonl").write_text(
        json.dumps({"step": 0, "epoch": 0, "ids": [0, 1, 2], "keep": [True, False, False],
                    "key": None, "curr": None}) + "\n"
        + json.dumps({"step": 1, "epoch": 0, "ids": [1, 2], "keep": [False, True],
                      "key": None, "curr": [3.0, 9.0]}) + "\n")
    m = sa.mechanism(tmp_path, np.array([0, 1, 2]), noisy_ids=np.array([2]), windows=8)
    assert m["window_end_step"] == [1, 2]  # two steps: two windows, not eight
    assert m["score_kept_noisy"] == [None, 9.0] and m["score_unkept_clean"] == [None, 3.0]
    assert m["kept_precision"] == [1.0, 0.0]
