"""Update rules: how an owner turns (old historical score, current score) into the
new historical score. Vectorised over fp32 tensors; NaN in `old` means never scored."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


class UpdateRule(Protocol):
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
    """

    beta: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"Momentum beta={self.beta}: need 0 <= beta < 1")

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor:
        seen = ~torch.isnan(old)
        new = self.beta * torch.where(seen, old, 0.0) + (1.0 - self.beta) * curr
        return torch.where(seen, new, curr)


@dataclasses.dataclass(frozen=True, slots=True)
class Overwrite:
    """h := c (records the latest score; the warm-up phase of dissect_warmup)."""

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor:
        return curr


@dataclasses.dataclass(frozen=True, slots=True)
class Frozen:
    """Read-only: the store is not changed (dissect_warmup after its warm-up)."""

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> None:
        return None
