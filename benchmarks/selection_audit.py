"""What a selection strategy actually trains on: per epoch, the class mix of the kept
pairs, how many distinct pairs have been trained so far, and how often a pair kept in one
epoch is kept again in the next. The noisy-correspondence benchmark measures whether the
kept pairs are clean; this asks what else the selection does to the data, e.g. why a
strategy can lose to random selection on data with no noise at all.

    python benchmarks/selection_audit.py [--regime memorise] [--noise 0] \\
        [--strategy random --strategy dissect_momentum] [--seed 0]

Each strategy is one `deepspeed launch/train.py` run on 2 CPU ranks with the regime's
settings (its run config in launch/configs/, see nc_runner.py) plus
`train.record_samples=true`; the per-rank
step records (ids and keep masks) are read back and joined with the Fashion-MNIST labels.
Writes benchmarks/results/selection_audit.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from dissect_dist.data.builders import FASHION_MNIST_DIR, _read_idx

if __package__:
    from benchmarks import common
    from benchmarks import nc_runner as nc
else:  # run as a file: python benchmarks/selection_audit.py
    import common  # type: ignore[no-redef]
    import nc_runner as nc  # type: ignore[no-redef]

REPO = common.REPO


def true_labels(reg: nc.Regime) -> np.ndarray:
    """The image's class of each sample id, as build_fashion_mnist(seed=0) drew them
    (dense ids in the order of its permutation of the 60k training images)."""
    labels = _read_idx(Path(FASHION_MNIST_DIR) / "train-labels-idx1-ubyte.gz").astype(np.int64)
    order = np.random.default_rng(0).permutation(labels.size)[: reg.subset]
    return labels[order]


def audit(run_dir: Path, labels: np.ndarray, epochs: int) -> dict[str, Any]:
    kept_by_epoch: list[list[int]] = [[] for _ in range(epochs)]
    for f in sorted(run_dir.glob("samples-rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            ids = np.asarray(row["ids"], dtype=np.int64)
            keep = np.asarray(row["keep"], dtype=bool)
            kept_by_epoch[row["epoch"]] += ids[keep].tolist()
    n, k = labels.size, int(labels.max()) + 1
    seen = np.zeros(n, dtype=bool)
    out: dict[str, list[float | None]] = {"coverage": [], "class_share_min": [],
                                   "class_share_max": [], "class_entropy_bits": [],
                                   "kept_again_next_epoch": []}
    prev: set[int] = set()
    for ids in kept_by_epoch:
        a = np.asarray(ids, dtype=np.int64)
        seen[a] = True
        share = np.bincount(labels[a], minlength=k) / max(a.size, 1)
        nz = share[share > 0]
        out["coverage"].append(float(seen.mean()))
        out["class_share_min"].append(float(share.min()))
        out["class_share_max"].append(float(share.max()))
        out["class_entropy_bits"].append(float(-(nz * np.log2(nz)).sum()))
        cur = set(ids)
        out["kept_again_next_epoch"].append(
            len(cur & prev) / len(prev) if prev else None)
        prev = cur
    counts = np.bincount(np.concatenate([np.asarray(x, dtype=np.int64) for x in kept_by_epoch]),
                         minlength=n)
    return {**out, "times_trained_per_pair": {
        "min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max()),
        "never": int((counts == 0).sum())}}


def summary_line(strategy: str, x: dict[str, Any]) -> str:
    again = [v for v in x["kept_again_next_epoch"] if v is not None]
    cov = x["coverage"]
    return (f"{strategy:18s} acc {x['final_acc']:.3f} (best {x['best_acc']:.3f})  coverage "
            f"after 1/{min(5, len(cov))}/{len(cov)} epochs {cov[0]:.2f}/{cov[min(4, len(cov) - 1)]:.2f}/"
            f"{cov[-1]:.2f}  class share min/max (mean over epochs) "
            f"{np.mean(x['class_share_min']):.3f}/{np.mean(x['class_share_max']):.3f}  "
            f"class entropy {np.mean(x['class_entropy_bits']):.2f} bits  "
            f"kept again next epoch {np.mean(again):.2f}  "
            f"times trained per pair {x['times_trained_per_pair']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", default="memorise", choices=sorted(nc.REGIMES))
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--strategy", action="append", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true",
                   help="only print the summary lines of the saved results")
    a = p.parse_args()
    out = common.RESULTS / "selection_audit.json"
    if a.report:
        for strategy, x in json.loads(out.read_text())["runs"].items():
            print(summary_line(strategy, x))
        return
    reg = nc.REGIMES[a.regime]
    data = nc.dataset(reg, a.noise, REPO / "data" / "nc")
    labels = true_labels(reg)
    res: dict[str, Any] = {"regime": a.regime, "noise": a.noise, "ratio": a.ratio,
                           "seed": a.seed, "chance_class_share": 1 / (labels.max() + 1),
                           "runs": {}}
    runs_root = REPO / "runs" / "audit"
    for strategy in a.strategy or ["random", "dissect_momentum"]:
        run = nc.Run(reg.name, strategy, strategy, a.noise, a.ratio, a.seed,
                     extra=(("train.record_samples", True),))
        r = nc.train(reg, run, data, runs_root)
        res["runs"][strategy] = {
            "final_acc": r["final"], "best_acc": r["best"], "wall_s": r["wall_s"],
            **audit(runs_root / run.dir_name, labels, reg.epochs)}
        print(summary_line(strategy, res["runs"][strategy]), flush=True)
    common.write_json(out, res, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
