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

    python benchmarks/selection_audit.py --mechanism --regime pool [--seed 0]

audits the noisy-correspondence benchmark's own runs of a regime instead (their sample
records, kept in runs/nc by the grid), per window of steps: kept precision, distinct pairs
trained, repetition, class mix, times each pair was trained, the scores of kept and unkept
clean and noisy pairs, and the held-out curve's peak and decline. Writes
benchmarks/results/selection_audit_<regime>_noise<n>_seed<s>.json and .png.
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


def _records(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for f in sorted(run_dir.glob("samples-rank*.jsonl"))
            for line in f.read_text().splitlines()]
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no samples-rank*.jsonl (run it with "
                                "train.record_samples=true)")
    return rows


def mechanism(run_dir: Path, labels: np.ndarray, noisy_ids: np.ndarray,
              windows: int = 8) -> dict[str, Any]:
    """What a run trained on and what it did to the pairs' scores, per window of its steps
    (windows of steps, not epochs: a pool-regime run has epochs of 1-3 steps), from its
    sample record (ids, keep, and the CLIPScore `curr` of every scored row, measured by the
    step's scoring pass before that step's update):

    - kept_precision: clean fraction of the trained rows (the data's is 1 - noise)
    - distinct_trained: distinct pairs trained in the window, as a fraction of all pairs;
      kept_again: of the pairs trained in a window, the fraction trained in the previous one
    - class_share_min / max, class_entropy_bits: the image classes of the trained rows
    - times_trained: per pair over the whole run, clean and noisy apart
    - score_kept / score_unkept: mean curr of the rows trained / not trained at their step,
      clean and noisy apart (memorisation: a noisy pair's score rises once it is fitted)
    - kept_score_rank: mean rank of a trained row's curr within its step's rows on its rank
      (0 = the lowest score, 1 = the highest, ties share their mean rank): a curriculum
      towards easy (high) or hard (low) pairs
    The score series use only the rows that were scored (a strategy without a scoring pass
    has none: rerun it with train.diagnose_scores=true).
    """
    rows = _records(run_dir)
    n, k = labels.size, int(labels.max()) + 1
    noisy = np.zeros(n, dtype=bool)
    noisy[noisy_ids] = True
    steps = max(r["step"] for r in rows) + 1
    windows = min(windows, steps)
    edges = np.linspace(0, steps, windows + 1).round().astype(int)
    win = np.searchsorted(edges, [r["step"] for r in rows], side="right") - 1
    counts = np.zeros(n, dtype=np.int64)
    out: dict[str, Any] = {"window_end_step": edges[1:].tolist()}
    series: dict[str, list[float | None]] = {
        name: [] for name in ("kept_precision", "distinct_trained", "kept_again",
                              "class_share_min", "class_share_max", "class_entropy_bits",
                              "score_kept_clean", "score_unkept_clean", "score_kept_noisy",
                              "score_unkept_noisy", "kept_score_rank")}
    prev: np.ndarray | None = None

    def mean(x: list[float] | np.ndarray) -> float | None:
        return float(np.mean(x)) if len(x) else None

    for w in range(windows):
        ids_l, keep_l, rank_l = [], [], []
        scored: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, keep, curr)
        for r, rw in zip(rows, win):
            if rw != w:
                continue
            ids = np.asarray(r["ids"], dtype=np.int64)
            keep = np.asarray(r["keep"], dtype=bool)
            ids_l.append(ids)
            keep_l.append(keep)
            if r.get("curr") is not None:
                c = np.asarray(r["curr"], dtype=np.float64)
                scored.append((ids, keep, c))
                if keep.any() and ids.size > 1:
                    srt = np.sort(c)  # mean rank of ties: (#below + #below-or-equal - 1) / 2
                    rank = (np.searchsorted(srt, c, "left") + np.searchsorted(srt, c, "right")
                            - 1) / 2
                    rank_l.append(rank[keep] / (ids.size - 1))
        ids, keep = np.concatenate(ids_l), np.concatenate(keep_l)
        kept = ids[keep]
        np.add.at(counts, kept, 1)
        share = np.bincount(labels[kept], minlength=k) / max(kept.size, 1)
        nz = share[share > 0]
        distinct = np.unique(kept)
        series["kept_precision"].append(float(1 - noisy[kept].mean()) if kept.size else None)
        series["distinct_trained"].append(distinct.size / n)
        series["kept_again"].append(
            None if prev is None else float(np.isin(distinct, prev).mean()))
        prev = distinct
        series["class_share_min"].append(float(share.min()))
        series["class_share_max"].append(float(share.max()))
        series["class_entropy_bits"].append(float(-(nz * np.log2(nz)).sum()))
        if scored:
            s_ids, s_keep, curr = (np.concatenate(x) for x in zip(*scored))
            for name, sel in (("kept_clean", s_keep & ~noisy[s_ids]),
                              ("unkept_clean", ~s_keep & ~noisy[s_ids]),
                              ("kept_noisy", s_keep & noisy[s_ids]),
                              ("unkept_noisy", ~s_keep & noisy[s_ids])):
                series[f"score_{name}"].append(mean(curr[sel]))
            series["kept_score_rank"].append(mean(np.concatenate(rank_l)) if rank_l else None)
        else:
            for name in ("kept_clean", "unkept_clean", "kept_noisy", "unkept_noisy"):
                series[f"score_{name}"].append(None)
            series["kept_score_rank"].append(None)
    out.update(series)

    def spread(c: np.ndarray) -> dict[str, float]:
        return {"mean": float(c.mean()), "std": float(c.std()), "min": int(c.min()),
                "median": float(np.median(c)), "max": int(c.max()),
                "never": float((c == 0).mean())}

    out["times_trained"] = {"clean": spread(counts[~noisy]), "noisy": spread(counts[noisy])}
    return out


