"""Sample selection: one protocol, one registry, one ranking routine.

A strategy turns a scored batch into one ranking key per sample (higher = keep), or
says RANDOM (a random r%) or KEEP_ALL; `Selector` ranks the keys over the global batch
(or each rank's own batch) and returns this rank's keep mask. The Selector owns the
score store that the history-keeping strategies read and update through `Ranking`.
Ties (every key equal, e.g. first-sight δ = 0) are broken by a seeded random key from a
generator that is checkpointed, so selection is deterministic and not biased toward low
ids or low ranks.

    strategy          key                                       store rule
    full              KEEP_ALL (no ranking, r = 1)               -
    random            RANDOM (uniform random)                    -
    clipscore         curr                                       -
    small_loss        -per-sample InfoNCE                        -
    big_loss          +per-sample InfoNCE                        -
    dissect_momentum  δ = hist - curr (new: 0 or -curr)          Momentum(β)
    dissect_warmup    epoch < T_w: RANDOM (or KEEP_ALL)          Overwrite
                      then (hist - mean hist) - (curr - mean curr) Frozen
    oracle            Keep(not noisy): every pair the noise ledger   -
                      does not list, whatever r (a benchmark's ceiling)
    learnability      ref - curr (ref missing: 0)                 reference, read-only
    reference_filter  Keep(ref >= the (1 - r) quantile of ref over   reference, read-only
                      the whole data set), no scoring pass

`ref` is a pair's score by a reference model, scored once over the whole manifest by
launch/score.py into a score-store snapshot (selection.reference) that the step reads
through its own store with the Frozen rule. learnability is RHO-LOSS's and JEST's rule
(Mindermann et al. 2022; Evans et al. 2024: learner loss - reference loss) on CLIPScores:
DISSect's δ = hist - curr with the history taken from the reference instead of the run's
own past. reference_filter is DataComp's CLIPScore filter (Gadre et al. 2023): keep the
top r of the whole data set by the reference's score, once, and train on those pairs.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, Final, Literal, Protocol, TypeAlias

import torch
import torch.distributed as dist

from dissect_dist.gather import gather_rows
from store import Frozen, Momentum, Overwrite, ScoreStore, UpdateRule

Scope = Literal["global", "local"]


class NoKey(enum.Enum):
    """What a strategy returns instead of keys when it does not rank."""

    RANDOM = "random"  # a random r% of the ranked batch (the selector's seeded generator)
    KEEP_ALL = "keep_all"  # every row, whatever r


RANDOM: Final = NoKey.RANDOM
KEEP_ALL: Final = NoKey.KEEP_ALL


@dataclasses.dataclass(frozen=True)
class Keep:
    """What a strategy returns to keep exactly these rows, whatever r (no ranking)."""

    mask: torch.Tensor  # (b,) bool


# (b,) ranking keys, higher = keep, or what to do without keys.
Keys: TypeAlias = "torch.Tensor | Keep | Literal[NoKey.RANDOM, NoKey.KEEP_ALL]"


@dataclasses.dataclass
class ScoredBatch:
    ids: torch.Tensor  # (b,) int64 global sample ids
    curr: torch.Tensor | None  # (b,) CLIPScore = max(100 cos, 0), None if not scored
    per_sample_loss: torch.Tensor | None  # (b,) for the loss-based strategies
    epoch: int


@dataclasses.dataclass
class Selection:
    keep: torch.Tensor  # (b,) bool, this rank's rows to train on
    key: torch.Tensor | None  # (b,) the ranking key (δ for dissect); None: random or keep-all


class Ranking:
    """What a strategy may ask of the step: the score store's exchange (history), the
    reference scores, and means over the ranked batch."""

    def __init__(self, scope: Scope, world_size: int, store: ScoreStore | None = None,
                 reference: ScoreStore | None = None) -> None:
        self.scope, self.world_size, self.store = scope, world_size, store
        self.reference = reference

    def reference_scores(self, ids: torch.Tensor) -> torch.Tensor:
        """Collective. (b,) the reference model's scores of ids (NaN: not scored)."""
        if self.reference is None:
            raise ValueError("this strategy reads reference scores: set selection.reference "
                             "to a snapshot written by launch/score.py")
        return self.reference.exchange(ids, torch.zeros(ids.shape, device=ids.device),
                                       Frozen())

    def exchange(self, ids: torch.Tensor, curr: torch.Tensor, rule: UpdateRule) -> torch.Tensor:
        """Collective. (b,) historical scores of ids before this step (NaN: never scored);
        the store applies `rule` with curr."""
        if self.store is None:
            raise ValueError("this strategy keeps a history of scores: give the Selector "
                             "(or the Ranking) a ScoreStore")
        return self.store.exchange(ids, curr, rule)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the ranked batch: the global batch (collective) or this rank's."""
        s = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)])
        if self.scope == "global" and self.world_size > 1:
            dist.all_reduce(s)
        return s[0] / s[1].clamp(min=1)


