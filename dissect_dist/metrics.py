"""Selection diagnostics and the metric sink (JSONL + TensorBoard on rank 0 only)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for separating positive from negative
    (Mann-Whitney U with average ranks for ties). NaN when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def key_histogram(keys: np.ndarray, noisy: np.ndarray, bins: int = 40) -> dict[str, list[float]]:
    """Counts of the ranking key for clean and for noisy pairs over shared bins spanning the
    0.5-99.5 percentiles (outliers land in the end bins): the δ histograms of a run."""
    keys = np.asarray(keys, dtype=np.float64)
    noisy = np.asarray(noisy, dtype=bool)
    lo, hi = np.percentile(keys, [0.5, 99.5]) if keys.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, lo + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    clipped = np.clip(keys, lo, hi)
    return {"edges": edges.tolist(),
            "clean": np.histogram(clipped[~noisy], edges)[0].tolist(),
            "noisy": np.histogram(clipped[noisy], edges)[0].tolist()}


class MetricSink:
    """Writes metrics on rank 0; a no-op on every other rank."""

    def __init__(self, run_dir: str, rank: int, tensorboard: bool = True) -> None:
        self.active = rank == 0
        self._f = None
        self._tb: Any = None
        if self.active:
            os.makedirs(run_dir, exist_ok=True)
            self._f = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
                except ImportError:  # tensorboard is optional
                    self._tb = None

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.active or self._f is None:
            return
        self._f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and np.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