def heldout_curve(run_dir: Path) -> dict[str, Any]:
    """The run's held-out evaluations: the curve, its peak and how far it fell after it."""
    rows = common.read_metrics(run_dir)
    curve = [(x["step"], x["zeroshot_acc"]) for x in rows if x["kind"] == "eval"]
    peak_step, peak = max(curve, key=lambda c: c[1])
    return {"curve": curve, "peak": peak, "peak_step": peak_step, "final": curve[-1][1],
            "decline_after_peak": peak - curve[-1][1]}


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
    p.add_argument("--regime", default="memorise", choices=sorted(nc.REGIMES),
                   help="the benchmark regime whose settings (or, with --mechanism, runs) "
                   "are audited")
    p.add_argument("--noise", type=float, default=None,
                   help="the data's noise (default 0; with --mechanism the regime's)")
    p.add_argument("--ratio", type=float, default=0.3, help="the selection ratio r")
    p.add_argument("--strategy", action="append", default=None,
                   help="a strategy to audit (repeatable; default random and "
                   "dissect_momentum, with --mechanism also full and dissect_warmup)")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed")
    p.add_argument("--report", action="store_true",
                   help="only print the summary lines of the saved results")
    p.add_argument("--mechanism", action="store_true",
                   help="audit the noisy-correspondence benchmark's own runs of the regime "
                   "(runs/nc, kept by its grid) per window of steps: kept precision, distinct "
                   "pairs, repetition, class mix, times trained, scores of kept and unkept "
                   "pairs; a strategy without a scoring pass is rerun with "
                   "train.diagnose_scores=true (its kept ids are checked equal to the grid "
                   "run's). Writes benchmarks/results/selection_audit_<regime>_noise<n>_"
                   "seed<s>.json and .png")
    a = p.parse_args()
    if a.mechanism:
        return mechanism_main(a)
    out = common.RESULTS / "selection_audit.json"
    if a.report:
        for strategy, x in json.loads(out.read_text())["runs"].items():
            print(summary_line(strategy, x))
        return
    reg = nc.REGIMES[a.regime]
    a.noise = 0.0 if a.noise is None else a.noise
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


def _kept(run_dir: Path) -> list[list[int]]:
    return [[i for i, k in zip(r["ids"], r["keep"]) if k]
            for r in sorted(_records(run_dir), key=lambda r: r["step"])]


def mechanism_main(a: argparse.Namespace) -> None:
    reg = nc.REGIMES[a.regime]
    if not reg.pool or reg.data != "fmnist":
        raise SystemExit(f"--mechanism --regime {a.regime}: audits the Fashion-MNIST pool "
                         "regimes (their grid records every step's samples; the class mix "
                         "needs Fashion-MNIST's labels): choose one of "
                         f"{sorted(n for n, r in nc.REGIMES.items() if r.pool and r.data == 'fmnist')}")
    noise = reg.noise if a.noise is None else a.noise
    data = nc.dataset(reg, noise, REPO / "data" / "nc")
    labels = true_labels(reg)
    noisy_ids = np.load(data / "train" / "noise_ledger.npy")
    out = common.RESULTS / f"selection_audit_{a.regime}_noise{noise:g}_seed{a.seed}.json"
    res: dict[str, Any] = {"regime": a.regime, "noise": noise, "seed": a.seed, "runs": {}}
    if out.exists():  # add to (or replace in) the audit of the same runs
        res = json.loads(out.read_text())
    for strategy in a.strategy or ["full", "random", "dissect_warmup", "dissect_momentum"]:
        ratio = 1.0 if strategy == "full" else a.ratio
        run = nc.Run(reg.name, strategy, strategy, noise, ratio, a.seed)
        run_dir = REPO / "runs" / "nc" / run.dir_name
        if not (run_dir / "samples-rank0.jsonl").exists():
            raise SystemExit(f"{run_dir}: not found; run the grid first: python "
                             f"benchmarks/noisy_correspondence.py --regime {a.regime}")
        first = json.loads((run_dir / "samples-rank0.jsonl").open().readline())
        row: dict[str, Any] = {"heldout": heldout_curve(run_dir), "run": str(run_dir)}
        if first.get("curr") is None:  # no scoring pass: rerun with the diagnostic one
            diag = nc.Run(reg.name, strategy, strategy, noise, ratio, a.seed,
                          extra=(("train.diagnose_scores", True),))
            diag_dir = REPO / "runs" / "audit" / diag.dir_name
            if not (diag_dir / "samples-rank0.jsonl").exists():
                nc.train(reg, diag, data, REPO / "runs" / "audit")
            row["same_kept_ids_as_grid_run"] = _kept(diag_dir) == _kept(run_dir)
            row["scores_from"] = str(diag_dir)
            run_dir = diag_dir
        row.update(mechanism(run_dir, labels, noisy_ids))
        res["runs"][strategy] = row
        print(mechanism_lines(strategy, row), flush=True)
    common.write_json(out, res, indent=1)
    print(f"wrote {out}")
    print(f"wrote {mechanism_plot(res, out.with_suffix('.png'))}")


