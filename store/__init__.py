"""Sharded, Zarr-backed store of one historical score per training sample.

Knows nothing about CLIP: ids in, scores in, historical scores out.
"""

from store.collective import Collective, SingleProcess, TorchDistributed
from store.layout import Layout
from store.persist import CommitRecord, SnapshotError, SnapshotLocation
from store.rules import Frozen, Momentum, Overwrite, UpdateRule
from store.score_store import ScoreStore, StoreInputError

__all__ = [
    "Collective", "CommitRecord", "Frozen", "Layout", "Momentum", "Overwrite", "ScoreStore",
    "SingleProcess", "SnapshotError", "SnapshotLocation", "StoreInputError",
    "TorchDistributed", "UpdateRule",
]
