"""Per-step time split (scoring pass, exchange + ranking, train forward/backward,
optimizer) for `full` vs `dissect_momentum` at r = 0.3, on 2 CPU ranks through the
DeepSpeed launcher, measured in one run with the same data, model and batch size.

    python benchmarks/step_overhead.py [--steps 40] [--batch-size 128] [--model tiny-vit-28]

Writes benchmarks/results/step_overhead.json. Targets: exchange + ranking <= 1% of the
DISSect step; DISSect step <= 0.7x the full-data step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(strategy: str, manifest: str, a: argparse.Namespace, out: Path) -> dict:
    run_dir = out / strategy
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
           "--master_port", str(_port()), str(REPO / "launch" / "train.py"),
           f"model.name={a.model}", f"data.train_manifest={manifest}",
           f"data.batch_size={a.batch_size}", "data.workers=1",
           f"selection.strategy={strategy}", "selection.ratio=0.3",
           f"train.max_steps={a.steps}", "train.epochs=100", "train.log_every=5",
           "train.time_breakdown=true", f"train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [x for x in rows if x["kind"] == "train"][1:]  # drop the warm-up window
    split = {k[5:-3]: sum(x[k] for x in steady) / len(steady)
             for k in steady[0] if k.startswith("time_")}
    return {"strategy": strategy, "split_ms": split, "step_ms": sum(split.values()),
            "samples_per_s": sum(x["samples_per_s"] for x in steady) / len(steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model", default="tiny-vit-28")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    data = REPO / "data" / "bench-fmnist-noisy"
    if not (data / "train" / "manifest.json").exists():
        from dissect_dist.data.builders import build_fashion_mnist

        build_fashion_mnist(str(data), noise=0.4, subset=10000)
    out = REPO / "runs" / "step_overhead"
    manifest = str(data / "train" / "manifest.json")
    runs = []
    for _ in range(a.repeats):  # alternate, so drift hits both alike
        for s in ("full", "dissect_momentum"):
            runs.append(run(s, manifest, a, out))
            print(json.dumps(runs[-1]), flush=True)
    by = {s: [r for r in runs if r["strategy"] == s] for s in ("full", "dissect_momentum")}
    mean = {s: {k: sum(r["split_ms"][k] for r in v) / len(v) for k in v[0]["split_ms"]}
            for s, v in by.items()}
    full_step = sum(mean["full"].values())
    dis_step = sum(mean["dissect_momentum"].values())
    res = {
        "command": "python benchmarks/step_overhead.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "args": vars(a),
        "runs": runs, "mean_split_ms": mean,
        "dissect_over_full_step": dis_step / full_step,
        "select_fraction_of_dissect_step": mean["dissect_momentum"]["select"] / dis_step,
    }
    path = REPO / "benchmarks" / "results" / "step_overhead.json"
    path.write_text(json.dumps(res, indent=2))
    print("\n| phase (ms) | full | dissect_momentum r=0.3 |\n|---|---|---|")
    for k in mean["full"]:
        print(f"| {k} | {mean['full'][k]:.1f} | {mean['dissect_momentum'][k]:.1f} |")
    print(f"| step | {full_step:.1f} | {dis_step:.1f} |")
    print(f"\nDISSect step / full step = {res['dissect_over_full_step']:.2f} (target <= 0.7); "
          f"exchange + ranking = {100 * res['select_fraction_of_dissect_step']:.1f}% of the "
          f"DISSect step (target <= 1%)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
