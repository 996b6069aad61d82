"""Canaries: selection health without a noise ledger (selection.canaries).

On real data nobody knows which pairs are noisy, so nothing says whether the selection a run
pays for does anything. With `selection.canaries: c` a share c of the training samples is
made into known-mismatched pairs: a sample is a canary by its id alone (a seeded hash, so
the set is the same at any world size and across resumes, and needs no state of its own),
and a canary row gets the caption of another row of its rank's batch whose caption differs
(the next such row, cyclically; a row with no such partner, e.g. a batch of one, stays a
normal pair and is not counted). The swap happens on the host batch before the copy to the
device: no extra pass, no sync.

A selector that does what DISSect claims keeps fewer canaries than their share of the data,
and ranks them low: `canaries.py`'s observer logs, per log window, `canary_share` (canaries
among the rows seen) and `canary_kept_share` (among the rows kept), and per epoch
`key_auroc_rest_vs_canary` (AUROC of the ranking key, the rest against the canaries: 0.5 is
chance, above 0.5 means canaries rank lower). Canaries are trained on like any kept pair:
they cost the run c of its data."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_M1, _M2, _GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        return z ^ (z >> np.uint64(31))


def is_canary(ids: np.ndarray, share: float, seed: int) -> np.ndarray:
    """(b,) bool: which sample ids are canaries, a function of (id, seed, share) only."""
    if share <= 0:
        return np.zeros(len(ids), dtype=bool)
    h = _splitmix64(ids.astype(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def swap_captions(texts: torch.Tensor, canary: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(texts with each canary row's caption replaced by the next differing non-canary
    row's, the canaries that got one). `texts`: (b, L) token ids, host memory."""
    rows = np.flatnonzero(canary)
    if not rows.size:
        return texts, canary
    b = texts.shape[0]
    out = texts.clone()
    if texts.is_pinned():  # the loader pins on CUDA: keep the copy asynchronous
        out = out.pin_memory()
    got = np.zeros(b, dtype=bool)
    for i in rows.tolist():
        for step in range(1, b):
            j = (i + step) % b
            if not canary[j] and not torch.equal(texts[j], texts[i]):
                out[i] = texts[j]
                got[i] = True
                break
    return out, got


def canary_batch(batch: Any, share: float, seed: int) -> np.ndarray | None:
    """Make the batch's canaries in place (batch.texts) and return which rows are
    canaries (None when canaries are off)."""
    if share <= 0:
        return None
    ids = batch.ids.numpy()
    if not ids.size:
        return np.zeros(0, dtype=bool)
    batch.texts, got = swap_captions(batch.texts, is_canary(ids, share, seed))
    return got
