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

from dissect_dist.gather import gather_rows


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              world_size: int) -> torch.Tensor:
    """Symmetric InfoNCE over the kept rows of all ranks. img, txt: (k_r, d),
    L2-normalised. Returns the mean loss over the K global rows (identical value on
    every rank). With K == 0 everywhere the loss is 0 but still depends on the
    parameters, so backward and the gradient all-reduce still run."""
    return clip_loss_counted(img, txt, logit_scale, world_size)[0]


def clip_loss_counted(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                      world_size: int, loaded: int = 0
                      ) -> tuple[torch.Tensor, list[int], list[int]]:
    """clip_loss, with every rank's kept row count and every rank's `loaded` (this rank's
    batch rows), which travel in the gather's header at no extra cost (compute.step_cost
    turns them into the step's FLOPs on every rank alike)."""
    flag = torch.tensor(loaded, dtype=torch.int64, device=img.device) if world_size > 1 \
        else torch.tensor(loaded)
    all_img, kept, loaded_all = gather_rows(img, world_size, flag=flag)
    all_txt, _, _ = gather_rows(txt, world_size)
    k = all_img.shape[0]
    if k == 0:
        return (img.sum() + txt.sum()) * 0.0 + logit_scale.sum() * 0.0, kept, loaded_all
    # Every rank computes the whole loss, so the logit scale's own gradient would be
    # counted once per rank; give each rank a 1/W share (value unchanged).
    shared = logit_scale + (logit_scale - logit_scale.detach()) * (1.0 / world_size - 1.0)
    scale = shared.exp().reshape(())
    logits = scale * all_img @ all_txt.t()  # (K, K)
    labels = torch.arange(k, device=img.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return loss, kept, loaded_all


def per_sample_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                    world_size: int) -> torch.Tensor:
    """(b,) symmetric InfoNCE of each local sample against the whole global batch
    (no gradient; for small_loss / big_loss selection)."""
    with torch.no_grad():
        all_img, counts, _ = gather_rows(img, world_size)
        all_txt, _, _ = gather_rows(txt, world_size)
        off = sum(counts[:dist.get_rank()]) if world_size > 1 else 0
        scale = logit_scale.exp().reshape(())
        b = img.shape[0]
        rows = torch.arange(off, off + b, device=img.device)
        i2t = F.cross_entropy(scale * img @ all_txt.t(), rows, reduction="none")
        t2i = F.cross_entropy(scale * txt @ all_img.t(), rows, reduction="none")
        return (i2t + t2i) / 2


def scale_for_mean_reduce(loss: torch.Tensor, world_size: int) -> torch.Tensor:
    """The loss to backward when the engine averages gradients across ranks."""
    return loss * world_size
