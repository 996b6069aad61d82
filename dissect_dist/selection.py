"""Sample selection: one protocol, one registry, one ranking routine.

A strategy turns a scored batch into one ranking key per sample (higher = keep);
`Selector` ranks the keys over the global batch (or each rank's own batch) and
returns this rank's keep mask. Ties (every key equal, e.g. first-sight δ = 0) are
broken by a seeded random key from a generator that is checkpointed, so selection is
deterministic and not biased toward low ids or low ranks.

    strategy          key                                       store rule
    full              (no ranking: everything kept, r = 1)       -
    random            uniform random                             -
    clipscore         curr                                       -
    small_loss        -per-sample InfoNCE                        -
    big_loss          +per-sample InfoNCE                        -
    dissect_momentum  δ = hist - curr (new: 0 or -curr)          Momentum(β)
    dissect_warmup    epoch < T_w: random (or full)              Overwrite
                      then (hist - mean hist) - (curr - mean curr) Frozen
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from store import Frozen, Momentum, Overwrite, ScoreStore

Scope = Literal["global", "local"]


@dataclasses.dataclass
class ScoredBatch:
    ids: torch.Tensor  # (b,) int64 global sample ids
    curr: torch.Tensor | None  # (b,) CLIPScore = max(100 cos, 0), None if not scored
    per_sample_loss: torch.Tensor | None  # (b,) for the loss-based strategies
    epoch: int


@dataclasses.dataclass
class Selection:
    keep: torch.Tensor  # (b,) bool, this rank's rows to train on
    key: torch.Tensor | None  # (b,) the ranking key (δ for dissect), for diagnostics
    hist: torch.Tensor | None = None  # (b,) historical scores used, when any


class Ranking:
    """What a strategy may ask of the ranking context: scope-aware means."""

    def __init__(self, scope: Scope, world_size: int) -> None:
        self.scope, self.world_size = scope, world_size

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the ranked batch: the global batch (collective) or this rank's."""
        s = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)])
        if self.scope == "global" and self.world_size > 1:
            dist.all_reduce(s)
        return s[0] / s[1].clamp(min=1)


