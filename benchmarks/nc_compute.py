"""The report of the equal-compute regimes of the noisy-correspondence benchmark
(nc_runner's `compute` and `icons-compute`): every run spends the FLOPs of the
full-data run, and the question is which selection, if any, pays for its scoring.

One table (mean ± std over seeds) and one figure per regime: the held-out metric (and
R@10 on icons) against the rows trained, the FLOPs spent (scoring + training) and the
training loop's wall seconds, and, per strategy, the share of the budget it needed to
reach full's and random's final metric of the same seed (or "never")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

if __package__:
    from benchmarks.common import mean_logged
    from benchmarks.nc_runner import METRICS, ORDER
else:  # run as a file: python benchmarks/<script>.py
    from common import mean_logged  # type: ignore[no-redef]
    from nc_runner import METRICS, ORDER  # type: ignore[no-redef]

AXES = (("trained", "rows trained"), ("flops", "FLOPs (scoring + training)"),
        ("wall_s", "training wall s (loading included, evaluation excluded)"))


def _runs(res: dict[str, Any], regime: str, noise: float | None = None
          ) -> dict[str, list[dict[str, Any]]]:
    """The regime's runs at `noise` (the regime's) by label: the strategies in ORDER's
    order, then their variants (e.g. a cheaper scoring pass); each sorted by seed."""
    if noise is None:
        noise = res["meta"]["regimes"][regime]["noise"]
    out: dict[str, list[dict[str, Any]]] = {}
    for r in res["runs"].values():
        if r["regime"] == regime and r["noise"] == noise:
            out.setdefault(r["label"], []).append(r)
    order = {s: i for i, s in enumerate(ORDER)}
    return {s: sorted(out[s], key=lambda r: r["seed"])
            for s in sorted(out, key=lambda s: (order.get(s.split("[")[0], len(order)),
                                                 "[" in s, s))}


def _ms(xs: list[float], fmt: str = ".3f") -> str:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:{fmt}}"
    return f"{np.mean(xs):{fmt}} ± {np.std(xs, ddof=1):{fmt}}"


def budget_to_reach(run: dict[str, Any], target: float, budget: float) -> float | None:
    """The share of the budget spent at the run's first evaluation at or above target."""
    for c in run["curve"]:
        if c["metric"] >= target - 1e-12:
            return float(c["flops"]) / budget
    return None


def _reach(runs: list[dict[str, Any]], refs: list[dict[str, Any]], budget: float) -> str:
    """'0.42 (3/3)': the mean share of the budget at which the runs reached the final
    metric of the reference run of the same seed, over the seeds that reached it."""
    by_seed = {r["seed"]: r["final"] for r in refs}
    got = [budget_to_reach(r, by_seed[r["seed"]], budget) for r in runs if r["seed"] in by_seed]
    if not got:
        return "-"
    hit = [g for g in got if g is not None]
    if not hit:
        return f"never (0/{len(got)})"
    return f"{np.mean(hit):.2f} ({len(hit)}/{len(got)})"


