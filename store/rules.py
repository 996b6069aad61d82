"""Update rules: how an owner turns (old historical score, current score) into the
new historical score. Vectorised over fp32 tensors; NaN in `old` means never scored."""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

import torch


class UpdateRule(Protocol):
    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor | None:
        """New values for the rows of `old` (shape (k,), fp32), or None to leave the
        store unchanged."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Momentum:
    """Temporal ensembling h <- beta*h + (1-beta)*c.

    first_sight="curr": a never-scored sample starts at h := c (the default).
    first_sight="zero": the history starts at 0, so h := (1-beta)*c, as the reference
    DISSect code does with its zero-initialised buffer.
    """

    beta: float = 0.9
    first_sight: Literal["curr", "zero"] = "curr"

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"Momentum beta={self.beta}: need 0 <= beta < 1")
        if self.first_sight not in ("curr", "zero"):
            raise ValueError(
                f"Momentum first_sight={self.first_sight!r}: use 'curr' or 'zero'"
            )

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor:
        seen = ~torch.isnan(old)
        new = self.beta * torch.where(seen, old, 0.0) + (1.0 - self.beta) * curr
        if self.first_sight == "curr":
            new = torch.where(seen, new, curr)
        return new


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
