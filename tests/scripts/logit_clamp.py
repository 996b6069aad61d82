"""Run on every rank by the DeepSpeed launcher: drive logit_scale against its bound
through a real DeepSpeed engine in each precision / ZeRO setting, with the trainer's
clamp after every step, and print (rank 0) one JSON line per setting with the fp32
value the optimizer holds and the module's value after each step.

The loss is -logit_scale for UP steps, then +logit_scale for one step: Adam with
beta1 = 0 moves the parameter by ~lr against the gradient's sign every step, so an
unbounded master copy would climb far past ln 100 and then need many steps to come
back under it."""

from __future__ import annotations

import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from dissect_dist.model import LOGIT_SCALE_MAX, clamp_logit_scale, master_copies

UP, LR = 30, 0.05
SETTINGS = [("bf16", 0), ("bf16", 1), ("bf16", 2), ("fp32", 1), ("fp32", 0)]


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Big enough that ZeRO splits the flat partition across the two ranks, so that
        # only one of them owns logit_scale's element.
        self.w = torch.nn.Linear(64, 64)
        self.logit_scale = torch.nn.Parameter(torch.tensor([4.0]))


def master_value(engine: deepspeed.DeepSpeedEngine) -> float:
    p = engine.module.logit_scale
    full = safe_get_full_fp32_param(p)  # collective under ZeRO 1/2
    if full is not None:
        return float(full.reshape(-1)[0])
    return float(master_copies(engine, p)[0].reshape(-1)[0])


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    for precision, zero in SETTINGS:
        torch.manual_seed(0)
        model = Toy()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.0, 0.999),
                                weight_decay=0.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": zero},
            "bf16": {"enabled": precision == "bf16"}, "steps_per_print": 10**9})
        x = torch.ones(1, 64, dtype=next(engine.module.parameters()).dtype)
        masters, module = [], []
        for step in range(UP + 1):
            sign = -1.0 if step < UP else 1.0
            loss = sign * engine.module.logit_scale.float().sum() + \
                engine.module.w(x).float().pow(2).mean() * 0.0
            engine.backward(loss)
            engine.step()
            clamp_logit_scale(engine)
            masters.append(master_value(engine))
            module.append(float(engine.module.logit_scale.detach().float()[0]))
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps({
                "precision": precision, "zero": zero, "optimizer": type(engine.optimizer).__name__,
                "bound": LOGIT_SCALE_MAX, "master": masters, "module": module}), flush=True)
        dist.barrier()


if __name__ == "__main__":
    main()
