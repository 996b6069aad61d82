"""GPU smoke test of the real trainer: builds synthetic shards, then trains ViT-B-32 in
bf16 through `deepspeed launch/train.py` for a fixed number of steps with `full` and
with `dissect_momentum` at r = 0.3 (twice: as the trainer runs it, with SDPA attention, and
with open_clip's stock attention through torch's MHA inference fast path, `+fastpath`, the
setting the H200 numbers of 2026-11-26 were measured with), and prints samples/s, the
step-time split and peak GPU memory. With --runs, also `+stock` (stock attention, fast
path off), `+compile` (the scoring pass compiled), `+amp` (precision amp_bf16: fp32
weights, autocast training forward and scoring) and `+reference` (amp_bf16 with the
reference code's scoring: train mode, fp32, TF32) and `+device` (data.decode=device: JPEGs
decoded on the GPU; with --photos, on web-like photographs instead of synthetic shards).

    python benchmarks/gpu_smoke.py [--steps 30] [--batch-size 256] [--out DIR]
    python benchmarks/gpu_smoke.py --runs full dissect_momentum dissect_momentum+reference

Writes gpu_smoke.json into --out (default benchmarks/results). Needs one CUDA GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__:
    from benchmarks import common, profile_summary
else:  # run as a file: python benchmarks/gpu_smoke.py
    import common  # type: ignore[no-redef]
    import profile_summary  # type: ignore[no-redef]


def _shard(args: tuple[str, int, int, int]) -> tuple[str, int]:
    import tarfile

    import numpy as np
    from PIL import Image

    path, start, count, size = args
    rng = np.random.default_rng(start)
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + count):
            buf = io.BytesIO()
            if size:  # size x size random pixels
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(buf, format="JPEG", quality=85)
            else:  # web-like: a smooth picture, short side 300-800 px, aspect 3:4 to 16:9
                short = int(rng.integers(300, 801))
                long = int(short * rng.uniform(1.0, 16 / 9))
                w, h = (long, short) if rng.random() < 0.7 else (short, long)
                low = rng.integers(0, 255, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
                pic = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
                pic.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo of thing {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path, count


def build(root: Path, n: int, per_shard: int, size: int) -> str:
    import numpy as np

    from dissect_dist.data.manifest import Manifest

    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"shard-{s:05d}.tar"), s * per_shard, min(per_shard, n - s * per_shard),
             size) for s in range(-(-n // per_shard))]
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as ex:
        done = list(ex.map(_shard, jobs))
    m = Manifest(tuple(p for p, _ in done), np.asarray([c for _, c in done], dtype=np.int64))
    m.save(str(root / "manifest.json"))
    return str(root / "manifest.json")


# Overrides per variant (besides precision and score mode): open_clip's stock attention
# (nn.MultiheadAttention) with and without torch's inference fast path, which exists only
# there; the scoring pass compiled (torch.compile, its own graph).
VARIANTS = {"stock": ["model.attention=stock"],
            "fastpath": ["model.attention=stock", "model.mha_fastpath=enabled"],
            "compile": ["selection.compile_scoring=true"],
            "device": ["data.decode=device"]}  # JPEGs decoded on the GPU (nvJPEG)


def run(label: str, manifest: str, out: Path, a: argparse.Namespace) -> dict:
    """One launch; `label` is a strategy, optionally with `+stock` (open_clip's own
    attention instead of SDPA), `+fastpath` (stock attention through torch's MHA inference
    fast path), `+compile` (compiled scoring pass), `+amp` (precision amp_bf16),
    `+reference` (amp_bf16, selection.score_mode=reference) or `+device` (data.decode=
    device: the JPEGs decoded on the GPU)."""
    strategy, _, variant = label.partition("+")
    run_dir = out / f"run-{label}"
    r = common.launch(
        [f"model.name={a.model}",
         f"model.precision={'amp_bf16' if variant in ('amp', 'reference') else 'bf16'}",
         f"selection.score_mode={'reference' if variant == 'reference' else 'eval'}",
         f"data.train_manifest={manifest}", f"data.batch_size={a.batch_size}",
         f"data.workers={a.workers}", f"selection.strategy={strategy}", "selection.ratio=0.3",
         f"train.max_steps={a.steps}", f"train.log_every={a.log_every}",
         "train.time_breakdown=true",
         f"train.run_dir={run_dir}", "optim.lr=5e-4", "optim.warmup_steps=10",
         "train.epochs=100", "train.zero_stage=1", *VARIANTS.get(variant, []),
         *([f"train.profile_at={a.profile_at}", "train.profile_steps=3"] if a.profile_at else [])],
        what=label, ranks=1, log=out / f"log-{label}.txt",
        omp_threads=None if a.device == "cuda" else 2)
    rows = common.read_metrics(run_dir)
    train = [x for x in rows if x["kind"] == "train"]
    steady = common.steady_windows(rows)  # the first window holds warm-up and compilation
    prof = None
    if a.profile_at:  # the profiled steps phase by phase: device busy vs wall, top kernels
        prof = profile_summary.summarize(run_dir / "profile" / "rank0.trace.json")
        print(f"[gpu_smoke] {label}, profiled steps:\n{profile_summary.table(prof)}", flush=True)
    return {
        "strategy": label, "launch_wall_s": r.wall_s,
        "samples_per_s": sum(x["samples_per_s"] for x in steady) / len(steady),
        "trained_per_s": sum(x["trained_per_s"] for x in steady) / len(steady),
        "kept_fraction": steady[-1]["kept_fraction"],
        "step_time_ms": common.step_time_split(rows),
        "gpu_mem_peak_gib": max(x.get("gpu_mem_peak_gib", 0.0) for x in train),
        "final_loss": train[-1]["loss"],
        "profile": prof,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12288)
    p.add_argument("--image-size", type=int, default=64,
                   help="stored JPEG size (resized to 224); 0: web-like smooth pictures, short "
                   "side 300-800 px, quality 75-95 (the decoding cost of web photos)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--profile-at", type=int, default=0,
                   help="profile steps N..N+2 of every run with torch.profiler (0: off); "
                   "traces and operator tables in <out>/run-<label>/profile/")
    p.add_argument("--runs", nargs="+", default=["full", "dissect_momentum",
                                                 "dissect_momentum+fastpath"],
                   help="labels: a strategy, optionally +stock, +fastpath, +compile, +amp, "
                   "+reference or +device")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of the same launches on DeepSpeed's CPU accelerator "
                   "(use a small --model; the numbers mean nothing)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--log-every", type=int, default=10, help="steps per logged window")
    p.add_argument("--photos", default="",
                   help="train on this manifest (e.g. data/bench-photos-500/manifest.json from "
                   "`python -m dissect_dist.data photos`) instead of synthetic shards")
    a = p.parse_args()
    if a.device == "cpu":  # the launches inherit this: DeepSpeed's CPU accelerator, no GPU
        os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py: no CUDA device here; --device cpu runs a dry run of "
                         "the same launches on the CPU")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.photos:
        manifest = str(Path(a.photos).resolve())
    else:
        manifest = build(out / "data" if a.device == "cpu" else Path("/tmp/gpu-smoke-data"),
                         a.samples, 1024, a.image_size)
        print(f"[gpu_smoke] {a.samples} synthetic pairs in {time.perf_counter() - t0:.1f}s",
              flush=True)
    machine = common.machine_info()
    res = {"device": machine["device"], "dry_run": a.device == "cpu", "torch": machine["torch"],
           "date": machine["date"], "machine": machine, "args": vars(a),
           "runs": [run(s, manifest, out, a) for s in a.runs]}
    common.write_json(out / "gpu_smoke.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
