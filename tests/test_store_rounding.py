"""Stochastic rounding of the fp16 history: the running average follows scores that
round-to-nearest would never reach, every write is one of the two fp16 neighbours,
unbiased, and drawn from (seed, exchange counter, id) alone, identically on CPU and
CUDA and across a save and load."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from store import Momentum, Overwrite, ScoreStore
from store.rounding import to_fp16_stochastic, uniform
from store.rules import Rounding
from tests.store_model import model_stochastic_fp16, model_uniform

N = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class NearestMomentum:
    """Momentum written back with round-to-nearest: the store as it was."""

    beta: float = 0.9
    rounding: ClassVar[Rounding] = "nearest"

    def apply(self, old: torch.Tensor, curr: torch.Tensor) -> torch.Tensor:
        return Momentum(self.beta).apply(old, curr)


def _push(rule: object, start: float, target: float, steps: int = 200) -> torch.Tensor:
    store = ScoreStore(N, seed=3)
    ids = torch.arange(N)
    store.exchange(ids, torch.full((N,), start), Overwrite())
    for _ in range(steps):
        store.exchange(ids, torch.full((N,), target), rule)  # type: ignore[arg-type]
    return store.values.float()


@pytest.mark.parametrize("start", [80.0, 40.0, 20.0])
def test_history_follows_a_score_0_3_above_it(start: float) -> None:
    target = start + 0.3
    moved = _push(Momentum(0.9), start, target)
    assert abs(float(moved.mean()) - target) < 0.05
    # 0.9**200 of the gap is left: each id is within a few ulps of the target.
    ulp = 2.0 ** (np.floor(np.log2(start)) - 10)
    assert float((moved - target).abs().max()) < 4 * ulp
    # Round-to-nearest stops ~5 ulp short (0.31 at 80: it never moves; 0.16 at 40).
    stuck = _push(NearestMomentum(), start, target)
    assert abs(float(stuck.mean()) - target) > 0.05


@pytest.mark.parametrize("start,target", [(80.0, 80.3), (40.0, 40.15), (20.0, 20.07)])
def test_history_leaves_the_round_to_nearest_dead_zone(start: float, target: float) -> None:
    """0.1 * |target - start| is under half an fp16 ulp here (ulp 0.0625, 0.03125,
    0.015625): round-to-nearest writes the old value back forever."""
    assert torch.all(_push(NearestMomentum(), start, target) == start)
    assert abs(float(_push(Momentum(0.9), start, target).mean()) - target) < 0.01


def _neighbours(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    near = v.astype(np.float16)
    up = near.astype(np.float32) < v
    with np.errstate(over="ignore"):  # the neighbour above 65504 (unused: it is exact)
        lo = np.where(up, near, np.nextafter(near, np.float16(-np.inf)))
        hi = np.where(up, np.nextafter(near, np.float16(np.inf)), near)
    exact = near.astype(np.float32) == v
    return np.where(exact, near, lo), np.where(exact, near, hi)


def test_every_write_is_one_of_the_two_neighbours_and_unbiased() -> None:
    g = np.random.default_rng(0)
    # Magnitudes across fp16's range, both signs, subnormals, exact values, zero.
    v = np.concatenate([
        g.uniform(0, 100, 40), -g.uniform(0, 100, 10), g.uniform(1000, 60000, 5),
        g.uniform(0, 2.0**-14, 5), -g.uniform(0, 2.0**-14, 3), [0.0, 25.5, -3.0, 65504.0],
    ]).astype(np.float32)
    reps = 20_000
    vv = torch.from_numpy(np.repeat(v, reps))
    u = uniform(11, 5, torch.arange(vv.numel(), dtype=torch.int64))
    out = to_fp16_stochastic(vv, u).numpy().reshape(v.size, reps)
    lo, hi = _neighbours(v)
    assert np.all((out == lo[:, None]) | (out == hi[:, None]))
    exact = lo == hi
    assert exact.sum() >= 4 and np.all(out[exact] == lo[exact, None])
    # Frequency of the upper neighbour = (v - lo) / (hi - lo); mean error ~ 0.
    p = (v - lo.astype(np.float32)) / np.where(exact, 1, hi.astype(np.float32) - lo)
    freq = (out == hi[:, None]).mean(axis=1)
    assert np.all(np.abs(freq - p)[~exact] < 5 * np.sqrt(0.25 / reps))
    ulp = np.where(exact, 1, hi.astype(np.float64) - lo)
    bias = (out.astype(np.float64).mean(axis=1) - v) / ulp
    assert np.all(np.abs(bias) < 5 * np.sqrt(0.25 / reps))


def test_random_numbers_are_uniform_and_differ_by_seed_counter_and_id() -> None:
    ids = torch.arange(1 << 18, dtype=torch.int64)
    u = uniform(0, 0, ids)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = ids.numel() / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 45  # chi2(15) p ~ 1e-4
    for other in (uniform(1, 0, ids), uniform(0, 1, ids), uniform(0, 0, ids + (1 << 32))):
        assert float((other == u).float().mean()) < 1e-3
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01


def test_store_hash_and_rounding_agree_with_the_numpy_longhand() -> None:
    """The dictionary model re-implements both in numpy; they must agree exactly,
    ids above 2**32 and seeds above 2**32 included."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 2**40, (300,), generator=g), torch.arange(5)])
    v = (100 * torch.rand(ids.numel(), generator=g)).float()
    for seed, counter in [(0, 0), (7, 123), (2**40 + 3, 2**33 + 1)]:
        u = uniform(seed, counter, ids)
        out = to_fp16_stochastic(v, u)
        for k in range(ids.numel()):
            uk = model_uniform(seed, counter, int(ids[k]))
            assert float(u[k]) == uk
            assert out[k].item() == float(model_stochastic_fp16(np.float32(v[k].item()), uk))