class Strategy(Protocol):
    needs_scores: bool  # does the step run the no-grad scoring pass?
    needs_loss: bool  # does it need the per-sample loss?
    needs_store: bool  # does it keep a history in the score store?
    needs_reference: bool  # does it read a reference model's scores (selection.reference)?

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        """(b,) keys, higher = keep (collective for store-backed strategies), or RANDOM or
        KEEP_ALL."""
        ...


class _Defaults:
    needs_scores = False
    needs_loss = False
    needs_store = False
    needs_reference = False


class Full(_Defaults):
    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        return KEEP_ALL


class RandomSel(_Defaults):
    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        # Drawn from the selection generator in the same order on every rank (see
        # Selector), so this is "a random r% of the global batch".
        return RANDOM


class ClipScoreSel(_Defaults):
    needs_scores = True

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        assert batch.curr is not None
        return batch.curr


class LossSel(_Defaults):
    needs_scores = True
    needs_loss = True

    def __init__(self, sign: float) -> None:
        self.sign = sign

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        assert batch.per_sample_loss is not None
        return self.sign * batch.per_sample_loss


class DissectMomentum(_Defaults):
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
    needs_store = True

    def __init__(self, beta: float, first_sight: Literal["curr", "zero"]) -> None:
        if first_sight not in ("curr", "zero"):
            raise ValueError(f"first_sight={first_sight!r}: use 'curr' or 'zero'")
        self.rule, self.first_sight = Momentum(beta=beta), first_sight

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        assert batch.curr is not None
        hist = ranking.exchange(batch.ids, batch.curr, self.rule)  # pre-update values
        start = batch.curr if self.first_sight == "curr" else torch.zeros_like(batch.curr)
        return torch.where(torch.isnan(hist), start, hist) - batch.curr


class DissectWarmup(_Defaults):
    """Warm-up for `warmup_epochs` epochs on a random r% (or everything) while recording
    hist := curr; then hist is frozen and δ = (hist - mean hist) - (curr - mean curr),
    means over the ranked batch. A sample with no recorded score uses hist := curr."""

    needs_scores = True
    needs_store = True

    def __init__(self, warmup_epochs: int, warmup_train: Literal["random", "full"]) -> None:
        self.warmup_epochs, self.warmup_train = warmup_epochs, warmup_train

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        assert batch.curr is not None
        if batch.epoch < self.warmup_epochs:
            ranking.exchange(batch.ids, batch.curr, Overwrite())
            return KEEP_ALL if self.warmup_train == "full" else RANDOM
        hist = ranking.exchange(batch.ids, batch.curr, Frozen())
        hist = torch.where(torch.isnan(hist), batch.curr, hist)
        return (hist - ranking.mean(hist)) - (batch.curr - ranking.mean(batch.curr))


class Oracle(_Defaults):
    """Keeps exactly the pairs the noise ledger does not list (data.noise_ledger: the ids
    whose caption was swapped), with no scoring pass: the ceiling of any selection that
    tries to drop mismatched pairs, at zero selection cost. A benchmark arm, not a method:
    real data has no ledger. selection.ratio does not apply (as for full)."""

    def __init__(self, noisy: torch.Tensor | None) -> None:
        if noisy is None:
            raise ValueError("selection.strategy=oracle keeps the pairs the noise ledger does "
                             "not list: set data.noise_ledger")
        self.noisy = noisy  # (N,) bool by sample id

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        if self.noisy.device != batch.ids.device:
            self.noisy = self.noisy.to(batch.ids.device)
        return Keep(~self.noisy[batch.ids])


class Learnability(_Defaults):
    """key = ref - curr: high where the reference model matches the pair and the current
    model does not yet (learnable, not noise). A pair the reference did not score
    (undecodable there) gets key 0."""

    needs_scores = True
    needs_reference = True

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        assert batch.curr is not None
        ref = ranking.reference_scores(batch.ids)
        return torch.where(torch.isnan(ref), 0.0, ref - batch.curr)


class ReferenceFilter(_Defaults):
    """Keep the pairs whose reference score is in the top `ratio` of the whole data set
    (the threshold found once, exactly, from every rank's share of the reference store),
    with no scoring pass: DataComp's CLIPScore filter, applied as the data streams by.
    Each step trains the batch's pairs above the threshold (about r of it; ties at the
    threshold are kept). A pair the reference did not score is dropped."""

    needs_reference = True

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.threshold: float | None = None

    def keys(self, batch: ScoredBatch, ranking: Ranking) -> Keys:
        if self.threshold is None:
            assert ranking.reference is not None
            self.threshold = reference_threshold(ranking.reference, self.ratio)
        ref = ranking.reference_scores(batch.ids)
        return Keep(ref >= self.threshold)  # NaN compares False: dropped


