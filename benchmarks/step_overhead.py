"""Per-step time split (scoring pass, exchange + ranking, train forward/backward,
optimizer) for `full` vs `dissect_momentum` at r = 0.3, on 2 CPU ranks through the
DeepSpeed launcher, measured in one run with the same data, model and batch size.

    python benchmarks/step_overhead.py [--steps 40] [--setup tiny-vit-28:128 ...] [--workers 0]

Each --setup is model:per-rank-batch; all setups are measured in the same invocation,
runs alternating between full and dissect_momentum so drift hits both alike. Writes
benchmarks/results/step_overhead.json. Targets: exchange + ranking <= 1% of the DISSect
step; DISSect step <= 0.7x the full-data step. With train.time_breakdown the trainer puts
a barrier before the selection, so rank skew shows as `wait`, not as exchange time.

By default each rank decodes its own batches between steps (no data worker): on a 2-core
machine a worker per rank would decode the next batch on the cores the 2 ranks are
computing on, and its time would land in whichever phase runs then (on a GPU node the
workers have cores of their own). `--workers 1` measures that oversubscribed case; the
samples/s column includes the decoding either way.

Then (--engine-zero) each setup's scoring pass, forward + backward and optimizer step on a
fresh model and on the module inside a DeepSpeed engine, one process with both cores and the
global batch (engine_layout.compare): the layout effect the launched runs cannot separate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__:
    from benchmarks import common, engine_layout
else:  # run as a file: python benchmarks/step_overhead.py
    import common  # type: ignore[no-redef]
    import engine_layout  # type: ignore[no-redef]

REPO = common.REPO


def run(strategy: str, manifest: str, model: str, batch: int, a: argparse.Namespace,
        out: Path) -> dict:
    run_dir = out / f"{model}-{batch}-{strategy}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    common.launch([f"model.name={model}", f"data.train_manifest={manifest}",
                   f"data.batch_size={batch}", f"data.workers={a.workers}",
                   f"selection.strategy={strategy}", "selection.ratio=0.3",
                   f"train.max_steps={a.steps}", "train.epochs=100", "train.log_every=5",
                   "train.time_breakdown=true", f"train.run_dir={run_dir}"],
                  what=f"{model}:{batch} {strategy}", log=run_dir / "launch.log")
    rows = common.read_metrics(run_dir)
    split = common.step_time_split(rows)
    steady = common.steady_windows(rows)
    return {"strategy": strategy, "model": model, "batch_per_rank": batch,
            "split_ms": split, "step_ms": sum(split.values()),
            "samples_per_s": sum(x["samples_per_s"] for x in steady) / len(steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--setup", action="append", default=None,
                   help="model:per-rank batch (repeatable; default tiny-vit-28:128 and "
                   "small-vit-28:256)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=0,
                   help="data workers per rank (default 0: see the module docstring)")
    p.add_argument("--engine-zero", type=int, default=1, choices=[-1, 0, 1, 2],
                   help="also time, in this process, each setup's scoring, fwd+bwd and "
                   "optimizer step on a fresh model and on the module as deepspeed.initialize "
                   "returns it (before and after parameters were aligned), at this ZeRO stage "
                   "(-1: skip); see engine_layout.py")
    p.add_argument("--out", default=str(common.RESULTS / "step_overhead.json"))
    a = p.parse_args()
    setups = [(m, int(b)) for m, b in (x.split(":") for x in
                                      (a.setup or ["tiny-vit-28:128", "small-vit-28:256"]))]
    data = REPO / "data" / "bench-fmnist-noisy"
    if not (data / "train" / "manifest.json").exists():
        from dissect_dist.data.builders import build_fashion_mnist

        build_fashion_mnist(str(data), noise=0.4, subset=10000)
    out = REPO / "runs" / "step_overhead"
    manifest = str(data / "train" / "manifest.json")
    runs = []
    for _ in range(a.repeats):  # alternate, so drift hits every setup and strategy alike
        for model, batch in setups:
            for s in ("full", "dissect_momentum"):
                runs.append(run(s, manifest, model, batch, a, out))
                print(json.dumps(runs[-1]), flush=True)
    results = []
    for model, batch in setups:
        by = {s: [r for r in runs if r["strategy"] == s and r["model"] == model
                  and r["batch_per_rank"] == batch] for s in ("full", "dissect_momentum")}
        mean = {s: {k: sum(r["split_ms"][k] for r in v) / len(v) for k in v[0]["split_ms"]}
                for s, v in by.items()}
        full_step = sum(mean["full"].values())
        dis_step = sum(mean["dissect_momentum"].values())
        results.append({
            "model": model, "batch_per_rank": batch, "mean_split_ms": mean,
            "full_step_ms": full_step, "dissect_step_ms": dis_step,
            "dissect_over_full_step": dis_step / full_step,
            "select_fraction_of_dissect_step": mean["dissect_momentum"]["select"] / dis_step,
            "wait_fraction_of_dissect_step": mean["dissect_momentum"]["wait"] / dis_step,
        })
    layout = []
    if a.engine_zero >= 0:  # the module inside the engine vs a fresh one, same process
        import torch

        torch.set_num_threads(2)
        for model, batch in setups:
            layout.append(engine_layout.compare(model, 2 * batch, "fp32", a.engine_zero,
                                                device="cpu", warmup=2, iters=5))
    machine = common.machine_info()
    res = {
        "engine_layout": layout,
        "command": "python benchmarks/step_overhead.py " + " ".join(sys.argv[1:]),
        "date": machine["date"], "cpus": machine["cpus"], "machine": machine,
        "steps": a.steps, "repeats": a.repeats, "runs": runs, "setups": results,
    }
    path = Path(a.out)
    common.write_json(path, res)
    for r in results:
        mean = r["mean_split_ms"]
        print(f"\n{r['model']}, per-rank batch {r['batch_per_rank']}\n"
              "| phase (ms) | full | dissect_momentum r=0.3 |\n|---|---|---|")
        for k in mean["full"]:
            print(f"| {k} | {mean['full'][k]:.1f} | {mean['dissect_momentum'][k]:.1f} |")
        print(f"| step | {r['full_step_ms']:.1f} | {r['dissect_step_ms']:.1f} |")
        print(f"DISSect step / full step = {r['dissect_over_full_step']:.2f} (target <= 0.7); "
              f"exchange + ranking = {100 * r['select_fraction_of_dissect_step']:.1f}% of the "
              f"DISSect step (target <= 1%); rank skew (wait) "
              f"{100 * r['wait_fraction_of_dissect_step']:.1f}%")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
