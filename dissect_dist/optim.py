"""The optimizer, the learning-rate schedule, and how far the run has got.

Progress is counted in samples, not steps: a step's global batch is W x b, so a step
count means different things before and after a resume with another world size.
`Progress` keeps the global samples loaded so far (before selection) and the global
batch of the run's first launch, `ref_batch`. The schedule (warm-up, cosine) and
`train.max_steps` are read in units of that first global batch ("reference steps"),
so the learning rate is one continuous function of samples seen whatever the world
size of each stretch of the run, and a run with an unchanged world is exactly the
step-indexed schedule it always was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from dissect_dist.config import OptimConfig, TrainConfig

PROGRESS_VERSION = 1


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (not on biases, norms, scales)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cfg.fused or None)


def lr_lambda(cfg: OptimConfig, total_steps: float) -> Callable[[float], float]:
    """Linear warm-up then cosine decay to 0 (or constant), as a factor of the base
    learning rate, at `step` reference steps (fractional after a world-size change)."""

    def f(step: float) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclasses.dataclass(slots=True)
class Progress:
    """Samples seen by the whole run and the unit the schedule is written in.

    samples_seen: global samples loaded, the nominal W x b per step (a sample skipped as
        undecodable still counts, so progress does not depend on data errors).
    ref_batch: the global batch W x b of the run's first launch.
    """

    samples_seen: int = 0
    ref_batch: int = 0

    def ref_steps(self) -> float:
        """Progress in reference steps (an integer while the world is unchanged)."""
        return self.samples_seen / self.ref_batch

    def total_ref_steps(self, train: TrainConfig, n_samples: int) -> int:
        """The run's length in reference steps: max_steps, or `epochs` epochs of the
        first launch's world (whole global batches; the remainder is dropped)."""
        return train.max_steps or train.epochs * (n_samples // self.ref_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"version": PROGRESS_VERSION, "samples_seen": self.samples_seen,
                "ref_batch": self.ref_batch}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != PROGRESS_VERSION:
            raise ValueError(f"run progress version {sd.get('version')}, expected "
                             f"{PROGRESS_VERSION}: this checkpoint was written by another "
                             "version of dissect-dist")
        self.samples_seen, self.ref_batch = int(sd["samples_seen"]), int(sd["ref_batch"])


def build_schedule(opt: torch.optim.Optimizer, cfg: OptimConfig, progress: Progress,
                   total_ref_steps: Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that reads the run's progress instead of counting its own calls.

    The engine calls scheduler.step() after each optimizer step, once the trainer has
    counted that step's samples, so the factor computed is the next step's. The total is
    read on every call, so a resume that changes `train.epochs` stretches the schedule
    from where the run is."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda _calls: lr_lambda(cfg, total_ref_steps())(progress.ref_steps()))
