"""Held-out evaluation: zero-shot classification (class names x templates) and
image<->text retrieval R@1/5/10.

`EvalSet` decodes a held-out set once and keeps the preprocessed tensors in memory when
they fit under `cache_bytes` (held-out sets are re-evaluated many times in a run; decoding
dominates their cost), else it streams them from the shards each time. Zero-shot
classification splits the set across ranks (each decodes only its share) and sums the
counts; retrieval needs every pair's features in one place and runs on one rank.

Given an `ImagePlan` as preprocess, held-out images take the training loader's fast path:
reduced-size JPEG decoding, uint8 batches (kept in memory at a quarter of float32's
size) normalised on the device."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dissect_dist.data.decode import ImagePlan
from dissect_dist.data.loader import ShardReader, decode_planned, decode_sample
from dissect_dist.data.manifest import Manifest
from dissect_dist.model import encode, unwrap

DEFAULT_CACHE_BYTES = 1 << 30


def iter_eval(manifest: Manifest, preprocess: Callable[[Any], torch.Tensor] | ImagePlan,
              batch_size: int, rank: int = 0, world: int = 1
              ) -> Iterator[tuple[torch.Tensor, list[str], list[dict[str, Any]]]]:
    """Decodable samples in shard order as (images, captions, json metadata) batches.
    Batch j holds the samples at manifest positions [j*batch_size, (j+1)*batch_size)
    (fewer if some are undecodable); this rank reads and decodes only the batches with
    j % world == rank."""
    reader = ShardReader(manifest)
    images: list[torch.Tensor] = []
    caps: list[str] = []
    metas: list[dict[str, Any]] = []
    g = -1  # global position of the sample in the manifest
    try:
        for shard, count in enumerate(manifest.counts.tolist()):
            for pos in range(count):
                g += 1
                if (g // batch_size) % world != rank:
                    continue
                _, got = reader.read(shard, pos)
                if not isinstance(got, str):
                    res = decode_planned(got, preprocess) if isinstance(preprocess, ImagePlan) \
                        else decode_sample(got, preprocess)
                    if not isinstance(res, str):
                        images.append(res[0])
                        caps.append(res[1])
                        metas.append(json.loads(got.get("json", b"{}")))
                if (g + 1) % batch_size == 0 and images:
                    yield torch.stack(images), caps, metas
                    images, caps, metas = [], [], []
        if images:
            yield torch.stack(images), caps, metas
    finally:
        reader.close()


class EvalSet:
    """This rank's share of a held-out set, decoded once and kept if small enough."""

    def __init__(self, manifest_path: str, preprocess: Callable[[Any], torch.Tensor] | ImagePlan,
                 batch_size: int = 512, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 rank: int = 0, world: int = 1) -> None:
        self.manifest = Manifest.load(manifest_path)
        self.preprocess, self.batch_size = preprocess, batch_size
        self.cache_bytes, self.rank, self.world = cache_bytes, rank, world
        self._batches: list[tuple[torch.Tensor, list[str], list[dict[str, Any]]]] | None = None
        self.plan = preprocess if isinstance(preprocess, ImagePlan) else None

    def images_on(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype
                  ) -> torch.Tensor:
        """A batch's images on `device` as `dtype` (uint8 ones normalised there)."""
        if self.plan is not None:
            return self.plan.normalize(images, device, dtype)
        return images.to(device, dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], list[dict[str, Any]]]]:
        if self._batches is not None:
            yield from self._batches
            return
        kept: list[tuple[torch.Tensor, list[str], list[dict[str, Any]]]] = []
        fits = True
        for batch in iter_eval(self.manifest, self.preprocess, self.batch_size, self.rank,
                               self.world):
            if fits and not kept:  # size the whole share from its first batch
                per_sample = batch[0].element_size() * batch[0][0].numel()
                fits = per_sample * self.manifest.total // self.world <= self.cache_bytes
            if fits:
                kept.append(batch)
            yield batch
        if fits:
            self._batches = kept


def _dtype(model: torch.nn.Module) -> torch.dtype:
    """The weights' dtype (bf16 under DeepSpeed bf16): the eval images are cast to it
    (fp32 for a module without parameters)."""
    p = next(unwrap(model).parameters(), None)
    return torch.float32 if p is None else p.dtype


def class_weights(model: torch.nn.Module, tokenizer: Any, root: str,
                  device: torch.device) -> torch.Tensor:
    """(C, d) class embeddings: each class name in every template, averaged, normalised."""
    spec = json.loads((Path(root) / "classes.json").read_text())
    m = unwrap(model)
    cls = []
    for c in spec["classes"]:
        group = [t.format(c) for t in spec["templates"]]
        f = m.encode_text(tokenizer(group).to(device), normalize=True).float().mean(0)
        cls.append(f / f.norm())
    return torch.stack(cls)


@torch.no_grad()
def zeroshot_counts(model: torch.nn.Module, tokenizer: Any, evalset: EvalSet, root: str,
                    device: torch.device) -> tuple[int, int]:
    """(correct, total) over the eval set's share of `root`/test (sum over ranks)."""
    weights = class_weights(model, tokenizer, root, device)
    m = unwrap(model)
    correct = total = 0
    for images, _, metas in evalset:
        f = m.encode_image(evalset.images_on(images, device, _dtype(m)), normalize=True).float()
        pred = (f @ weights.t()).argmax(-1).cpu()
        labels = torch.tensor([md["label"] for md in metas])
        correct += int((pred == labels).sum())
        total += labels.numel()
    return correct, total


@torch.no_grad()
def retrieval_on(model: torch.nn.Module, tokenizer: Any, evalset: EvalSet,
                 device: torch.device) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10 over a held-out set of pairs."""
    fi, ft = [], []
    for images, caps, _ in evalset:
        i, t = encode(model, evalset.images_on(images, device, _dtype(model)),
                      tokenizer(caps).to(device))
        fi.append(i.float())
        ft.append(t.float())
    img, txt = torch.cat(fi), torch.cat(ft)
    sim = img @ txt.t()  # (n, n), pair i is (image i, text i)
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        rank = (s > s[target, target][:, None]).sum(1)  # how many beat the true pair
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out

