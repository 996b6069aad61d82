"""The report of the noisy-correspondence benchmark: Markdown tables and plots drawn from
its results file (nc_runner's format), for one regime at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

if __package__:
    from benchmarks.common import mean_logged
    from benchmarks.nc_runner import HELDOUT, METRICS, ORDER, RANKS, VARIANTS
else:  # run as a file: python benchmarks/<script>.py
    from common import mean_logged  # type: ignore[no-redef]
    from nc_runner import HELDOUT, METRICS, ORDER, RANKS, VARIANTS  # type: ignore[no-redef]


def _runs(res: dict[str, Any], regime: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in res["runs"].values() if r["regime"] == regime
            and all(r[k] == v for k, v in match.items())]


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """The runs' labels in table order: the strategies as ORDER lists them, the variant
    rows, then any other label (not the results file's order, which depends on what was
    rerun when)."""
    order = ORDER + [v[0] for v in VARIANTS]
    return sorted(dict.fromkeys(r["label"] for r in runs),
                  key=lambda x: order.index(x) if x in order else len(order))


def _ms(xs: list[float], fmt: str = ".3f") -> str:
    """mean ± std over seeds (std only with 2+ values)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:{fmt}}"
    return f"{np.mean(xs):{fmt}} ± {np.std(xs, ddof=1):{fmt}}"


def samples_to_reach(run: dict[str, Any], target: float) -> int | None:
    """Trained samples at the first evaluation where the run reached `target`."""
    for c in run["curve"]:
        if c["metric"] >= target - 1e-12:
            return int(c["trained"])
    return None


def steps_of(res: dict[str, Any], run: dict[str, Any], rows: str) -> np.ndarray:
    """The step of each entry of `run`'s per-row lists, the x axis of its plots: rows
    "train" (kept_precision: one per log row, the last one at the run's last step) or
    "epoch" (delta_auroc, score_clean, ...: one per finished epoch; a pool run stopped by
    its step cap mid-epoch has one fewer). Results written before the runs recorded their
    steps take them from the regime's steps per epoch (whole epochs only, then)."""
    if f"{rows}_steps" in run:
        return np.asarray(run[f"{rows}_steps"])
    reg = res["meta"]["regimes"][run["regime"]]
    pairs = reg["subset"] - (round(HELDOUT * reg["subset"]) if reg["data"] == "icons" else 0)
    spe = pairs // (RANKS * reg["batch_per_rank"])
    n = len(run["kept_precision"] if rows == "train" else run["delta_auroc"])
    return np.arange(1, n + 1) * spe


def late(run: dict[str, Any]) -> float:
    """Mean of the run's evaluations in the last quarter of its steps (or epochs): less
    noisy than the final evaluation alone, and unlike the best one not a maximum."""
    key = "step" if all("step" in c for c in run["curve"]) else "epoch"
    end = max(c[key] for c in run["curve"])
    return float(np.mean([c["metric"] for c in run["curve"] if c[key] > 0.75 * end]))


def _full_best(res: dict[str, Any], run: dict[str, Any]) -> float | None:
    full = [r for r in _runs(res, run["regime"], strategy="full", noise=run["noise"],
                              seed=run["seed"])]
    return full[0]["best"] if full else None


