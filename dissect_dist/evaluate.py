"""Held-out evaluation: zero-shot classification (class names x templates) and
image<->text retrieval R@1/5/10. Run on rank 0 over every sample of the eval set."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dissect_dist.data.loader import ShardReader, decode_sample
from dissect_dist.data.manifest import Manifest
from dissect_dist.model import encode


def iter_eval(manifest: Manifest, preprocess: Callable[[Any], torch.Tensor],
              batch_size: int) -> Iterator[tuple[torch.Tensor, list[str], list[dict]]]:
    """Every decodable sample in shard order: (images, captions, json metadata)."""
    reader = ShardReader(manifest)
    images: list[torch.Tensor] = []
    caps: list[str] = []
    metas: list[dict] = []
    try:
        for shard, count in enumerate(manifest.counts.tolist()):
            for pos in range(count):
                _, got = reader.read(shard, pos)
                if isinstance(got, str):
                    continue
                res = decode_sample(got, preprocess)
                if isinstance(res, str):
                    continue
                images.append(res[0])
                caps.append(res[1])
                metas.append(json.loads(got.get("json", b"{}")))
                if len(images) == batch_size:
                    yield torch.stack(images), caps, metas
                    images, caps, metas = [], [], []
        if images:
            yield torch.stack(images), caps, metas
    finally:
        reader.close()


@torch.no_grad()
def zeroshot_accuracy(model: torch.nn.Module, tokenizer: Any, preprocess: Any, root: str,
                      device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy on `root`/test with class embeddings averaged over templates."""
    spec = json.loads((Path(root) / "classes.json").read_text())
    texts = [[t.format(c) for t in spec["templates"]] for c in spec["classes"]]
    m = getattr(model, "module", model)
    cls = []
    for group in texts:
        f = m.encode_text(tokenizer(group).to(device), normalize=True).float().mean(0)
        cls.append(f / f.norm())
    weights = torch.stack(cls)  # (C, d)
    man = Manifest.load(str(Path(root) / "test" / "manifest.json"))
    correct = total = 0
    for images, _, metas in iter_eval(man, preprocess, batch_size):
        f = m.encode_image(images.to(device), normalize=True).float()
        pred = (f @ weights.t()).argmax(-1).cpu()
        labels = torch.tensor([md["label"] for md in metas])
        correct += int((pred == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)


@torch.no_grad()
def retrieval(model: torch.nn.Module, tokenizer: Any, preprocess: Any, manifest_path: str,
              device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10 over a held-out set of pairs."""
    man = Manifest.load(manifest_path)
    fi, ft = [], []
    for images, caps, _ in iter_eval(man, preprocess, batch_size):
        i, t = encode(model, images.to(device), tokenizer(caps).to(device))
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