def _run(store: ScoreStore, steps: range) -> None:
    for s in steps:
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, store.n, (3000,), generator=g)
        store.exchange(ids, 20 + 10 * torch.rand(3000, generator=g), Momentum(0.9))


def test_a_loaded_store_rounds_on_exactly_as_the_uninterrupted_one(tmp_path: Path) -> None:
    whole = ScoreStore(N, seed=5, chunk_target=256, shard_target=1024)
    _run(whole, range(6))
    whole.save(str(tmp_path), 6)
    _run(whole, range(6, 12))
    back = ScoreStore.load(str(tmp_path), n=N)
    assert (back.seed, back.exchanges) == (5, 6)
    assert back.loaded_record.exchanges == 6 and back.loaded_record.seed == 5
    _run(back, range(6, 12))
    assert np.array_equal(back.local_numpy().view(np.uint16), whole.local_numpy().view(np.uint16))
    # Without the counter the continuation would round differently.
    fresh = ScoreStore.load(str(tmp_path), n=N)
    fresh.exchanges = 0
    _run(fresh, range(6, 12))
    assert not np.array_equal(fresh.local_numpy().view(np.uint16),
                              whole.local_numpy().view(np.uint16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rounding_is_bit_identical_on_cpu_and_cuda() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2**40, (1 << 20,), generator=g)
    v = torch.cat([100 * torch.rand(1 << 19, generator=g),
                   (torch.rand(1 << 19, generator=g) - 0.5) * 2.0**-12])
    for seed, counter in [(0, 0), (2**40 + 3, 2**33 + 1)]:
        u_cpu, u_gpu = uniform(seed, counter, ids), uniform(seed, counter, ids.cuda())
        assert torch.equal(u_gpu.cpu(), u_cpu)
        a, b = to_fp16_stochastic(v, u_cpu), to_fp16_stochastic(v.cuda(), u_gpu).cpu()
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    cpu, gpu = ScoreStore(N, seed=9), ScoreStore(N, seed=9, device="cuda")
    _run(cpu, range(20))
    _run(gpu, range(20))
    assert np.array_equal(cpu.local_numpy().view(np.uint16), gpu.local_numpy().view(np.uint16))
