"""A one-process dictionary model of the score store, the reference the real,
partitioned store must agree with, and the rank programs that drive the real one."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from store import Frozen, Momentum, Overwrite, ScoreStore, TorchDistributed

RuleSpec = tuple[Any, ...]  # ("momentum", beta) | ("overwrite",) | ("frozen",)


def make_rule(spec: RuleSpec) -> Momentum | Overwrite | Frozen:
    if spec[0] == "momentum":
        return Momentum(beta=spec[1])
    return Overwrite() if spec[0] == "overwrite" else Frozen()


def _mix32(x: np.uint32) -> np.uint32:
    """The store's 32-bit hash, in numpy's wrapping uint32 arithmetic."""
    with np.errstate(over="ignore"):
        x = np.uint32(x ^ (x >> np.uint32(16)))
        x = np.uint32(x * np.uint32(0x21F0AAAD))
        x = np.uint32(x ^ (x >> np.uint32(15)))
        x = np.uint32(x * np.uint32(0x735A2D97))
        return np.uint32(x ^ (x >> np.uint32(15)))


def model_uniform(seed: int, counter: int, i: int) -> float:
    """u in [0, 1) of sample i in exchange `counter`: hash of the 32-bit words
    seed_lo, seed_hi, counter_lo, counter_hi, id_lo, id_hi (seed_lo salted)."""
    words = [seed % 2**32 ^ 0x9E3779B9, (seed >> 32) % 2**32, counter % 2**32,
             (counter >> 32) % 2**32, i % 2**32, (i >> 32) % 2**32]
    x = _mix32(np.uint32(words[0]))
    for w in words[1:]:
        x = _mix32(np.uint32(x ^ np.uint32(w)))
    return int(x >> np.uint32(8)) / 2**24


def model_stochastic_fp16(v: np.float32, u: float) -> np.float16:
    """v rounded to the fp16 neighbour above with probability (v - lo) / (hi - lo)."""
    near = np.float16(v)
    if np.float32(near) == v:
        return near
    if np.float32(near) < v:
        lo, hi = near, np.nextafter(near, np.float16(np.inf))
    else:
        lo, hi = np.nextafter(near, np.float16(-np.inf)), near
    p = (v - np.float32(lo)) / (np.float32(hi) - np.float32(lo))  # float32 arithmetic
    return hi if u < p else lo


class DictModel:
    """id -> fp16 score; absent = never scored. Semantics written out longhand."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.exchanges = 0
        self.h: dict[int, np.float16] = {}

    def exchange(self, batches: list[tuple[list[int], list[float]]], rule: RuleSpec
                 ) -> list[list[float]]:
        before = dict(self.h)
        hists = [[float(before[i]) if i in before else float("nan") for i in ids]
                 for ids, _ in batches]
        counter, self.exchanges = self.exchanges, self.exchanges + 1
        last: dict[int, float] = {}
        for ids, scores in batches:  # global order: rank, then position
            for i, c in zip(ids, scores):
                last[i] = c
        for i, c in last.items():
            c32 = np.float32(c)
            if rule[0] == "overwrite":
                self.h[i] = np.float16(c32)
            elif rule[0] == "momentum":
                beta, one_minus = np.float32(rule[1]), np.float32(1.0 - rule[1])
                if i not in before:  # first sight records the score itself
                    new = c32
                else:
                    new = beta * np.float32(before[i]) + one_minus * c32
                u = model_uniform(self.seed, counter, i)
                self.h[i] = model_stochastic_fp16(np.float32(new), u)
        return hists

    def dense(self) -> np.ndarray:
        out = np.full(self.n, np.nan, dtype=np.float16)
        for i, v in self.h.items():
            out[i] = v
        return out


# ---------------------------------------------------------------- rank programs
# Each runs on every rank of a tests.rank_pool.RankPool as fn(ctx, *args).

def rp_new_store(ctx: dict[str, Any], n: int, chunk: int, shard: int,
                 seed: int = 0) -> tuple[int, int]:
    ctx["store"] = ScoreStore(n, TorchDistributed(), chunk_target=chunk, shard_target=shard,
                              seed=seed)
    return ctx["store"].lo, ctx["store"].hi


def rp_exchange(ctx: dict[str, Any], batches: list[tuple[list[int], list[float]]],
                rule: RuleSpec) -> list[float]:
    store: ScoreStore = ctx["store"]
    ids, scores = batches[store.comm.rank]
    hist = store.exchange(torch.tensor(ids, dtype=torch.int64),
                          torch.tensor(scores, dtype=torch.float32), make_rule(rule))
    return hist.tolist()


def rp_local_values(ctx: dict[str, Any]) -> tuple[int, np.ndarray]:
    store: ScoreStore = ctx["store"]
    return store.lo, store.local_numpy()


def rp_save(ctx: dict[str, Any], url: str, step: int) -> None:
    ctx["store"].save(url, step)


def rp_load(ctx: dict[str, Any], url: str, n: int | None, step: int | None,
            chunk: int, shard: int) -> int:
    ctx["store"] = ScoreStore.load(url, TorchDistributed(), n=n, step=step,
                                   chunk_target=chunk, shard_target=shard)
    return int(ctx["store"].loaded_record.step)


def gather_dense(pool: Any, n: int) -> np.ndarray:
    """The whole store as one (N,) fp16 array, assembled from every rank's range."""
    out = np.full(n, np.nan, dtype=np.float16)
    for lo, vals in pool.run(rp_local_values):
        out[lo:lo + vals.shape[0]] = vals
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))


def rp_exchange_random(ctx: dict[str, Any], seed: int, b: int) -> None:
    """A realistic step: each rank scores b random ids (seeded per rank)."""
    store: ScoreStore = ctx["store"]
    g = torch.Generator().manual_seed(seed * 1000 + store.comm.rank)
    ids = torch.randint(0, store.n, (b,), generator=g)
    curr = 20 + 10 * torch.rand(b, generator=g)
    store.exchange(ids, curr, Momentum(0.9))


def rp_exchange_global(ctx: dict[str, Any], seed: int, total: int) -> None:
    """One step of a global batch that does not depend on the world size: `total`
    seeded (id, score) pairs, cut into contiguous per-rank slices in rank order."""
    store: ScoreStore = ctx["store"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, store.n, (total,), generator=g)
    curr = 20 + 10 * torch.rand(total, generator=g)
    w, r = store.comm.world_size, store.comm.rank
    a, b = total * r // w, total * (r + 1) // w
    store.exchange(ids[a:b], curr[a:b], Momentum(0.9))


def rp_try_exchange(ctx: dict[str, Any], batches: list[tuple[list[Any], list[float]]]
                    ) -> str:
    """Run one exchange and report the error text ('' if none)."""
    try:
        rp_exchange(ctx, batches, ("overwrite",))
    except Exception as e:  # noqa: BLE001 - the test inspects the message
        return f"{type(e).__name__}: {e}"
    return ""
