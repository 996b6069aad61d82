"""Run on every rank by the DeepSpeed launcher (2 gloo ranks): the engine as the trainer
builds it (dissect_dist.engine.initialize, RunConfig.deepspeed_config) on tiny-vit-28, for
fp32 / bf16 / amp_bf16 x ZeRO 0 / 1 / 2. Every rank writes one JSON line per case into
OUT_DIR/rank-N.jsonl:

  layout  misaligned module parameters and fp32 master fragments, for the engine as built
          before (plain deepspeed.initialize, no parameter_alignment) and now;
  grads   3 trainer steps (encode_kept through the engine, clip_loss, engine.backward,
          engine.step); before each step() the engine's reduced gradient is compared with
          a one-process reference: a fresh module holding the engine's current weights,
          backward of the same loss over both ranks' kept rows. Gradients carried over from
          an earlier step would show as a relative difference of order 1. Also what the
          optimizer runs per step (global norm, overflow check), with and without clipping;
  ckpt    a checkpoint written by the engine as built before (run.json without
          param_layout, as the trainer wrote it) loaded by today's engine through
          checkpoint.load_engine: per-parameter fp32 weights and Adam moments compared
          with the writer's.

usage: param_layout.py layout|grads|ckpt|all OUT_DIR (all: the three in one launch)"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
)

from dissect_dist import checkpoint
from dissect_dist import engine as enginelib
from dissect_dist import model as modellib
from dissect_dist.config import build_config
from dissect_dist.loss import clip_loss, scale_for_mean_reduce
from dissect_dist.optim import build_optimizer

NAME = "tiny-vit-28"
PRECISIONS = ("fp32", "bf16", "amp_bf16")
B = 6


def run_config(precision: str, zero: int, clip: float = 0.0) -> Any:
    return build_config({"model": {"name": NAME, "precision": precision},
                         "data": {"train_manifest": "unused", "batch_size": B},
                         "optim": {"grad_clip": clip, "lr": 1e-3},
                         "train": {"zero_stage": zero}})


def before_config(cfg: Any) -> dict[str, Any]:
    """The deepspeed config the trainer passed before parameters were aligned."""
    ds = cfg.deepspeed_config()
    ds["zero_optimization"] = {"stage": cfg.train.zero_stage}
    ds["bf16"] = {"enabled": ds["bf16"]["enabled"]}
    return ds


def build(cfg: Any, old: bool, reason: str = "") -> tuple[Any, torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    model, _, pre_eval, tok = modellib.create(NAME)
    opt = build_optimizer(model, cfg.optim)
    if old:
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                            config=before_config(cfg))
    else:
        eng = enginelib.initialize(model, opt, None,
                                   checkpoint.engine_config(cfg.deepspeed_config(), reason))
    return eng, model, pre_eval, tok


OUT = Path(".")


def emit(row: dict[str, Any]) -> None:
    """One JSON line per case into OUT/rank-N.jsonl (the ranks' stdout interleave)."""
    with open(OUT / f"rank-{dist.get_rank()}.jsonl", "a") as f:
        f.write(json.dumps({"rank": dist.get_rank(), **row}) + "\n")


def layout() -> None:
    for precision in PRECISIONS:
        for zero in (0, 1, 2):
            cfg = run_config(precision, zero)
            for old in (True, False):
                eng, *_ = build(cfg, old)
                bad = enginelib.misaligned(eng)
                emit({"case": "layout", "precision": precision, "zero": zero,
                      "built": "before" if old else "now",
                      "params": sum(1 for _ in eng.module.parameters()),
                      "module": len(bad["module"]), "master": len(bad["master"]),
                      "optimizer": type(eng.optimizer).__name__})
                dist.barrier()


def batch(step: int, rank: int, tok: Any, dtype: torch.dtype) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(100 * step + rank)
    images = torch.randn(B, 3, 28, 28, generator=g).to(dtype)
    texts = tok([f"item {step} {rank} {i} {'x' * i}" for i in range(B)])
    keep = torch.rand(B, generator=g) < 0.5
    keep[0] = True
    if step == 2 and rank == 1:  # a rank that keeps no row: the dummy-row path
        keep[:] = False
    return images, texts, keep


def grads() -> None:
    world = dist.get_world_size()
    cases = [(p, z, 0.0) for p in PRECISIONS for z in (0, 1, 2)]
    cases += [("bf16", 1, 1e-3), ("fp32", 2, 1e-3), ("amp_bf16", 1, 1e-3)]
    for precision, zero, clip in cases:
        cfg = run_config(precision, zero, clip)
        eng, _, pre_eval, tok = build(cfg, old=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        amp = torch.bfloat16 if precision == "amp_bf16" else None
        dummy = modellib.blank_row(pre_eval, tok, torch.device("cpu"), dtype)
        ref, *_ = modellib.create(NAME)
        ref = ref.to(dtype)
        rel, norms = [], []
        for step in range(3):
            images, texts, keep = batch(step, dist.get_rank(), tok, dtype)
            # The reference: both ranks' kept rows, one process, the engine's weights now.
            ref.load_state_dict(eng.module.state_dict())
            ref.zero_grad(set_to_none=True)
            rows = [batch(step, r, tok, dtype) for r in range(world)]
            with modellib.autocast(torch.device("cpu"), amp):
                fi, ft = modellib.encode(ref, torch.cat([i[k] for i, _, k in rows]),
                                         torch.cat([t[k] for _, t, k in rows]))
            clip_loss(fi, ft, ref.logit_scale, 1).backward()
            # The trainer's step.
            with modellib.autocast(torch.device("cpu"), amp):
                img, txt = modellib.encode_kept(eng, images, texts, keep, dummy)
            loss = clip_loss(img, txt, eng.module.logit_scale, world)
            eng.backward(scale_for_mean_reduce(loss, world))
            diff2 = tot2 = 0.0
            for p, q in zip(eng.module.parameters(), ref.parameters()):
                g = safe_get_full_grad(p)  # collective under ZeRO 1/2
                assert g is not None and q.grad is not None
                diff2 += float((g.float() - q.grad.float()).pow(2).sum())
                tot2 += float(q.grad.float().pow(2).sum())
            rel.append((diff2 / tot2) ** 0.5)
            eng.step()
            gn = eng.get_global_grad_norm()
            norms.append({"engine": None if gn is None else float(gn), "reference": tot2 ** 0.5})
        opt = eng.optimizer
        emit({"case": "grads", "precision": precision, "zero": zero, "clip": clip,
              "optimizer": type(opt).__name__, "rel_diff": rel, "norms": norms,
              "engine_clipping": float(eng.gradient_clipping()),
              "compute_grad_norm": getattr(opt, "compute_grad_norm", None),
              "check_grad_overflow": getattr(opt, "check_grad_overflow", None)})
        dist.barrier()


def per_param_state(eng: Any) -> dict[str, list[float]]:
    opt = eng.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO 1/2: DeepSpeed links each
        opt._hp_optimizer_states_linked = False      # parameter to its Adam moments at the
        opt._lazy_init_hp_params_optimizer_state()   # first step(), not at a load: do it now
    out = {}
    for name, p in eng.module.named_parameters():
        parts = [safe_get_full_fp32_param(p)]
        parts += [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
        out[name] = [float(t.double().sum()) if t is not None else float("nan") for t in parts]
        out[name] += [float(t.double().abs().max()) if t is not None else float("nan")
                      for t in parts]
    return out


def ckpt(root: Path) -> None:
    world = dist.get_world_size()
    for precision, zero in (("bf16", 1), ("fp32", 2), ("amp_bf16", 1), ("fp32", 1)):
        cfg = run_config(precision, zero)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        amp = torch.bfloat16 if precision == "amp_bf16" else None
        for writer in ("before", "now"):
            eng, _, pre_eval, tok = build(cfg, old=writer == "before")
            dummy = modellib.blank_row(pre_eval, tok, torch.device("cpu"), dtype)
            for step in range(2):
                images, texts, keep = batch(step, dist.get_rank(), tok, dtype)
                with modellib.autocast(torch.device("cpu"), amp):
                    img, txt = modellib.encode_kept(eng, images, texts, keep, dummy)
                eng.backward(scale_for_mean_reduce(
                    clip_loss(img, txt, eng.module.logit_scale, world), world))
                eng.step()
            saved = per_param_state(eng)
            d = root / f"{precision}-z{zero}-{writer}"
            tag = "step-000000002"
            eng.save_checkpoint(str(d), tag=tag, save_latest=False)
            if dist.get_rank() == 0:
                info: dict[str, Any] = {"world_size": world}
                if writer == "now":
                    info["param_layout"] = checkpoint.LAYOUT
                (d / tag / "run.json").write_text(json.dumps(info))
            dist.barrier()
            reason = checkpoint.per_parameter_reason(str(d), tag, zero)
            reader, *_ = build(cfg, old=False, reason=reason)
            checkpoint.load_engine(reader, str(d), tag, reason)
            loaded = per_param_state(reader)
            worst = max(abs(a - b) / (abs(a) + 1e-12) for n in saved
                        for a, b in zip(saved[n], loaded[n]))
            emit({"case": "ckpt", "precision": precision, "zero": zero, "writer": writer,
                  "reason": reason, "params": len(saved), "worst_rel_diff": worst})
            dist.barrier()


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    global OUT
    what, out = [a for a in sys.argv[1:] if not a.startswith("--")]  # the launcher adds
    OUT = out = Path(out)                                              # --local_rank=N
    for part in (("layout", "grads", "ckpt") if what == "all" else (what,)):
        {"layout": layout, "grads": grads, "ckpt": lambda: ckpt(out)}[part]()


if __name__ == "__main__":
    main()
