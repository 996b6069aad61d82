"""Training throughput of `launch/train.py` (strategy `full`) against open_clip_train on the
same work: model, Fashion-MNIST shards, per-process batch, precision, intra-op threads and
data workers, one process each, runs alternating (ours, theirs, ours, ...).

    python benchmarks/vs_open_clip.py [--setup small-vit-28:256 --setup ViT-S-32:32]
                                      [--repeats 3] [--steps 40] [--log-every 5]

samples/s is counted after the first logged window of each run (warm-up, first data
worker start): ours from metrics.jsonl (window wall time), open_clip_train from its log
lines (batch count and the window's mean `Batch (t)`, which covers data wait, forward,
backward and optimizer). Both run `log_every` steps per window; open_clip_train also logs
its first step alone, so its first two log lines are dropped.

open_clip_train 3.3.0 cannot read these shards with webdataset 1.0.2 as installed: the
tar expander now yields an empty dict at the end of each shard, and open_clip_train's
`group_by_keys_nothrow` fails on it with `KeyError: 'fname'`. `--open-clip-train` (how
this script starts it) drops those end markers before open_clip_train's grouping (a
wrapper around `open_clip_train.data.group_by_keys_nothrow`), registers
dissect_dist/model_configs with open_clip and then calls `open_clip_train.main.main`;
nothing else of open_clip_train is changed.

Writes benchmarks/results/vs_open_clip.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/vs_open_clip.py
    import common  # type: ignore[no-redef]

REPO = common.REPO

# "Train Epoch: 0 [ 1280/10240 (12%)] Data (t): 0.081 Batch (t): 0.653, ..."
LOG_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) "
                      r"Batch \(t\): ([\d.]+),")


def open_clip_train_main(argv: list[str]) -> None:
    """open_clip_train's entry point with the end-of-shard shim and our model configs."""
    import open_clip
    import open_clip_train.data as ocd
    from open_clip_train.main import main

    from dissect_dist.model import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    grouped = ocd.group_by_keys_nothrow

    def without_end_markers(data: Any, *args: Any, **kwargs: Any) -> Any:
        return grouped((f for f in data if f), *args, **kwargs)  # {} = end of a shard

    ocd.group_by_keys_nothrow = without_end_markers
    main(argv)


def data_dir() -> Path:
    d = REPO / "data" / "bench-fmnist-noisy"  # the shards step_overhead.py builds
    if not (d / "train" / "manifest.json").exists():
        from dissect_dist.data.builders import build_fashion_mnist

        build_fashion_mnist(str(d), noise=0.4, subset=10000)
    return d


def ours(model: str, batch: int, a: argparse.Namespace, manifest: Path, run_dir: Path
         ) -> dict[str, Any]:
    from dissect_dist.launching import read_metrics, run_training

    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    r = run_training([f"model.name={model}", f"model.precision={a.precision}",
                      f"data.train_manifest={manifest}", f"data.batch_size={batch}",
                      f"data.workers={a.workers}", "selection.strategy=full",
                      f"train.max_steps={a.steps}", "train.epochs=1000",
                      f"train.log_every={a.log_every}", "train.time_breakdown=true",
                      f"train.run_dir={run_dir}", *a.ours_override],
                     ranks=1, omp_threads=a.threads, log=run_dir.parent / f"{run_dir.name}.log")
    if r.returncode != 0:
        raise SystemExit(f"launch/train.py failed ({model}):\n{r.output[-3000:]}")
    windows = [x for x in read_metrics(run_dir) if x["kind"] == "train"][1:]
    seconds = [w["samples_per_s"] ** -1 * batch * a.log_every for w in windows]
    split = {k[5:-3]: statistics.mean(w[k] for w in windows)
             for k in windows[0] if k.startswith("time_")}
    step_ms = 1e3 * sum(seconds) / (a.log_every * len(windows))
    # between steps: waiting for the data worker's next batch, logging
    split["data_and_between"] = step_ms - sum(split.values())
    split["step"] = step_ms
    return {"system": "ours", "samples_per_s": batch * a.log_every * len(windows) / sum(seconds),
            "split_ms": split, "wall_s": r.wall_s}


