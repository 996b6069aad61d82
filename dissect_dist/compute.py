"""What a run spends: pairs loaded, pairs scored, rows trained, their FLOPs, wall time.

FLOPs are counted once per model and row shape with `torch.utils.flop_counter.
FlopCounterMode` (one image-text pair through both towers: the no-grad scoring forward,
and the training forward + backward), then multiplied by each step's rows. FlopCounterMode
counts matrix products, convolutions and attention (2 FLOPs per multiply-add), not
element-wise work (norms, activations, softmax), as is usual. The contrastive loss's
K x K logit product is added analytically: 2 K^2 d forward and 4 K^2 d backward for K kept
rows of feature width d, on every one of the W ranks (each computes the whole loss:
loss.py), 6 W K^2 d; the per-sample loss of the loss-based selectors adds 4 B^2 d for the
B scored rows (each rank's b rows against all B, two products). Loading and decoding are
not FLOPs: they are in the wall time (`wall_s`, the training loop's seconds, data waits
included, evaluation and checkpoints excluded).

Every rank computes the same global step cost on the host from the row counts that the
loss's all-gather already carries (no extra collective, no extra device sync).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclasses.dataclass(frozen=True)
class RowCost:
    """FLOPs of one image-text pair through a model (count_row_cost)."""

    score: int  # the no-grad scoring forward of both towers
    train: int  # the training forward + backward of both towers
    dim: int  # feature width d (for the loss's logits)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def count_row_cost(model: Any, image: torch.Tensor, text: torch.Tensor,
                   score_patch_dropout: float = 0.0, score_resolution: int = 0) -> RowCost:
    """Count one pair's FLOPs on `model` (an open_clip CLIP, not yet wrapped by an engine):
    image (1, 3, H, W), text (1, L) as the loader makes them; the scoring pass with
    selection.score_patch_dropout's share of the image patches dropped and at
    selection.score_resolution (the resize itself is not counted: a few FLOPs per pixel
    against a tower's millions). Leaves the model's
    weights, gradients, mode and the random state as they were."""
    from dissect_dist import model as modellib

    if image.shape[0] != 1 or text.shape[0] != 1:
        raise ValueError(f"count_row_cost takes one row, got {image.shape[0]} images and "
                         f"{text.shape[0]} texts")
    was_training = model.training
    grads = [p.grad for p in model.parameters()]
    with torch.random.fork_rng(devices=[]):
        model.train()
        drop = modellib.ScoringPatchDropout(score_patch_dropout, torch.Generator()) \
            if score_patch_dropout > 0 else None
        small = modellib.resize_images(image, score_resolution) if score_resolution else image
        with torch.no_grad(), FlopCounterMode(display=False) as fc, \
                modellib.scoring_patch_dropout(model, drop), \
                modellib.scoring_resolution(model, score_resolution):
            img, _ = modellib.encode(model, small, text)
        score = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            img, txt = modellib.encode(model, image, text)
            torch.autograd.backward(img.sum() + txt.sum())
        train = fc.get_total_flops()
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    model.train(was_training)
    if score <= 0 or train <= score:
        raise RuntimeError(f"FLOP count of one pair: scoring {score}, training {train}; "
                           "expected 0 < scoring < training")
    return RowCost(score=int(score), train=int(train), dim=int(img.shape[1]))


@dataclasses.dataclass
class StepCost:
    """One step, all ranks together (identical on every rank)."""

    loaded: int  # pairs the ranks' batches held
    scored: int  # pairs through the strategy's scoring pass (0 without one)
    trained: int  # rows trained on (K)
    flops_score: float
    flops_train: float


def step_cost(row: RowCost, loaded: list[int], kept: list[int], *, scored: bool,
              per_sample_loss: bool) -> StepCost:
    """The step's cost from every rank's loaded and kept row counts. A rank that keeps no
    row forwards one blank row (model.encode_kept), which costs like a kept one."""
    b, k = sum(loaded), sum(kept)
    forwarded = sum(max(c, 1) for c in kept)
    fs = float(b * row.score + (4 * b * b * row.dim if per_sample_loss else 0)) if scored \
        else 0.0
    ft = float(forwarded * row.train + 6 * len(kept) * k * k * row.dim)
    return StepCost(loaded=b, scored=b if scored else 0, trained=k, flops_score=fs,
                    flops_train=ft)


class Ledger:
    """The run's totals (checkpointed) and the current log window's sums."""

    FIELDS = ("loaded", "scored", "trained", "flops_score", "flops_train", "flops_reference",
              "wall_s")

    def __init__(self) -> None:
        self.total = dict.fromkeys(self.FIELDS, 0.0)
        self.window = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, cost: StepCost, wall_s: float) -> None:
        for d in (self.total, self.window):
            d["loaded"] += cost.loaded
            d["scored"] += cost.scored
            d["trained"] += cost.trained
            d["flops_score"] += cost.flops_score
            d["flops_train"] += cost.flops_train
            d["wall_s"] += wall_s

    def charge_reference(self, flops: float) -> None:
        """A reference model's cost, paid once by a run that reads its scores: its
        training and its scoring pass over the data set (launch/score.py records both)."""
        self.total["flops_reference"] += flops
        self.window["flops_reference"] += flops

    @property
    def flops(self) -> float:
        """Everything the run has paid for: scoring, training and any reference model."""
        return (self.total["flops_score"] + self.total["flops_train"]
                + self.total["flops_reference"])

    def take_window(self) -> dict[str, Any]:
        """The metrics of a train row: the window's sums and the run's totals."""
        w, self.window = self.window, dict.fromkeys(self.FIELDS, 0.0)
        names = {"loaded": "pairs_loaded", "scored": "pairs_scored",
                 "trained": "rows_trained"}
        out: dict[str, Any] = {}
        for k in self.FIELDS:
            name = names.get(k, k)
            cast = int if k in names else float
            out[name] = cast(w[k])
            out[f"{name}_total"] = cast(self.total[k])
        out["flops_total"] = self.flops
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"total": dict(self.total)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.total.update({k: float(v) for k, v in sd.get("total", {}).items()
                           if k in self.total})
