"""The DeepSpeed engine as the trainer (and the benchmarks) run it: parameters laid out on
16-byte boundaries whatever the precision and ZeRO stage, and a check that says so.

Why it matters. Under ZeRO 1/2 DeepSpeed flattens every parameter group into one buffer
and turns each module parameter into a view of it. Without padding between parameters,
the 1-element logit_scale (first of the no-decay group) shifts every later parameter to an
odd bf16 offset. On CUDA, cuBLASLt's fused bias GEMM assumes the output is only as aligned
as the bias pointer and LayerNorm drops to its unvectorised kernel: the scoring pass (almost
only biased linears) ran ~4x slower inside the engine than on a freshly allocated model.

What this module sets (DeepSpeed 0.19.8):
- `zero_optimization.parameter_alignment` pads each parameter in the flat buffer to 16 bytes
  (see RunConfig.deepspeed_config): every module parameter starts 16-byte aligned.
- The partition boundary. ZeRO cuts the flat buffer into one partition per rank, sized in
  multiples of a hard-coded 2 elements (DeepSpeedZeroOptimizer.nccl_start_alignment_factor),
  so the fp32 master fragment of a parameter that starts inside rank r>0's partition sits at
  an offset that is only 8-byte aligned whenever the partition size is 2 mod 4. DeepSpeed has
  no setting for it; `_partition_granularity` raises the factor to PARTITION_ELEMENTS while
  the optimizer is built (the value is read by every later use, the checkpoint re-cuts
  included, so the optimizer is consistent with itself). The ZeRO step updates the flat fp32
  partition as one tensor, so this alignment is for readers of single fragments (the
  logit_scale clamp, checkpoint conversion), not for the step's speed.

Checkpoints written before this layout hold the optimizer state cut at other positions; the
trainer loads them per parameter through DeepSpeed's universal format (checkpoint.LAYOUT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

ALIGN_BYTES = 16
# ZeRO partition sizes in elements: a multiple of 8 puts every fragment of a 16-byte aligned
# parameter on a 16-byte boundary of the fp32 partition (and of the bf16 one).
PARTITION_ELEMENTS = 8


@contextlib.contextmanager
def _partition_granularity(elements: int) -> Iterator[None]:
    """While active, DeepSpeedZeroOptimizer instances record nccl_start_alignment_factor
    as max(DeepSpeed's value, elements); the value stays on the instance afterwards."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    name = "nccl_start_alignment_factor"
    if name in vars(Zero):
        raise RuntimeError(f"DeepSpeedZeroOptimizer.{name} is a class attribute in this "
                           "DeepSpeed version: dissect_dist/engine.py needs updating")

    def get(self: Any) -> int:
        return int(self.__dict__[name])

    def put(self: Any, value: int) -> None:
        self.__dict__[name] = max(int(value), elements)

    setattr(Zero, name, property(get, put))
    try:
        yield
    finally:
        delattr(Zero, name)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               config: dict[str, Any]) -> Any:
    """deepspeed.initialize with the aligned layout; returns the engine. One line on rank 0
    if any parameter or fp32 master fragment still starts off a 16-byte boundary."""
    import deepspeed

    with _partition_granularity(PARTITION_ELEMENTS):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=config)
    bad = misaligned(engine)
    if (bad["module"] or bad["master"]) and engine.global_rank == 0:
        print(f"[train] warning: {len(bad['module'])} module parameter(s) and "
              f"{len(bad['master'])} fp32 master fragment(s) start off a {ALIGN_BYTES}-byte "
              f"boundary after deepspeed.initialize (first: "
              f"{(bad['module'] + bad['master'])[0]}); slow CUDA kernels are likely. "
              "Report it with the DeepSpeed version and the deepspeed config", flush=True)
    return engine


def misaligned(engine: Any, align: int = ALIGN_BYTES) -> dict[str, list[str]]:
    """Names of this rank's module parameters, and of the fp32 master fragments its
    optimizer steps, whose storage does not start on an `align`-byte boundary."""
    from dissect_dist.model import master_copies

    out: dict[str, list[str]] = {"module": [], "master": []}
    for name, p in engine.module.named_parameters():
        if p.data_ptr() % align:
            out["module"].append(name)
        for hp in master_copies(engine, p):
            if hp.numel() and hp.data_ptr() % align:
                out["master"].append(name)
    return out