def theirs(model: str, batch: int, a: argparse.Namespace, shards: list[str], run_dir: Path
           ) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--model", model, "--train-data", "::".join(shards), "--dataset-type",
            "webdataset", "--train-num-samples", str(a.steps * batch), "--batch-size",
            str(batch), "--epochs", "1", "--workers", str(a.workers), "--precision",
            a.precision, "--lr", "1e-3", "--wd", "0.1", "--warmup", "100", "--beta1", "0.9",
            "--beta2", "0.98", "--eps", "1e-6", "--log-every-n-steps", str(a.log_every),
            "--save-frequency", "0", "--logs", str(run_dir.parent), "--name", run_dir.name,
            "--seed", "0", "--report-to", ""]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--open-clip-train", "--", *args], env=env,
                       cwd=str(REPO), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = r.stdout + r.stderr
    (run_dir.parent / f"{run_dir.name}.log").write_text(out)
    logs = [(int(n), float(d), float(bt)) for n, d, bt in LOG_LINE.findall(out)]
    if r.returncode != 0 or len(logs) < 3:
        raise SystemExit(f"open_clip_train failed ({model}):\n{out[-3000:]}")
    steady = logs[2:]  # the first step alone, then the first full window
    steps = [(n - p) // batch for (n, _, _), (p, _, _) in zip(steady, logs[1:])]
    seconds = sum(s * bt for s, (_, _, bt) in zip(steps, steady))
    data_ms = 1e3 * sum(s * d for s, (_, d, _) in zip(steps, steady)) / sum(steps)
    return {"system": "open_clip_train", "samples_per_s": batch * sum(steps) / seconds,
            "split_ms": {"data": data_ms, "step": 1e3 * seconds / sum(steps)},
            "wall_s": wall}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--open-clip-train":
        open_clip_train_main(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="append", default=None,
                   help="model:batch (repeatable; default small-vit-28:256 and ViT-S-32:32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32"],
                   help="the one precision both run the same way on CPU")
    p.add_argument("--ours-override", action="append", default=[],
                   help="extra section.key=value for launch/train.py (e.g. model.attention=stock)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vs_open_clip.json"))
    a = p.parse_args()
    setups = [(m, int(b)) for m, b in (s.rsplit(":", 1) for s in
                                      (a.setup or ["small-vit-28:256", "ViT-S-32:32"]))]
    d = data_dir()
    manifest = d / "train" / "manifest.json"
    shards = [str(manifest.parent / s["url"]) for s in json.loads(manifest.read_text())["shards"]]
    work = REPO / "runs" / "vs_open_clip"
    runs = []
    for i in range(a.repeats):  # alternate, so drift hits both systems alike
        for model, batch in setups:
            for system in ("ours", "open_clip_train"):
                run_dir = work / f"{model}-{batch}-{system}-{i}"
                r = ours(model, batch, a, manifest, run_dir) if system == "ours" \
                    else theirs(model, batch, a, shards, run_dir)
                r.update(model=model, batch=batch, repeat=i)
                runs.append(r)
                print(json.dumps(r), flush=True)
    table = []
    for model, batch in setups:
        per = {s: [r["samples_per_s"] for r in runs if r["model"] == model
                   and r["system"] == s] for s in ("ours", "open_clip_train")}
        med = {s: statistics.median(v) for s, v in per.items()}
        table.append({"model": model, "batch": batch, "samples_per_s": per, "median": med,
                      "ratio_of_medians": med["ours"] / med["open_clip_train"]})
    res = {"command": "python benchmarks/vs_open_clip.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
           "threads": a.threads, "workers": a.workers, "precision": a.precision,
           "steps": a.steps, "log_every": a.log_every, "ours_override": a.ours_override,
           "runs": runs, "table": table, "machine": common.machine_info()}
    common.write_json(Path(a.out), res)
    print("\n| model | batch | ours samples/s | open_clip_train samples/s | ratio (medians) |\n"
          "|---|---|---|---|---|")
    for t in table:
        fmt = ", ".join
        print(f"| {t['model']} | {t['batch']} | {fmt(f'{x:.0f}' for x in t['samples_per_s']['ours'])}"
              f" | {fmt(f'{x:.0f}' for x in t['samples_per_s']['open_clip_train'])}"
              f" | **{t['ratio_of_medians']:.2f}x** |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