def reference_threshold(store: ScoreStore, ratio: float) -> float:
    """Collective. The largest fp16 value t with at least round(ratio x scored) of the
    store's scored values >= t: the top-`ratio` threshold, exact, from every rank's
    count per distinct fp16 value of its own range (at most 65,536 counts, all-gathered
    once; nothing per sample travels)."""
    import numpy as np

    v = store.values.detach().cpu()
    finite = v[torch.isfinite(v)].float()
    # fp16 -> its float value's order: count per distinct value through the sorted set
    # of all 65,536 fp16 values
    table = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(
        torch.float16).float()
    table = torch.from_numpy(np.unique(table[torch.isfinite(table)].numpy()))  # -0 = +0
    idx = torch.searchsorted(table, finite)
    counts = torch.bincount(idx, minlength=table.numel()).to(torch.float64)
    if store.comm.world_size > 1:
        counts = torch.as_tensor(np.sum(store.comm.all_gather_object(counts.numpy()), axis=0))
    total = float(counts.sum())
    if total == 0:
        raise ValueError("the reference store has no scored pair: score the manifest with "
                         "launch/score.py first")
    want = max(1.0, round(ratio * total))
    above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # values >= table[i]
    i = int(torch.nonzero(above >= want)[-1])
    return float(table[i])


REGISTRY: dict[str, Callable[..., Strategy]] = {
    "full": lambda **kw: Full(),
    "random": lambda **kw: RandomSel(),
    "clipscore": lambda **kw: ClipScoreSel(),
    "small_loss": lambda **kw: LossSel(-1.0),
    "big_loss": lambda **kw: LossSel(+1.0),
    "dissect_momentum": lambda beta, first_sight, **kw: DissectMomentum(beta, first_sight),
    "dissect_warmup": lambda warmup_epochs, warmup_train, **kw: DissectWarmup(
        warmup_epochs, warmup_train),
    "oracle": lambda noisy=None, **kw: Oracle(noisy),
    "learnability": lambda **kw: Learnability(),
    "reference_filter": lambda ratio=None, **kw: ReferenceFilter(
        ratio if ratio is not None else 0.3),
}


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    if name not in REGISTRY:
        raise ValueError(f"selection.strategy={name!r}: choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


class Selector:
    """Ranks a strategy's keys and returns the keep mask of this rank's rows. Owns the
    score store the strategy's history lives in (`store`; replace it to resume).

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
                 world_size: int, seed: int, max_rows: int | None = None,
                 store: ScoreStore | None = None, reference: ScoreStore | None = None
                 ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"selection.ratio={ratio}: need 0 < r <= 1")
        if scope not in ("global", "local"):
            raise ValueError(f"selection.scope={scope!r}: use 'global' or 'local'")
        if strategy.needs_store and store is None:
            raise ValueError(f"{type(strategy).__name__} keeps a history of scores: give "
                             "the Selector a ScoreStore (store=...)")
        if strategy.needs_reference and reference is None:
            raise ValueError(f"{type(strategy).__name__} reads a reference model's scores: "
                             "give the Selector the reference store (reference=...)")
        self.strategy, self.ratio, self.scope, self.store = strategy, ratio, scope, store
        self.reference = reference
        self.rank, self.world_size = rank, world_size
        if max_rows is not None and not 0 < max_rows < 2**24:
            raise ValueError(f"max_rows={max_rows}: need 0 < max_rows < 2**24")
        self.max_rows = max_rows
        # Global scope: one stream shared by all ranks (same seed, same draws).
        # Local scope: a stream per rank.
        self.generator = torch.Generator().manual_seed(
            seed if scope == "global" else seed * 1_000_003 + rank)

    def select(self, batch: ScoredBatch) -> Selection:
        keys = self.strategy.keys(batch, Ranking(self.scope, self.world_size, self.store,
                                                 self.reference))
        b = batch.ids.shape[0]
        if keys is KEEP_ALL:
            return Selection(torch.ones(b, dtype=torch.bool, device=batch.ids.device), None)
        if isinstance(keys, Keep):
            return Selection(keys.mask, None)
        key = None if keys is RANDOM else keys
        # RANDOM ranks zeros: only the row counts matter, and the draws below decide.
        ranked = key if key is not None else torch.zeros(b, device=batch.ids.device)
        if self.scope == "global" and self.world_size > 1:
            # Every rank's row count and count of non-finite keys come with the keys.
            keys_all, counts, bad = gather_rows(ranked, self.world_size,
                                                max_rows=self.max_rows,
                                                flag=(~torch.isfinite(ranked)).sum())
            offset = sum(counts[: self.rank])
        else:
            keys_all, counts, offset = ranked, [b], 0
            bad = [_nonfinite(key, self.scope, self.world_size)] if key is not None else [0]
        if any(bad):
            _refuse_nonfinite(ranked, batch.ids)
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
        return Selection(keep_all[offset:offset + b], key)

    def state_dict(self) -> dict[str, Any]:
        """The generator only: the store is saved apart (checkpoint.save), and the
        strategies keep no state of their own."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator.set_state(sd["generator"])


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
