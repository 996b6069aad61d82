"""What the no-grad scoring pass of a DISSect step costs next to a training forward +
backward, on one process, for the same model and batch: the cost model behind the
step-time target of `step_overhead.py` (score B rows without gradient + train on r*B rows
<= 0.7x training on B rows needs the scoring pass at ~1/3 of a forward + backward).

    python benchmarks/scoring_forward.py [--model small-vit-28] [--batch 256] [--threads 1]

Times (median of --iters after --warmup) for each variant of the scoring forward the
trainer could use (eval or train mode; `no_grad` or `inference_mode`; SDPA attention, the
default, or open_clip's stock attention with and without MHA's fast path; compiled, with
the first call's compile time reported apart), each tower alone, and the training
forward + backward of the whole batch and of r*B rows; then (--engine-zero) the same
scoring, forward + backward and optimizer step on the module as deepspeed.initialize returns
it, before and after parameters were aligned, beside the fresh model, alternating
(engine_layout.compare: a layout effect shows as a ratio over the fresh model). Inputs are random
images and real tokenised captions; nothing here depends on the data. Writes
benchmarks/results/scoring_forward_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dissect_dist import model as modellib
from dissect_dist.attention import use_sdpa
from dissect_dist.data.builders import FASHION_CLASSES, FASHION_TEMPLATES
from dissect_dist.loss import clip_loss

if __package__:
    from benchmarks import common, engine_layout
else:  # run as a file: python benchmarks/scoring_forward.py
    import common  # type: ignore[no-redef]
    import engine_layout  # type: ignore[no-redef]


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall milliseconds of fn()."""
    out = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            out.append(1e3 * (time.perf_counter() - t))
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-vit-28")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU; one rank's share)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--engine-zero", type=int, default=1, choices=[-1, 0, 1, 2],
                   help="also time the module as deepspeed.initialize returns it, before and "
                   "after parameters were aligned, beside the fresh model (the ZeRO stage; -1: "
                   "skip); see engine_layout.py")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    stock, _, _, tokenizer = modellib.create(a.model, attention="stock")
    stock = stock.to(device, dtype)
    model = copy.deepcopy(stock)  # the same weights, attention="sdpa" (the trainer's default)
    use_sdpa(model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(a.batch, 3, size, size, device=device, dtype=dtype)
    texts = tokenizer([FASHION_TEMPLATES[i % len(FASHION_TEMPLATES)].format(
        FASHION_CLASSES[i % len(FASHION_CLASSES)]) for i in range(a.batch)]).to(device)
    k = max(1, round(a.ratio * a.batch))

    def train(n: int, net: torch.nn.Module = model) -> Callable[[], None]:
        def fn() -> None:
            net.train()
            img, txt = modellib.encode(net, images[:n], texts[:n])
            clip_loss(img, txt, net.logit_scale, 1).backward()
            net.zero_grad(set_to_none=True)
        return fn

    trainer_fast = device.type != "cuda"  # the trainer's MHA fast path (mha_fastpath=auto)

    def score(mode: str, ctx: Callable[[], object], part: str = "both",
              fastpath: bool = trainer_fast, net: torch.nn.Module = model
              ) -> Callable[[], None]:
        def fn() -> None:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            net.train(mode == "train")
            with ctx():  # type: ignore[attr-defined]
                if part in ("both", "image"):
                    net.encode_image(images, normalize=True)
                if part in ("both", "text"):
                    net.encode_text(texts, normalize=True)
        return fn

    scorer = modellib.Scorer(mode="eval", autocast_dtype=None, compiled=True, device=device)
    t0 = time.perf_counter()
    scorer(model, images, texts)  # compiles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - t0
    print(f"{'compiled scoring: first call':36s} {compile_s:9.1f} s", flush=True)

    def fwd_grad(part: str) -> Callable[[], None]:
        def fn() -> None:
            model.train()
            f = (model.encode_image(images, normalize=True) if part == "image"
                 else model.encode_text(texts, normalize=True))
            f.float().sum().backward()
            model.zero_grad(set_to_none=True)
        return fn

    cases: dict[str, Callable[[], None]] = {
        "train_fwd_bwd_B": train(a.batch),
        f"train_fwd_bwd_{a.ratio}B": train(k),
        "score_eval_no_grad (trainer)": score("eval", torch.no_grad),
        "score_eval_no_grad_compiled": lambda: scorer(model, images, texts),
        "score_eval_no_grad_stock_attention": score("eval", torch.no_grad, net=stock),
        f"score_eval_no_grad_stock_mha_fastpath_{'off' if trainer_fast else 'on'}":
            score("eval", torch.no_grad, fastpath=not trainer_fast, net=stock),
        "train_fwd_bwd_B_stock_attention": train(a.batch, stock),
        "score_train_no_grad": score("train", torch.no_grad),
        "score_eval_inference_mode": score("eval", torch.inference_mode),
        "score_eval_no_grad_image_only": score("eval", torch.no_grad, "image"),
        "score_eval_no_grad_text_only": score("eval", torch.no_grad, "text"),
        "fwd_bwd_image_only": fwd_grad("image"),
        "fwd_bwd_text_only": fwd_grad("text"),
    }
    ms = {}
    for name, fn in cases.items():
        ms[name] = timed(fn, device, a.warmup, a.iters)
        print(f"{name:36s} {ms[name]:9.1f} ms", flush=True)
    full = ms["train_fwd_bwd_B"]
    ratios = {name: v / full for name, v in ms.items()}
    step = ms["score_eval_no_grad (trainer)"] + ms[f"train_fwd_bwd_{a.ratio}B"]
    print(f"scoring / full fwd+bwd: {ratios['score_eval_no_grad (trainer)']:.2f}  "
          f"train on {a.ratio}B / full: {ratios[f'train_fwd_bwd_{a.ratio}B']:.2f}  "
          f"score + train kept (no optimizer, no exchange) / full: {step / full:.2f}")
    engine = None
    if a.engine_zero >= 0:  # the same work on the module inside the engine, alternating
        engine = engine_layout.compare(a.model, a.batch, a.dtype, a.engine_zero,
                                       device=device.type, warmup=a.warmup, iters=a.iters)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    res = {"model": a.model, "batch": a.batch, "ratio": a.ratio, "threads": a.threads,
           "dtype": a.dtype, "device": dev, "torch": torch.__version__, "ms": ms,
           "compiled_scoring_first_call_s": compile_s,
           "ratio_to_full_fwd_bwd": ratios, "score_plus_train_kept_over_full": step / full,
           "engine_layout": engine}
    out = Path(a.out) if a.out else common.RESULTS / f"scoring_forward_{device.type}.json"
    common.write_json(out, {**res, "machine": common.machine_info()}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