class Strategy(Protocol):
    needs_scores: bool  # does the step run the no-grad scoring pass?
    needs_loss: bool  # does it need the per-sample loss?

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Selection | None:
        """Per-sample keys (collective for store-backed strategies), or None = keep all."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


class _Stateless:
    needs_scores = False
    needs_loss = False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        return None


class Full(_Stateless):
    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Selection | None:
        return None


class RandomSel(_Stateless):
    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Selection:
        # Drawn from the selection generator in the same order on every rank (see
        # Selector), so this is "a random r% of the global batch".
        return Selection(keep=torch.empty(0, dtype=torch.bool), key=None)


class ClipScoreSel(_Stateless):
    needs_scores = True

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Selection:
        assert batch.curr is not None
        return Selection(torch.empty(0, dtype=torch.bool), batch.curr)


class LossSel(_Stateless):
    needs_scores = True
    needs_loss = True

    def __init__(self, sign: float) -> None:
        self.sign = sign

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Selection:
        assert batch.per_sample_loss is not None
        return Selection(torch.empty(0, dtype=torch.bool), self.sign * batch.per_sample_loss)


class DissectMomentum(_Stateless):
    """δ = hist - curr with temporal ensembling of hist (β); the store records
    hist := curr at a sample's first sighting and β-averages from then on.

    first_sight sets only the ranking key of a sample with no history yet:
    'curr' ranks it by δ = curr - curr = 0 (ties broken at random); 'zero' by
    δ = 0 - curr, which keeps the lowest-scoring pairs, as the reference code ranks its
    first epoch against a zero-initialised history. One difference: the reference keys
    this on epoch == 0, this project on a sample's first sighting. They agree except for
    samples first seen after epoch 0 (those in epoch 0's drop-last remainder), which the
    reference ranks by 0 - curr too but then stores 0.1*curr (its epoch-0 branch no
    longer applies), where this project stores curr."""

    needs_scores = True

    def __init__(self, store: ScoreStore, beta: float, first_sight: Literal["curr", "zero"]):
        if first_sight not in ("curr", "zero"):
            raise ValueError(f"first_sight={first_sight!r}: use 'curr' or 'zero'")
        self.store, self.rule, self.first_sight = store, Momentum(beta=beta), first_sight

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Selection:
        assert batch.curr is not None
        hist = self.store.exchange(batch.ids, batch.curr, self.rule)  # pre-update values
        start = batch.curr if self.first_sight == "curr" else torch.zeros_like(batch.curr)
        hist = torch.where(torch.isnan(hist), start, hist)
        return Selection(torch.empty(0, dtype=torch.bool), hist - batch.curr, hist)


class DissectWarmup(_Stateless):
    """Warm-up for `warmup_epochs` epochs on a random r% (or everything) while recording
    hist := curr; then hist is frozen and δ = (hist - mean hist) - (curr - mean curr),
    means over the ranked batch. A sample with no recorded score uses hist := curr."""

    needs_scores = True

    def __init__(self, store: ScoreStore, warmup_epochs: int,
                 warmup_train: Literal["random", "full"]) -> None:
        self.store, self.warmup_epochs, self.warmup_train = store, warmup_epochs, warmup_train

    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.warmup_epochs

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Selection | None:
        assert batch.curr is not None
        if self.in_warmup(batch.epoch):
            self.store.exchange(batch.ids, batch.curr, Overwrite())
            if self.warmup_train == "full":
                return None
            return Selection(torch.empty(0, dtype=torch.bool), None)  # random r%
        hist = self.store.exchange(batch.ids, batch.curr, Frozen())
        hist = torch.where(torch.isnan(hist), batch.curr, hist)
        delta = (hist - ranking.mean(hist)) - (batch.curr - ranking.mean(batch.curr))
        return Selection(torch.empty(0, dtype=torch.bool), delta, hist)


REGISTRY: dict[str, Callable[..., Strategy]] = {
    "full": lambda **kw: Full(),
    "random": lambda **kw: RandomSel(),
    "clipscore": lambda **kw: ClipScoreSel(),
    "small_loss": lambda **kw: LossSel(-1.0),
    "big_loss": lambda **kw: LossSel(+1.0),
    "dissect_momentum": lambda store, beta, first_sight, **kw: DissectMomentum(
        store, beta, first_sight),
    "dissect_warmup": lambda store, warmup_epochs, warmup_train, **kw: DissectWarmup(
        store, warmup_epochs, warmup_train),
}


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    if name not in REGISTRY:
        raise ValueError(f"selection.strategy={name!r}: choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


class Selector:
    """Ranks a strategy's keys and returns the keep mask of this rank's rows.

    global scope: k = round(r * B) over this step's global batch B = sum of the ranks'
    actual batch sizes b_r; every rank computes the identical top-k from all-gathered
    keys. local scope: k_r = round(r * b_r) over the rows this rank has this step.
    round() is Python's: a fraction of exactly .5 goes to the even neighbour.

    local scope is the reference code's scope, not its count: its src/train.py
    (github.com/MediaBrain-SJTU/DISSect) keeps k = int(batch_size * select_rate) =
    floor(r * the configured per-rank batch). Where r * b has a fraction above .5 this
    keeps one row more per rank: r = 0.3, b = 32 keeps 10 here (round(9.6)), 9 in the
    reference. A batch shorter than configured (undecodable samples skipped) is ranked
    on the rows it has here.

    max_rows (the per-rank batch size, when known) lets the global ranking gather every
    rank's keys and row count in one collective instead of two."""

    def __init__(self, strategy: Strategy, ratio: float, scope: Scope, rank: int,
                 world_size: int, seed: int, max_rows: int | None = None) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"selection.ratio={ratio}: need 0 < r <= 1")
        if scope not in ("global", "local"):
            raise ValueError(f"selection.scope={scope!r}: use 'global' or 'local'")
        self.strategy, self.ratio, self.scope = strategy, ratio, scope
        self.rank, self.world_size = rank, world_size
        if max_rows is not None and not 0 < max_rows < 2**24:
            raise ValueError(f"max_rows={max_rows}: need 0 < max_rows < 2**24")
        self.max_rows = max_rows
        # Global scope: one stream shared by all ranks (same seed, same draws).
        # Local scope: a stream per rank.
        self.generator = torch.Generator().manual_seed(
            seed if scope == "global" else seed * 1_000_003 + rank)

    def select(self, batch: ScoredBatch) -> Selection:
        ranking = Ranking(self.scope, self.world_size)
        sel = self.strategy.keys(batch, ranking)
        b = batch.ids.shape[0]
        if sel is None:
            return Selection(torch.ones(b, dtype=torch.bool, device=batch.ids.device), None)
        key = sel.key
        if self.scope == "global" and self.world_size > 1:
            # Every rank's row count and count of non-finite keys come with the keys.
            keys_all, counts, bad = _gather_padded(
                key if key is not None else torch.zeros(b, device=batch.ids.device),
                self.world_size, self.max_rows)
            offset = sum(counts[: self.rank])
        else:
            keys_all = key if key is not None else torch.zeros(b, device=batch.ids.device)
            counts, offset = [b], 0
            bad = [_nonfinite(key, self.scope, self.world_size)] if key is not None else [0]
        if any(bad):
            assert key is not None
            _refuse_nonfinite(key, batch.ids)
        total = int(sum(counts))
        # One draw per ranked row, in the same order on every rank (global scope).
        rnd = torch.rand(total, generator=self.generator).to(keys_all.device)
        primary = rnd if key is None else keys_all.float()
        k = int(round(self.ratio * total))
        # Highest key first; ties in a random, seeded order.
        order = torch.argsort(rnd)
        order = order[torch.argsort(primary[order], descending=True, stable=True)]
        keep_all = torch.zeros(total, dtype=torch.bool, device=keys_all.device)
        keep_all[order[:k]] = True
        return Selection(keep_all[offset:offset + b], key, sel.hist)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "strategy": self.strategy.state_dict(),
                "ratio": self.ratio, "scope": self.scope}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator.set_state(sd["generator"])
        self.strategy.load_state_dict(sd["strategy"])


