"""fp32 -> fp16 rounding of the store's writes: round-to-nearest, or stochastic
rounding driven by counter-based randomness.

Why stochastic: a running average h <- 0.9*h + 0.1*c written back with
round-to-nearest returns h itself whenever 0.1*|c - h| is under half an fp16 ulp, so
an fp16 history stops following scores that differ from it by less than ~5 ulp (0.31
for scores in [64, 128), 0.16 in [32, 64)). Rounding to the upper neighbour with
probability (v - lo) / (hi - lo) makes every write exact in expectation.

Why counter-based: the random number of a write is a pure function
u = hash(seed, exchange counter, global sample id), not a generator's state. Every
rank computes it for the ids it owns with no state to partition, re-split on a load
at another world size, or keep in step: the counter advances once per (collective)
exchange on every rank alike and is saved in the snapshot's commit record, so a
resumed store draws the same numbers an uninterrupted one would, at any world size.

The hash is integer arithmetic on int64 tensors that stays below 2**63 (32-bit
values times constants below 2**31), so it is exact and identical on CPU and CUDA.
"""

from __future__ import annotations

from typing import TypeVar

import torch

_M32 = 0xFFFFFFFF
# A two-round xorshift-multiply 32-bit integer hash (Chris Wellons' hash-prospector
# "lowbias32" family, constants 0x21f0aaad / 0x735a2d97). Both constants are below
# 2**31, so (32-bit value) * constant < 2**63: no int64 overflow anywhere.
_C1, _C2 = 0x21F0AAAD, 0x735A2D97
_SALT = 0x9E3779B9  # keeps seed 0, counter 0, id 0 away from the hash's fixed point 0

_Int = TypeVar("_Int", int, torch.Tensor)


def mix32(x: _Int) -> _Int:
    """Hash of 32-bit values (Python ints or int64 tensors holding [0, 2**32))."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def exchange_key(seed: int, counter: int) -> int:
    """The 32-bit key of one exchange: a hash of (seed, counter), 64 bits of each."""
    k = mix32((seed & _M32) ^ _SALT)
    for word in ((seed >> 32) & _M32, counter & _M32, (counter >> 32) & _M32):
        k = mix32(k ^ word)
    return k


def uniform(seed: int, counter: int, ids: torch.Tensor) -> torch.Tensor:
    """u in [0, 1), (k,) float32 on ids' device, for global sample ids (k,) int64 in
    [0, 2**64): 24 random bits per id, u = (hash >> 8) / 2**24, exact in fp32."""
    x = mix32(exchange_key(seed, counter) ^ (ids & _M32))
    x = mix32(x ^ ((ids >> 32) & _M32))
    return (x >> 8).to(torch.float32) * (2.0**-24)


def to_fp16_nearest(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16)


def to_fp16_stochastic(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """v (k,) fp32 -> (k,) fp16: the fp16 neighbour above v with probability
    (v - lo) / (hi - lo), where lo <= v <= hi are the two fp16 values around v,
    chosen as u < that probability (u (k,) in [0, 1)); an fp16-exact v stays as it
    is. E[result] = v up to 2**-24 of an ulp. Past fp16's largest finite value
    (65504) it saturates rather than rounding to inf."""
    r = v.to(torch.float16)  # round-to-nearest: one of the two neighbours
    rf = r.float()
    bits = r.view(torch.int16).to(torch.int32)
    # The other neighbour is one step away in the bit pattern: +1 moves away from
    # zero, -1 toward it; away from zero is up for a positive r and down for a negative.
    need_up = rf < v
    step = torch.where(need_up ^ (bits < 0), 1, -1)
    # Where v is exact the step is not used (and may wrap past -0; harmless).
    other = (bits + step).to(torch.int16).view(torch.float16).float()
    lo, hi = torch.minimum(rf, other), torch.maximum(rf, other)
    p = (v - lo) / (hi - lo)  # exact: v and lo are within one ulp, hi - lo is a power of 2
    picked = torch.where(u < p, hi, lo)
    return torch.where(rf == v, rf, picked).to(torch.float16)