def tables(res: dict[str, Any], regime: str) -> str:
    reg_runs = _runs(res, regime)
    if not reg_runs:
        return f"(no finished runs in regime {regime})\n"
    meta = res.get("meta", {}).get("regimes", {}).get(regime, {})
    noise, ratio = meta.get("noise", 0.4), meta.get("ratio", 0.3)
    what = _what(reg_runs)
    lines = [f"### Regime `{regime}`: main table (noise {noise}, r = {ratio}; mean ± std over "
             "seeds)", "",
             f"| strategy | seeds | final {what} | late {what} (mean of the last quarter's "
             f"evaluations) | best {what} | kept precision (mean over epochs) "
             "| key AUROC clean vs noisy, first / mid / last epoch with a key (δ for dissect) | trained samples | pairs loaded / scored "
             "| samples to reach full's best | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    labels = _labels(reg_runs)
    for label in labels:
        rs = [r for r in _runs(res, regime, label=label, noise=noise)
              if r["ratio"] in (ratio, 1.0)]
        if not rs:
            continue
        kp = [mean_logged(r["kept_precision"]) for r in rs]
        au = [[x for x in r["delta_auroc"] if x is not None] for r in rs]
        au_s = "-"
        if all(au):
            pick = [[a[0], a[len(a) // 2], a[-1]] for a in au]
            au_s = " / ".join(f"{np.mean([p[i] for p in pick]):.2f}" for i in range(3))
        reach = []
        for r in rs:
            target = _full_best(res, r)
            reach.append(None if target is None else samples_to_reach(r, target))
        got = [x for x in reach if x is not None]
        reach_s = (f"{np.mean(got):.0f} ({len(got)}/{len(rs)} reached)" if got
                   else f"never (0/{len(rs)})")
        cost = (f"{np.mean([r['loaded_samples'] for r in rs]):.0f} / "
                f"{np.mean([r['scored_samples'] for r in rs]):.0f}"
                if all("scored_samples" in r for r in rs) else "-")
        final, best = _ms([r['final'] for r in rs]), _ms([r['best'] for r in rs])
        if all("final_R@10" in r for r in rs):  # retrieval: R@10 beside R@1
            final += f" (R@10 {_ms([r['final_R@10'] for r in rs])})"
            best += f" (R@10 {_ms([r['best_R@10'] for r in rs])})"
        lines.append(
            f"| {label} | {len(rs)} | {final} | {_ms([late(r) for r in rs])} | {best} | "
            f"{_ms(kp)} | {au_s} | "
            f"{np.mean([r['trained_samples'] for r in rs]):.0f} | {cost} | {reach_s} | "
            f"{np.mean([r['wall_s'] for r in rs]):.0f} |")
    seed0 = min(r["seed"] for r in reg_runs)
    noises = sorted({r["noise"] for r in reg_runs})
    lines += _sweep(res, regime, labels, what, "noise", noises, f"Noise sweep (r = {ratio}, seed "
                    f"{seed0})", lambda r, n: r["noise"] == n and r["ratio"] in (ratio, 1.0)
                    and r["seed"] == seed0)
    ratios = sorted({r["ratio"] for r in reg_runs if r["strategy"] != "full"})
    lines += _sweep(res, regime, labels, what, "r =", ratios, f"Ratio sweep (noise {noise}, seed "
                    f"{seed0})", lambda r, x: r["ratio"] == x and r["noise"] == noise
                    and r["seed"] == seed0)
    fulls = [r for r in _runs(res, regime, strategy="full", noise=noise) if r["seed"] == 0]
    if fulls and fulls[0]["score_clean"]:
        f = fulls[0]
        acc = {round(c["epoch"]) - 1: c["metric"] for c in f["curve"]}  # 0-based epochs
        evals = sorted(acc)
        every = max(len(evals) // 8, 1)  # at most ~9 columns, at evaluated epochs
        at = sorted({0, *evals[every - 1::every], evals[-1]})
        lines += ["", f"Memorisation diagnostic (full data, noise {noise}, seed 0): mean "
                  f"CLIPScore of clean and noisy pairs, and held-out {what}", "",
                  "| epoch | " + " | ".join(str(e + 1) for e in at) + " |",
                  "|---|" + "---|" * len(at),
                  "| clean | " + " | ".join(f"{f['score_clean'][e]:.1f}" for e in at) + " |",
                  "| noisy | " + " | ".join(f"{f['score_noisy'][e]:.1f}" for e in at) + " |",
                  f"| {what} | " + " | ".join(f"{acc[e]:.3f}" if e in acc else ""
                                              for e in at) + " |"]
        sh = f.get("shadow_delta_auroc") or []
        if any(x is not None for x in sh):
            lines.append("| δ AUROC, dissect_momentum's rule on this model (steers nothing) | "
                         + " | ".join("-" if sh[e] is None else f"{sh[e]:.2f}" for e in at)
                         + " |")
    return "\n".join(lines) + "\n"


def _sweep(res: dict[str, Any], regime: str, labels: list[str], what: str, name: str,
           values: list[float], title: str, match: Any) -> list[str]:
    """A strategy x value table of final / best metric / kept precision, for the
    strategies run at two or more of the values."""
    if len(values) < 2:
        return []
    lines = ["", f"{title}: final / best {what} / kept precision", "",
             "| strategy | " + " | ".join(f"{name} {v:g}" for v in values) + " |",
             "|---|" + "---|" * len(values)]
    for label in labels:
        cells = []
        for v in values:
            rs = [r for r in _runs(res, regime, label=label) if match(r, v)]
            cells.append(f"{rs[0]['final']:.3f} / {rs[0]['best']:.3f} / "
                         f"{mean_logged(rs[0]['kept_precision']):.2f}" if rs else "-")
        if sum(c != "-" for c in cells) > 1:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plots(res: dict[str, Any], regime: str, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reg_runs = _runs(res, regime)
    if not reg_runs:
        return []
    meta = res.get("meta", {}).get("regimes", {}).get(regime, {})
    noise, ratio = meta.get("noise", 0.4), meta.get("ratio", 0.3)
    main = sorted((r for r in reg_runs if r["noise"] == noise and r["ratio"] in (ratio, 1.0)),
                  key=lambda r: r["seed"])  # the first run of a label is its lowest seed
    labels = _labels(main)
    what = _what(reg_runs)
    axis = {"accuracy": "zero-shot accuracy (clean test split)",
            "R@1": "held-out retrieval R@1 (mean of both directions)"}.get(what, what)
    paths = []
    # 1. held-out metric vs trained samples (seed 0 of each strategy)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        for r in [x for x in main if x["label"] == label][:1]:
            ax.plot([c["trained"] for c in r["curve"]], [c["metric"] for c in r["curve"]],
                    marker=".", label=label)
    ax.set(xlabel="trained samples", ylabel=axis,
           title=f"{regime}: noise {noise}, r = {ratio}, seed {main[0]['seed']}")
    ax.legend(fontsize=7)
    paths.append(_save(fig, prefix, regime, "accuracy_vs_samples"))
    # 2. the memorisation diagnostic
    fulls = [r for r in main if r["strategy"] == "full" and r["score_clean"]]
    if fulls:
        fig, ax = plt.subplots(figsize=(8, 5))
        ax2 = ax.twinx()
        for i, f in enumerate(fulls):
            ep = steps_of(res, f, "epoch")
            ax.plot(ep, f["score_clean"], color="tab:blue", alpha=0.8,
                    label="clean pairs" if i == 0 else None)
            ax.plot(ep, f["score_noisy"], color="tab:red", alpha=0.8,
                    label="noisy pairs" if i == 0 else None)
            ax2.plot(_curve_steps(res, f), [c["metric"] for c in f["curve"]],
                     color="k", ls="--", marker=".", alpha=0.7,
                     label=f"held-out {what}" if i == 0 else None)
        ax.set(xlabel="step", ylabel="mean CLIPScore during training",
               title=f"{regime}: full-data training, noise {noise} ({len(fulls)} seeds)")
        ax2.set_ylabel(axis)
        _legend(ax, ax2, fontsize=8, loc="lower right")
        paths.append(_save(fig, prefix, regime, "diagnostic"))
    # 3. δ histograms, clean vs noisy
    dm = [r for r in main if r["label"] == "dissect_momentum" and r["key_hist"]]
    if dm:
        hs = dm[0]["key_hist"]
        fig, axes = plt.subplots(1, len(hs), figsize=(3.2 * len(hs), 3.2))
        for ax, (ep, h) in zip(np.atleast_1d(axes), sorted(hs.items(), key=lambda x: int(x[0]))):
            e = np.asarray(h["edges"])
            mid, w = (e[1:] + e[:-1]) / 2, np.diff(e)
            for name, color in (("clean", "tab:blue"), ("noisy", "tab:red")):
                c = np.asarray(h[name], dtype=float)
                ax.bar(mid, c / max(c.sum(), 1), width=w, alpha=0.5, color=color, label=name)
            ax.set(title=f"epoch {int(ep) + 1} (step {steps_of(res, dm[0], 'epoch')[int(ep)]})",
                   xlabel="δ = hist − curr")
        np.atleast_1d(axes)[0].legend(fontsize=8)
        fig.suptitle(f"{regime}: dissect_momentum δ, clean vs noisy (fraction per class)")
        paths.append(_save(fig, prefix, regime, "delta_hist"))
    # 5. timing: when δ becomes informative vs when full-data training memorises
    dis = [r for r in main if r["strategy"] in ("dissect_momentum", "dissect_warmup")
           and r["label"] in ("dissect_momentum", "dissect_warmup")]
    if dis and fulls:
        fig, ax = plt.subplots(figsize=(8, 5))
        ax2 = ax.twinx()
        for label, color in (("dissect_momentum", "tab:green"), ("dissect_warmup", "tab:purple")):
            runs = [r for r in dis if r["label"] == label]
            if runs:
                arr = np.array([[np.nan if x is None else x for x in r["delta_auroc"]]
                                for r in runs], float)
                seen = (~np.isnan(arr)).sum(0)  # epochs without a key (warm-up) stay NaN
                m = np.where(seen > 0, np.nansum(arr, 0) / np.maximum(seen, 1), np.nan)
                ax.plot(steps_of(res, runs[0], "epoch"), m, color=color,
                        label=f"{label}: δ AUROC clean vs noisy ({len(runs)} seeds)")
        ax.axhline(0.5, color="grey", lw=0.8)
        shadow = [f["shadow_delta_auroc"] for f in fulls
                  if any(x is not None for x in f.get("shadow_delta_auroc") or [])]
        if shadow:
            m = np.array([[np.nan if x is None else x for x in a] for a in shadow], float)
            ax.plot(steps_of(res, fulls[0], "epoch"), m.mean(0), color="tab:blue", ls="-.",
                    label=f"full data: δ AUROC of the same rule, steering nothing "
                    f"({len(shadow)} seeds)")
        gap = np.mean([np.subtract(f["score_clean"], f["score_noisy"]) for f in fulls], axis=0)
        full_steps = steps_of(res, fulls[0], "epoch")
        ax2.plot(full_steps, gap, color="tab:red", ls="--",
                 label="full data: clean − noisy mean CLIPScore")
        best = np.mean([f["best_epoch"] for f in fulls]) * (full_steps[1] - full_steps[0])
        ax.axvline(best, color="k", ls=":", label=f"full data: best {what} (step {best:.0f})")
        ax.set(xlabel="step", ylabel="AUROC of δ (clean above noisy)", ylim=(0, 1),
               title=f"{regime}: is δ informative before the noisy pairs are memorised?")
        ax2.set_ylabel("clean − noisy score gap (full data)")
        _legend(ax, ax2, fontsize=7, loc="lower left")
        paths.append(_save(fig, prefix, regime, "timing"))
    # 4. kept precision over training
    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        for r in [x for x in main if x["label"] == label][:1]:
            kp = [np.nan if x is None else x for x in r["kept_precision"]]
            ax.plot(steps_of(res, r, "train"), kp, label=label)
    ax.axhline(1 - noise, color="k", ls=":", label="clean fraction of the data")
    ax.set(xlabel="step", ylabel="precision of kept pairs (fraction clean)",
           title=f"{regime}: noise {noise}, r = {ratio}")
    ax.legend(fontsize=7)
    paths.append(_save(fig, prefix, regime, "kept_precision"))
    return paths


def _curve_steps(res: dict[str, Any], run: dict[str, Any]) -> list[float]:
    """The steps of `run`'s evaluations (older results hold only their epochs)."""
    if all("step" in c for c in run["curve"]):
        return [c["step"] for c in run["curve"]]
    ep = steps_of(res, run, "epoch")
    return [c["epoch"] * (ep[1] - ep[0] if len(ep) > 1 else ep[0]) for c in run["curve"]]


def _legend(ax: Any, ax2: Any, **kw: Any) -> None:
    """One legend for a plot with two y axes."""
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, **kw)


def _save(fig: Any, prefix: Path, regime: str, what: str) -> Path:
    import matplotlib.pyplot as plt

    path = prefix.parent / prefix.name / f"{regime}_{what}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(res: dict[str, Any], names: list[str], prefix: Path) -> None:
    for n in names:
        print(tables(res, n))
        for pth in plots(res, n, prefix):
            print(f"[nc] wrote {pth}")


def _what(runs: list[dict[str, Any]]) -> str:
    """The name of what the runs are scored by (one dataset per regime)."""
    names = {k: n for k, n in METRICS.values()}
    return names.get(runs[0]["metric"], runs[0]["metric"])