def mechanism_plot(res: dict[str, Any], path: Path) -> Path:
    """Four panels, one line per strategy: kept precision, the scores of noisy pairs kept
    and not kept at their step, distinct pairs trained per window, the held-out curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for i, (strategy, x) in enumerate(res["runs"].items()):
        color = f"C{i}"
        steps = x["window_end_step"]
        axes[0, 0].plot(steps, x["kept_precision"], marker=".", color=color, label=strategy)
        kept = [np.nan if v is None else v for v in x["score_kept_noisy"]]
        unkept = [np.nan if v is None else v for v in x["score_unkept_noisy"]]
        axes[0, 1].plot(steps, kept, marker=".", color=color, label=f"{strategy}: kept")
        if not all(np.isnan(unkept)):
            axes[0, 1].plot(steps, unkept, ls="--", color=color, label=f"{strategy}: not kept")
        axes[1, 0].plot(steps, x["distinct_trained"], marker=".", color=color, label=strategy)
        curve = x["heldout"]["curve"]
        axes[1, 1].plot([c[0] for c in curve], [c[1] for c in curve], marker=".",
                        color=color, label=strategy)
    axes[0, 0].axhline(1 - res["noise"], color="k", ls=":", label="the data")
    axes[0, 0].set(ylabel="clean fraction of the trained rows", xlabel="step (window end)")
    axes[0, 1].set(ylabel="mean CLIPScore of noisy pairs at their step",
                   xlabel="step (window end)")
    axes[1, 0].set(ylabel="distinct pairs trained in the window (fraction of all)",
                   xlabel="step (window end)")
    axes[1, 1].set(ylabel="held-out zero-shot accuracy", xlabel="step")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['regime']}: noise {res['noise']}, seed {res['seed']}: what each "
                 "strategy trains on")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mechanism_lines(strategy: str, x: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str = ".2f") -> str:
        return "-" if v is None else f"{v:{fmt}}"

    h, tt = x["heldout"], x["times_trained"]
    lines = [f"{strategy}: held-out peak {h['peak']:.3f} at step {h['peak_step']}, final "
             f"{h['final']:.3f}; times trained per pair clean {tt['clean']['mean']:.1f} ± "
             f"{tt['clean']['std']:.1f}, noisy {tt['noisy']['mean']:.1f} ± "
             f"{tt['noisy']['std']:.1f} (max {max(tt['clean']['max'], tt['noisy']['max'])})"
             + ("" if "same_kept_ids_as_grid_run" not in x else
                f"; scores from a diagnostic rerun, same kept ids: "
                f"{x['same_kept_ids_as_grid_run']}"),
             "  | to step | kept prec | distinct | kept again | class share min/max | "
             "score kept/unkept clean | score kept/unkept noisy | kept score rank |"]
    for i, end in enumerate(x["window_end_step"]):
        lines.append(
            f"  | {end} | {f(x['kept_precision'][i])} | {f(x['distinct_trained'][i])} | "
            f"{f(x['kept_again'][i])} | {f(x['class_share_min'][i], '.3f')}/"
            f"{f(x['class_share_max'][i], '.3f')} | {f(x['score_kept_clean'][i], '.1f')}/"
            f"{f(x['score_unkept_clean'][i], '.1f')} | {f(x['score_kept_noisy'][i], '.1f')}/"
            f"{f(x['score_unkept_noisy'][i], '.1f')} | {f(x['kept_score_rank'][i])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
