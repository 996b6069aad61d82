"""The scoring pass's mode on a BatchNorm model: `eval` (the default: eval mode, running
statistics, the training precision) against `reference` (as the reference DISSect code
scores: train mode, so BatchNorm normalises with the batch's own statistics and moves
its running statistics, outside autocast).

    python benchmarks/scoring_mode.py              # ~25 min on 2 CPU cores
    python benchmarks/scoring_mode.py --report     # the tables again, from the JSON

Two parts, both on tiny-rn-64 (open_clip's ModifiedResNet, the RN50 family, shrunk to
64 px) in the `memorise` regime of noisy_correspondence.py (500 Fashion-MNIST pairs, 40%
swapped captions, 64 epochs, 2 CPU ranks, r = 0.3):
  1. training: `full` (the reference point), and `dissect_momentum` with each score mode,
     seeds 0 and 1: zero-shot accuracy, δ AUROC clean vs noisy, kept precision.
  2. batch dependence: on the full run's final model, every training pair is scored
     twice, in two random batch compositions of the run's per-rank batch (32), in each
     mode: how much a pair's score moves with its batch-mates, against how much scores
     differ between pairs (the signal δ is made of), and the clean-vs-noisy AUROC of the
     score itself.
Writes benchmarks/results/scoring_mode.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dissect_dist import model as modellib
from dissect_dist.evaluate import EvalSet
from dissect_dist.metrics import auroc

if __package__:
    from benchmarks import common
    from benchmarks.nc_runner import REGIMES, Run, dataset, save_results, train
else:  # run as a file: python benchmarks/scoring_mode.py
    import common  # type: ignore[no-redef]
    from nc_runner import REGIMES, Run, dataset, save_results, train  # type: ignore[no-redef]

MODEL = "tiny-rn-64"
OUT = common.RESULTS / "scoring_mode.json"


def runs(seeds: tuple[int, ...]) -> list[Run]:
    reg = REGIMES["memorise"]
    out = [Run("memorise", "full", "full", reg.noise, 1.0, 0,
               (("model.name", MODEL),))]
    for seed in seeds:
        for mode in ("eval", "reference"):
            out.append(Run("memorise", f"dissect_momentum[score_mode={mode}]",
                           "dissect_momentum", reg.noise, reg.ratio, seed,
                           (("model.name", MODEL), ("selection.score_mode", mode))))
    return out


def batch_dependence(model_path: Path, data: Path, batch: int) -> dict[str, Any]:
    model, _, pre_eval, tok = modellib.create(MODEL)
    sd = torch.load(model_path, weights_only=True)
    sd["logit_scale"] = sd["logit_scale"].reshape(1)
    model.load_state_dict(sd)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, caps = [], []
    for im, c, _ in EvalSet(str(data / "train" / "manifest.json"), pre_eval):
        images.append(im)
        caps += c
    x, t = torch.cat(images), tok(caps)
    n = x.shape[0]
    noisy = np.zeros(n, dtype=bool)
    noisy[np.load(data / "train" / "noise_ledger.npy")] = True
    out: dict[str, Any] = {"pairs": n, "batch": batch}
    for mode in ("eval", "reference"):
        per_comp, secs = [], []
        for comp in range(2):
            model.load_state_dict(state)  # reference mode moves the running statistics
            perm = torch.from_numpy(np.random.default_rng(comp).permutation(n))
            s = torch.empty(n)
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                idx = perm[i:i + batch]
                fi, ft = modellib.score_features(model, x[idx], t[idx], mode=mode,
                                                 autocast_dtype=None)
                s[idx] = modellib.clipscore(fi, ft, cosine=mode == "reference")
            secs.append(time.perf_counter() - t0)
            per_comp.append(s.numpy())
        a, b = per_comp
        out[mode] = {
            "mean_abs_change_between_compositions": float(np.abs(a - b).mean()),
            "max_abs_change_between_compositions": float(np.abs(a - b).max()),
            "std_over_pairs": float(a.std()),
            "mean_score": float(a.mean()),
            "score_auroc_clean_vs_noisy": auroc(a, ~noisy),
            "seconds_per_pass": float(np.median(secs)),
        }
    model.load_state_dict(state)
    return out


def report(res: dict[str, Any]) -> None:
    print("| run | seed | final / best accuracy | δ AUROC first / mid / last epoch | "
          "kept precision (mean) | wall s |")
    print("|---|---|---|---|---|---|")
    for r in res["runs"].values():
        d = [x for x in r["delta_auroc"] if x is not None]
        dd = " / ".join(f"{v:.2f}" for v in (d[0], d[len(d) // 2], d[-1])) if d else "-"
        print(f"| {r['label']} | {r['seed']} | {r['final']:.3f} / {r['best']:.3f} | {dd} | "
              f"{common.mean_logged(r['kept_precision']):.3f} | {r['wall_s']:.0f} |")
    bd = res.get("batch_dependence")
    if bd:
        print(f"\nBatch dependence on the full run's final model ({bd['pairs']} pairs, "
              f"batches of {bd['batch']}, two random compositions):\n")
        print("| mode | mean / max abs change of a pair's score | std of scores over pairs | "
              "score AUROC clean vs noisy | s per pass |")
        print("|---|---|---|---|---|")
        for mode in ("eval", "reference"):
            m = bd[mode]
            print(f"| {mode} | {m['mean_abs_change_between_compositions']:.3f} / "
                  f"{m['max_abs_change_between_compositions']:.3f} | {m['std_over_pairs']:.2f} | "
                  f"{m['score_auroc_clean_vs_noisy']:.3f} | {m['seconds_per_pass']:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", type=Path, default=common.REPO / "runs" / "scoring_mode")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    if a.report:
        report(json.loads(a.out.read_text()))
        return 0
    reg = REGIMES["memorise"]
    data = dataset(reg, reg.noise, a.runs / "data")
    res: dict[str, Any] = {"model": MODEL, "regime": "memorise", "runs": {}}
    for run in runs(tuple(a.seeds)):
        print(f"[scoring_mode] {run.key} {dict(run.extra)}", flush=True)
        res["runs"][run.key] = train(reg, run, data, a.runs)
        save_results(a.out, res)
    full_dir = a.runs / runs(())[0].dir_name
    res["batch_dependence"] = batch_dependence(full_dir / "open_clip_model.pt", data,
                                               reg.batch_per_rank)
    save_results(a.out, res)
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
