"""Sharded, Zarr-backed store of one historical score per training sample.

Knows nothing about CLIP: ids in, scores in, historical scores out.
"""

from store.collective import Collective, SingleProcess, TorchDistributed
from store.layout import Layout
from store.persist import SnapshotError, list_steps, read_commit
from store.rules import Frozen, Momentum, Overwrite, UpdateRule
from store.score_store import ScoreStore, StoreInputError

__all__ = [
    "Collective", "Frozen", "Layout", "Momentum", "Overwrite", "ScoreStore",
    "SingleProcess", "SnapshotError", "StoreInputError", "TorchDistributed",
    "UpdateRule", "list_steps", "read_commit",
]
