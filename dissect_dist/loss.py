"""Contrastive (CLIP) loss over the kept rows of every rank.

Ranks keep different numbers of rows (even zero). Each rank gathers every rank's kept
features (padded to the largest count), puts its own grad-carrying features in its
slot, and computes the symmetric InfoNCE over all K kept rows. Each row's gradient is
therefore produced on exactly one rank (its owner), so the SUM over ranks of the local
gradients is the one-process gradient. Data-parallel engines AVERAGE gradients over
ranks, so `scale_for_mean_reduce` multiplies by the world size to make the applied
gradient equal the one-process one exactly (tests/test_selection_loss.py checks it against
a one-process reference on 3 ranks with uneven selections, to rtol 1e-5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_kept(local: torch.Tensor, world_size: int) -> tuple[torch.Tensor, int]:
    """All ranks' kept rows, rank order, with this rank's rows carrying gradient.
    local: (k_r, d). Returns ((K, d), offset of this rank's rows)."""
    if world_size == 1:
        return local, 0
    counts_t = torch.tensor([local.shape[0]], device=local.device, dtype=torch.int64)
    all_counts = [torch.zeros_like(counts_t) for _ in range(world_size)]
    dist.all_gather(all_counts, counts_t)
    counts = [int(c) for c in all_counts]  # CPU-GPU sync point: one small one per step
    k_max = max(counts)
    padded = local.new_zeros((k_max, local.shape[1]))
    padded[: local.shape[0]] = local.detach()
    bufs = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(bufs, padded)
    rank = dist.get_rank()
    parts = [local if r == rank else bufs[r][: counts[r]] for r in range(world_size)]
    return torch.cat(parts), sum(counts[:rank])


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              world_size: int) -> torch.Tensor:
    """Symmetric InfoNCE over the kept rows of all ranks. img, txt: (k_r, d),
    L2-normalised. Returns the mean loss over the K global rows (identical value on
    every rank). With K == 0 everywhere the loss is 0 but still depends on the
    parameters, so backward and the gradient all-reduce still run."""
    all_img, _ = gather_kept(img, world_size)
    all_txt, _ = gather_kept(txt, world_size)
    k = all_img.shape[0]
    if k == 0:
        return (img.sum() + txt.sum()) * 0.0 + logit_scale.sum() * 0.0
    # Every rank computes the whole loss, so the logit scale's own gradient would be
    # counted once per rank; give each rank a 1/W share (value unchanged).
    shared = logit_scale + (logit_scale - logit_scale.detach()) * (1.0 / world_size - 1.0)
    scale = shared.exp().reshape(())
    logits = scale * all_img @ all_txt.t()  # (K, K)
    labels = torch.arange(k, device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def per_sample_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                    world_size: int) -> torch.Tensor:
    """(b,) symmetric InfoNCE of each local sample against the whole global batch
    (no gradient; for small_loss / big_loss selection)."""
    with torch.no_grad():
        all_img, off = gather_kept(img, world_size)
        all_txt, _ = gather_kept(txt, world_size)
        scale = logit_scale.exp().reshape(())
        b = img.shape[0]
        rows = torch.arange(off, off + b, device=img.device)
        i2t = F.cross_entropy(scale * img @ all_txt.t(), rows, reduction="none")
        t2i = F.cross_entropy(scale * txt @ all_img.t(), rows, reduction="none")
        return (i2t + t2i) / 2


def scale_for_mean_reduce(loss: torch.Tensor, world_size: int) -> torch.Tensor:
    """The loss to backward when the engine averages gradients across ranks."""
    return loss * world_size