def table(res: dict[str, Any], regime: str, noise: float | None = None) -> str:
    by = _runs(res, regime, noise)
    if "full" not in by:
        return f"(regime {regime}: no finished full-data run yet)\n"
    noise = by["full"][0]["noise"]
    budget = float(np.mean([r["flops"] for r in by["full"]]))
    what = METRICS[res["meta"]["regimes"][regime]["data"]][1]
    seeds = sorted({r["seed"] for rs in by.values() for r in rs})
    lines = [
        f"### Regime `{regime}`, noise {noise:g}: equal compute (budget {budget:.3e} "
        f"FLOPs, full's; seeds {seeds}; mean ± std)", "",
        f"| strategy | runs | steps | rows trained | pairs scored | FLOPs share: scoring / "
        f"reference | FLOPs / budget | train wall s | {what} final | {what} best | kept "
        f"precision | noisy dropped | budget to reach full's final | to reach random's final |",
        "|" + "---|" * 14]
    for s, rs in by.items():
        lines.append(
            f"| {s} | {len(rs)} | {_ms([r['steps'] for r in rs], '.0f')} | "
            f"{_ms([r['trained_samples'] for r in rs], '.0f')} | "
            f"{_ms([r['scored_samples'] for r in rs], '.0f')} | "
            f"{_ms([(r['flops_score'] or 0) / r['flops'] for r in rs], '.2f')} / "
            f"{_ms([(r.get('flops_reference') or 0) / r['flops'] for r in rs], '.2f')} | "
            f"{_ms([r['flops'] / budget for r in rs], '.3f')} | "
            f"{_ms([r['train_wall_s'] for r in rs], '.0f')} | "
            f"{_ms([r['final'] for r in rs])} | {_ms([r['best'] for r in rs])} | "
            f"{_ms([mean_logged(r['kept_precision']) for r in rs])} | "
            f"{_ms([mean_logged(r['dropped_noisy_recall']) for r in rs])} | "
            f"{_reach(rs, by['full'], budget)} | {_reach(rs, by.get('random', []), budget)} |")
    refs = {r["seed"]: r["reference"] for rs in by.values() for r in rs if r.get("reference")}
    for seed, ref in sorted(refs.items()):
        lines.append(
            f"\nReference model, seed {seed}: {ref['pairs']} clean held-out pairs, "
            f"{ref['epochs']} epochs, held-out {what} "
            f"{ref.get('heldout_metric', ref.get('zeroshot_acc')):.3f}; its scores "
            f"separate clean from noisy training pairs with AUROC "
            f"{ref['auroc_clean_vs_noisy']:.3f}; cost {ref['flops_model'] / budget:.3f} "
            f"(training) + {ref['flops_scoring'] / budget:.4f} (scoring) of the budget.")
    return "\n".join(lines) + "\n"


def _mean_curve(runs: list[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds, evaluation by evaluation (a strategy's runs evaluate at the same
    steps; the shortest run sets the length)."""
    n = min(len(r["curve"]) for r in runs)
    xs = np.array([[c[x] for c in r["curve"][:n]] for r in runs], dtype=float)
    ys = np.array([[c.get(y, np.nan) for c in r["curve"][:n]] for r in runs], dtype=float)
    return xs.mean(0), ys.mean(0)


def plot(res: dict[str, Any], regime: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {k: v for k, v in _runs(res, regime).items() if "[" not in k}
    if "full" not in by:
        return None
    what = METRICS[res["meta"]["regimes"][regime]["data"]][1]
    ys = [("metric", what)] + ([("R@10", "R@10")] if any(
        "R@10" in c for rs in by.values() for r in rs for c in r["curve"]) else [])
    fig, axes = plt.subplots(len(ys), 3, figsize=(15, 4.2 * len(ys)), squeeze=False)
    for row, (y, yname) in enumerate(ys):
        for col, (x, xname) in enumerate(AXES):
            ax = axes[row][col]
            for s, rs in by.items():
                if not all(r["curve"] and r["curve"][0].get(x) is not None for r in rs):
                    continue
                mx, my = _mean_curve(rs, x, y)
                ax.plot(mx, my, label=f"{s} ({len(rs)})",
                        ls="--" if s in ("full", "oracle") else "-")
            ax.set_xlabel(xname)
            ax.set_ylabel(f"held-out {yname}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{regime}: every run spends the full-data run's FLOPs (mean over seeds)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(res: dict[str, Any], regime: str, prefix: Path) -> None:
    print(table(res, regime))
    main = res["meta"]["regimes"][regime]["noise"]
    for noise in sorted({r["noise"] for r in res["runs"].values()
                         if r["regime"] == regime and r["noise"] != main}):
        print(table(res, regime, noise))
    path = plot(res, regime, prefix.parent / prefix.name / f"{regime}_equal_compute.png")
    if path is not None:
        print(f"[nc] wrote {path}")