class SelectionInputError(ValueError):
    """A non-finite ranking key: the scoring pass (or the per-sample loss) diverged."""


def _nonfinite(key: torch.Tensor, scope: Scope, world_size: int) -> int:
    """How many keys are NaN or infinite: this rank's, or under local scope with several
    ranks every rank's (one all_reduce), so that all ranks agree to stop."""
    n = (~torch.isfinite(key)).sum().reshape(1)
    if scope == "local" and world_size > 1:
        dist.all_reduce(n)
    return int(n.item())  # CPU-GPU sync point (the global ranking folds it into its own)


def _refuse_nonfinite(key: torch.Tensor, ids: torch.Tensor) -> None:
    """Raise, on every rank once the ranks know some key is NaN or infinite (a NaN would
    sort first and be kept), naming the sample id on the rank that holds it."""
    bad_here = ~torch.isfinite(key)
    if bool(bad_here.any()):
        i = int(torch.nonzero(bad_here)[0])
        raise SelectionInputError(
            f"selection key {float(key[i])} for sample id {int(ids[i])} is not finite "
            f"({int(bad_here.sum())} such keys in this rank's batch): the scoring pass or "
            "the per-sample loss diverged; check the loss, the logit scale and the learning "
            "rate, and resume from the last checkpoint")
    raise SelectionInputError(
        "selection aborted: another rank's batch has a non-finite selection key (see that "
        "rank's error)")


def _gather_padded(x: torch.Tensor, world_size: int, max_rows: int | None = None
                   ) -> tuple[torch.Tensor, list[int], list[int]]:
    """Concatenation of every rank's 1-D x (lengths may differ), rank order, with each
    rank's length and count of non-finite values (one host sync for all three). With
    max_rows, one all_gather of [count, non-finite, x, padding] (float32 holds counts
    < 2**24 exactly); without, the two counts are gathered first."""
    bad = (~torch.isfinite(x)).sum()
    if max_rows is not None:
        if x.numel() > max_rows:
            raise ValueError(f"{x.numel()} keys on rank {dist.get_rank()} exceed "
                             f"max_rows={max_rows} (the per-rank batch size)")
        buf = torch.zeros(max_rows + 2, dtype=torch.float32, device=x.device)
        buf[0] = x.numel()
        buf[1] = bad
        buf[2:x.numel() + 2] = x.float()
        bufs = [torch.empty_like(buf) for _ in range(world_size)]
        dist.all_gather(bufs, buf)
        head = torch.stack([b[:2] for b in bufs]).long().tolist()  # CPU-GPU sync point
        counts, bads = [h[0] for h in head], [h[1] for h in head]
        return torch.cat([bufs[r][2:counts[r] + 2] for r in range(world_size)]), counts, bads
    n = torch.stack([torch.tensor(x.numel(), device=x.device), bad.to(torch.int64)])
    ns = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(ns, n)
    head = torch.stack(ns).tolist()  # CPU-GPU sync point
    counts, bads = [h[0] for h in head], [h[1] for h in head]
    pad = x.new_zeros(max(counts))
    pad[: x.numel()] = x
    bufs = [torch.empty_like(pad) for _ in range(world_size)]
    dist.all_gather(bufs, pad)
    return torch.cat([bufs[r][: counts[r]] for r in range(world_size)]), counts, bads
