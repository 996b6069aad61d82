"""Does DeepSpeed's parameter layout slow the step? One command for a GPU: the same model
and batch timed, alternating iteration by iteration, as

  fresh           a freshly allocated model, torch AdamW (what scoring_forward.py timed);
  engine_before   the module as deepspeed.initialize returned it with the trainer's config
                  before parameters were aligned (no zero_optimization.parameter_alignment);
  engine_checked  aligned, clipping at 1.0 (optim.grad_clip's default): DeepSpeed's
                  per-step global gradient norm and bf16 overflow check;
  engine_aligned  aligned, optim.grad_clip 0: neither (dissect_dist.engine.initialize, the
                  trainer's config without clipping);

each with its misaligned-parameter count, scoring ms (the trainer's no-grad pass on B rows),
fwd+bwd ms (B rows, the engine's backward) and optimizer ms, then the trainer's own step via
gpu_smoke.py (`full` and `dissect_momentum` at r = 0.3, profiled: the phase summary).

    python benchmarks/engine_layout.py                     # ViT-B-32, B 1024, bf16, ZeRO-1
    python benchmarks/engine_layout.py --device cpu --model tiny-vit-28 --batch 16 --steps 6

On a GPU it fits one 8-minute call (about 1 min for the in-process part, 2 x ~1.5 min for
the trainer's runs). --device cpu is a dry run on DeepSpeed's CPU accelerator (numbers mean
nothing there). Writes engine_layout.json into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/engine_layout.py
    import common  # type: ignore[no-redef]

VARIANTS = ("fresh", "engine_before", "engine_checked", "engine_aligned")


def _init_single_process(device: str) -> None:
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def compare(model_name: str, batch: int, precision: str, zero: int, *, device: str,
            warmup: int = 3, iters: int = 10, log: Callable[[str], None] = print
            ) -> dict[str, Any]:
    """The three variants on one process, alternating; medians in ms per phase."""
    if device == "cpu":  # before deepspeed's first import: its CPU accelerator
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    from dissect_dist import engine as enginelib
    from dissect_dist import model as modellib
    from dissect_dist.config import build_config
    from dissect_dist.data.builders import FASHION_CLASSES, FASHION_TEMPLATES
    from dissect_dist.loss import clip_loss
    from dissect_dist.optim import build_optimizer

    _init_single_process(device)
    dev = torch.device(deepspeed.get_accelerator().current_device_name())
    cfg = build_config({"model": {"name": model_name, "precision": precision},
                        "data": {"train_manifest": "unused", "batch_size": batch},
                        "optim": {"lr": 1e-5, "grad_clip": 0.0},
                        "train": {"zero_stage": zero}})
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    amp = torch.bfloat16 if precision == "amp_bf16" else None
    torch.manual_seed(0)
    base, _, _, tokenizer = modellib.create(model_name)
    size = base.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size, device=dev, dtype=dtype)
    texts = tokenizer([FASHION_TEMPLATES[i % len(FASHION_TEMPLATES)].format(
        FASHION_CLASSES[i % len(FASHION_CLASSES)]) for i in range(batch)]).to(dev)
    before = cfg.deepspeed_config()
    before["zero_optimization"] = {"stage": zero}
    before["bf16"] = {"enabled": before["bf16"]["enabled"]}

    nets: dict[str, Any] = {}
    for v in VARIANTS:
        m = copy.deepcopy(base).to(dev)
        if v == "fresh":
            m = m.to(dtype)
            nets[v] = (m, build_optimizer(m, cfg.optim))
        elif v == "engine_before":
            eng, _, _, _ = deepspeed.initialize(model=m, optimizer=build_optimizer(m, cfg.optim),
                                                config=before)
            nets[v] = (eng, None)
        else:
            ds = cfg.deepspeed_config()
            if v == "engine_checked":  # as RunConfig.deepspeed_config with grad_clip 1.0
                ds["zero_optimization"].pop("compute_grad_norm", None)
                ds["bf16"].pop("check_grad_overflow", None)
                ds["gradient_clipping"] = 1.0
            nets[v] = (enginelib.initialize(m, build_optimizer(m, cfg.optim), None, ds), None)
    misaligned = {}
    for v, (net, _) in nets.items():
        if v == "fresh":
            misaligned[v] = {"module": sum(p.data_ptr() % 16 != 0 for p in net.parameters()),
                             "master": 0}
        else:
            bad = enginelib.misaligned(net)
            misaligned[v] = {k: len(x) for k, x in bad.items()}
        misaligned[v]["params"] = sum(1 for _ in modellib.unwrap(net).parameters())
    scorer = modellib.Scorer(mode="eval", autocast_dtype=amp)
    everything = torch.ones(batch, dtype=torch.bool, device=dev)
    dummy = (images[:1], texts[:1])

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one(v: str) -> dict[str, float]:
        net, opt = nets[v]
        t = [time.perf_counter()]
        scorer(net, images, texts)
        sync()
        t.append(time.perf_counter())
        with modellib.autocast(dev, amp):
            img, txt = modellib.encode_kept(net, images, texts, everything, dummy)
        loss = clip_loss(img, txt, modellib.unwrap(net).logit_scale, 1)
        if opt is None:
            net.backward(loss)
        else:
            loss.backward()
        sync()
        t.append(time.perf_counter())
        if opt is None:
            net.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        t.append(time.perf_counter())
        return {"score": 1e3 * (t[1] - t[0]), "fwd_bwd": 1e3 * (t[2] - t[1]),
                "optim": 1e3 * (t[3] - t[2])}

    samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for i in range(warmup + iters):  # alternating: drift hits every variant alike
        for v in VARIANTS:
            r = one(v)
            if i >= warmup:
                samples[v].append(r)
    ms = {v: {k: statistics.median(x[k] for x in rows) for k in rows[0]}
          for v, rows in samples.items()}
    for v in VARIANTS:
        ms[v]["step"] = sum(ms[v].values())
    ratios = {v: {k: ms[v][k] / ms["fresh"][k] for k in ms[v]} for v in VARIANTS}
    log(f"{model_name}, B {batch}, {precision}, ZeRO-{zero}, {dev.type}")
    log("| variant | misaligned params (module / fp32 master) | score ms | fwd+bwd ms | "
        "optim ms | step ms | score / fresh | fwd+bwd / fresh |")
    log("|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        m, r = ms[v], ratios[v]
        log(f"| {v} | {misaligned[v]['module']} / {misaligned[v]['master']} of "
            f"{misaligned[v]['params']} | {m['score']:.1f} | {m['fwd_bwd']:.1f} | "
            f"{m['optim']:.1f} | {m['step']:.1f} | {r['score']:.2f} | {r['fwd_bwd']:.2f} |")
    nets.clear()  # free the device memory for the trainer's runs
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": model_name, "batch": batch, "precision": precision, "zero": zero,
            "device": dev.type, "warmup": warmup, "iters": iters, "misaligned": misaligned,
            "ms": ms, "over_fresh": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "amp_bf16"])
    p.add_argument("--zero", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=30, help="trainer steps per gpu_smoke run")
    p.add_argument("--profile-at", type=int, default=20)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--samples", type=int, default=40960)
    p.add_argument("--no-trainer", action="store_true", help="only the in-process variants")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=str(common.RESULTS))
    a = p.parse_args()
    if a.device == "cpu":  # before deepspeed is imported: its CPU accelerator
        os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("engine_layout.py: no CUDA device here; --device cpu runs a dry run")
    if a.device == "cpu":
        torch.set_num_threads(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"dry_run": a.device == "cpu", "machine": common.machine_info(),
                           "args": vars(a)}
    res["in_process"] = compare(a.model, a.batch, a.precision, a.zero, device=a.device,
                                warmup=a.warmup, iters=a.iters,
                                log=lambda s: print(s, flush=True))
    common.write_json(out / "engine_layout.json", res)
    print(f"[engine_layout] in-process variants: {time.perf_counter() - t0:.0f} s", flush=True)
    if not a.no_trainer:
        if __package__:
            from benchmarks import gpu_smoke
        else:
            import gpu_smoke  # type: ignore[no-redef]

        manifest = gpu_smoke.build(out / "data" if a.device == "cpu"
                                   else Path("/tmp/gpu-smoke-data"), a.samples, 1024, 64)
        smoke = Namespace(model=a.model, batch_size=a.batch, workers=a.workers, steps=a.steps,
                          log_every=max(1, a.steps // 3), profile_at=a.profile_at,
                          device=a.device)
        res["trainer"] = []
        for label in ("full", "dissect_momentum"):
            r = gpu_smoke.run(label, manifest, out, smoke)
            res["trainer"].append(r)
            common.write_json(out / "engine_layout.json", res)
            split = r["step_time_ms"]
            print(f"[engine_layout] trainer {label}: {r['samples_per_s']:.0f} samples/s, "
                  f"step {sum(split.values()):.1f} ms: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in split.items()), flush=True)
        full, dis = (sum(r["step_time_ms"].values()) for r in res["trainer"])
        res["dissect_over_full_step"] = dis / full
        print(f"[engine_layout] DISSect step / full step = {dis / full:.2f} (target <= 0.7)")
    res["wall_s"] = time.perf_counter() - t0
    common.write_json(out / "engine_layout.json", res)
    print(json.dumps({k: res[k] for k in res if k != "machine"}, indent=1, default=str)[:4000])
    print(f"wrote {out / 'engine_layout.json'} in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
