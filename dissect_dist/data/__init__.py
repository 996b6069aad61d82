"""Data: manifest (dense sample ids), deterministic epoch order, the resumable
WebDataset loader, and dataset builders."""

from dissect_dist.data.loader import Batch, DataStalled, WebDatasetLoader
from dissect_dist.data.manifest import Manifest, ManifestError
from dissect_dist.data.order import OrderSpec, rank_batches

__all__ = ["Batch", "DataStalled", "Manifest", "ManifestError", "OrderSpec", "WebDatasetLoader",
           "rank_batches"]
