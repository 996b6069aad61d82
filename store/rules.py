"""Update rules: how an owner turns (old historical score, current score) into the
new historical score. Vectorised over fp32 tensors; NaN in `old` means never scored.

A rule also names how the store rounds its fp32 results into fp16 (`rounding`); the
store does the rounding (store/rounding.py)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Protocol

import torch

Rounding = Literal["nearest", "stochastic"]


class UpdateRule(Protocol):
    @property
    def rounding(self) -> Rounding:
        """How the store rounds this rule's fp32 results to fp16."""
        ...

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor | None:
        """New values for the rows of `old` (shape (k,), fp32), or None to leave the
        store unchanged."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Momentum:
    """Temporal ensembling h <- beta*h + (1-beta)*c; a never-scored sample gets h := c.

    The first sighting always records h := c. How a never-scored sample is *ranked*
    (the reference code's zero-initialised history gives it δ = 0 - c) is the selection
    strategy's business (dissect_dist.selection.DissectMomentum, `first_sight`), not the
    store's: the reference, too, stores c in its first epoch (`hist = curr if epoch == 0`,
    then 0.9*hist + 0.1*curr = curr).

    Stochastic rounding: an update moves h by (1-beta)*(c - h), which round-to-nearest
    into fp16 discards whenever that is under half an ulp (|c - h| below ~5 ulp at
    beta = 0.9: 0.31 for scores >= 64), so the history would stop following scores
    close to it; rounding up or down with probability proportional to the distance
    keeps every update exact in expectation.
    """

    beta: float = 0.9
    rounding: ClassVar[Rounding] = "stochastic"

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"Momentum beta={self.beta}: need 0 <= beta < 1")

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor:
        seen = ~torch.isnan(old)
        new = self.beta * torch.where(seen, old, 0.0) + (1.0 - self.beta) * curr
        return torch.where(seen, new, curr)


@dataclasses.dataclass(frozen=True, slots=True)
class Overwrite:
    """h := c (records the latest score; the warm-up phase of dissect_warmup).

    Round-to-nearest: the value is a one-shot record, later read as it is (frozen),
    not the sum of many small steps, so there is no drift for stochastic rounding to
    remove, and nearest is the smaller error for a single value (at most half an ulp,
    where stochastic rounding errs by up to a whole one, at random)."""

    rounding: ClassVar[Rounding] = "nearest"

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor:
        return curr


@dataclasses.dataclass(frozen=True, slots=True)
class Frozen:
    """Read-only: the store is not changed (dissect_warmup after its warm-up)."""

    rounding: ClassVar[Rounding] = "nearest"  # nothing is written

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> None:
        return None
