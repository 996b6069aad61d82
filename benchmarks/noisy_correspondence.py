"""Selection quality under noisy correspondence: DISSect against its baselines on real data
with a known fraction of swapped captions, in two regimes.

    python benchmarks/noisy_correspondence.py                 # the full grid (resumable)
    python benchmarks/noisy_correspondence.py --quick         # a <= 5 min smoke run
    python benchmarks/noisy_correspondence.py --regime memorise --budget-min 60
    python benchmarks/noisy_correspondence.py --report        # tables + plots from the JSON

Every run goes through the real trainer (`deepspeed launch/train.py`, 2 CPU ranks, global
ranking unless the row says local) with the same number of steps, so a selection run
trains on r x the samples of the full-data run. Finished runs are kept in the results
JSON (written after every run) and skipped on re-run, so the grid can be completed over
several invocations; `--budget-min` stops starting new runs after that many minutes.
Runs are ordered so that a partial grid is useful: the main table's first seed in every
regime, then the other seeds, then the sweeps.

Regimes (see REGIMES; benchmarks/README.md says how they were chosen and sized):
  early     Fashion-MNIST, many pairs, few epochs: the model is still learning the clean
            majority when training ends (the regime of the first pilot).
  memorise  Fashion-MNIST, few pairs, many epochs, a constant learning rate: full-data
            training fits the noisy pairs and held-out accuracy peaks, then falls.
  icons     (not in the default grid: `--regime icons`) the icon fonts' glyphs captioned
            with their own names, so every caption is unique, as web captions nearly are;
            few pairs, many epochs. Exploratory: one seed, full / random / DISSect.
Fashion-MNIST runs are scored by zero-shot accuracy on the clean 10k test split, icon runs
by image<->text retrieval R@1 on the held-out icons (mean of both directions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dissect_dist.launching import read_metrics, run_training  # noqa: E402

ALL = ["full", "random", "clipscore", "small_loss", "big_loss", "dissect_momentum",
       "dissect_warmup"]
# Variant rows of the main table: (label, strategy, extra overrides)
VARIANTS = [("dissect_momentum[first_sight=zero]", "dissect_momentum",
             {"selection.first_sight": "zero"}),
            ("dissect_momentum[local]", "dissect_momentum", {"selection.scope": "local"})]


# What a run is scored by, per dataset: (key in the results, name in tables and plots)
METRICS = {"fmnist": ("zeroshot_acc", "accuracy"), "icons": ("retrieval_R@1", "R@1")}
HELDOUT = 0.1  # fraction of the icons held out for retrieval


@dataclasses.dataclass(frozen=True)
class Regime:
    name: str
    # fmnist: training pairs drawn from Fashion-MNIST's 60k; icons: icons used, of which
    # HELDOUT are held out
    subset: int
    model: str
    batch_per_rank: int
    epochs: int
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    eval_every_epochs: int
    warmup_epochs: int  # T_w of dissect_warmup
    seeds: tuple[int, ...] = (0, 1, 2)
    noise: float = 0.4
    ratio: float = 0.3
    noise_sweep: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    noise_sweep_strategies: tuple[str, ...] = ("full", "random", "clipscore", "dissect_momentum")
    ratio_sweep: tuple[float, ...] = (0.3, 0.5, 0.7)
    ratio_sweep_strategies: tuple[str, ...] = ("random", "dissect_momentum")
    main_strategies: tuple[str, ...] = tuple(ALL)
    variants: bool = True
    # Data workers per rank. The sample order and augmentation do not depend on it (the
    # loader's contract), so neither do the results, only the wall time.
    workers: int = 1
    data: Literal["fmnist", "icons"] = "fmnist"

    @property
    def train_pairs(self) -> int:
        return self.subset - (round(HELDOUT * self.subset) if self.data == "icons" else 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.train_pairs // (2 * self.batch_per_rank)


REGIMES = {
    "early": Regime(name="early", subset=8000, model="tiny-vit-28", batch_per_rank=64,
                    epochs=5, lr=1e-3, weight_decay=0.01, warmup_steps=20, schedule="cosine",
                    eval_every_epochs=1, warmup_epochs=1),
    "memorise": Regime(name="memorise", subset=500, model="tiny-vit-28", batch_per_rank=32,
                       epochs=64, lr=2e-3, weight_decay=0.0, warmup_steps=20,
                       schedule="constant", eval_every_epochs=4, warmup_epochs=13,
                       # 7 batches per epoch: re-forking a worker every epoch cost more than
                       # the decoding it overlapped (a run took 116 s without, 156 s with).
                       workers=0),
    "icons": Regime(name="icons", data="icons", subset=2000, model="tiny-vit-32",
                    batch_per_rank=32, epochs=48, lr=2e-3, weight_decay=0.0, warmup_steps=20,
                    schedule="constant", eval_every_epochs=4, warmup_epochs=10, seeds=(0,),
                    noise_sweep=(), ratio_sweep=(),
                    main_strategies=("full", "random", "dissect_momentum"), variants=False,
                    workers=0),
    # The smoke run of the test suite: the same code path in about a minute per regime.
    "quick": Regime(name="quick", subset=512, model="tiny-vit-28", batch_per_rank=32,
                    epochs=2, lr=1e-3, weight_decay=0.01, warmup_steps=4, schedule="cosine",
                    eval_every_epochs=1, warmup_epochs=1, seeds=(0,),
                    noise_sweep=(), ratio_sweep=(),
                    main_strategies=("full", "random", "dissect_momentum"), variants=False),
}


@dataclasses.dataclass(frozen=True)
class Run:
    regime: str
    label: str  # the strategy, or a variant's label
    strategy: str
    noise: float
    ratio: float
    seed: int
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.regime}/{self.label}/noise{self.noise:g}/r{self.ratio:g}/seed{self.seed}"


def grid(reg: Regime) -> list[list[Run]]:
    """The regime's runs in phases (main table seed by seed, noise sweep, ratio sweep),
    without duplicates: a run shared by two phases is listed in the first."""
    seen: set[str] = set()
    phases: list[list[Run]] = []

    def add(label: str, strategy: str, noise: float, ratio: float, seed: int,
            extra: dict[str, Any] | None = None) -> None:
        ratio = 1.0 if strategy == "full" else ratio
        r = Run(reg.name, label, strategy, noise, ratio, seed, tuple(sorted((extra or {}).items())))
        if r.key not in seen:
            seen.add(r.key)
            phases[-1].append(r)

    variants = VARIANTS if reg.variants else []
    for seed in reg.seeds:  # main table, one seed after another
        phases.append([])
        for s in reg.main_strategies:
            add(s, s, reg.noise, reg.ratio, seed)
        for label, s, extra in variants:
            add(label, s, reg.noise, reg.ratio, seed, extra)
    phases.append([])
    for noise in reg.noise_sweep:
        for s in reg.noise_sweep_strategies:
            add(s, s, noise, reg.ratio, reg.seeds[0])
    phases.append([])
    for ratio in reg.ratio_sweep:
        for s in reg.ratio_sweep_strategies:
            add(s, s, reg.noise, ratio, reg.seeds[0])
    return phases


def interleave(grids: list[list[list[Run]]]) -> list[Run]:
    """Phase by phase across regimes (every regime's first seed, then the next seed, ...,
    then the sweeps), so a grid stopped early is balanced between regimes."""
    out: list[Run] = []
    for i in range(max(len(g) for g in grids)):
        for g in grids:
            out += g[i] if i < len(g) else []
    return out


# ------------------------------------------------------------------ data and one run
def dataset(reg: Regime, noise: float, root: Path) -> Path:
    from dissect_dist.data.builders import build_fashion_mnist, build_icons

    d = root / f"{reg.data}-{reg.subset}-noise{noise:g}"
    if not (d / "train" / "noise_ledger.npy").exists():
        tmp = d.with_name(d.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[nc] building {reg.subset} {reg.data} pairs, {noise:.0%} noisy -> {d}",
              flush=True)
        if reg.data == "icons":  # the first `subset` icons in font order, 32 px
            build_icons(str(tmp), noise=noise, seed=0, heldout=HELDOUT, limit=reg.subset)
        else:
            build_fashion_mnist(str(tmp), noise=noise, subset=reg.subset, seed=0)
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)  # a crash mid-build leaves only the .partial directory
    return d


def overrides(reg: Regime, run: Run, data: Path, run_dir: Path) -> list[str]:
    spe = reg.steps_per_epoch
    ov = {
        "model.name": reg.model,
        "data.train_manifest": f"{data}/train/manifest.json",
        "data.noise_ledger": f"{data}/train/noise_ledger.npy",
        **({"data.retrieval_manifest": f"{data}/heldout/manifest.json"} if reg.data == "icons"
           else {"data.zeroshot_dir": str(data)}),
        "data.batch_size": reg.batch_per_rank,
        "data.workers": reg.workers,
        "selection.strategy": run.strategy, "selection.ratio": run.ratio,
        "selection.warmup_epochs": reg.warmup_epochs,
        "optim.lr": reg.lr, "optim.weight_decay": reg.weight_decay,
        "optim.warmup_steps": reg.warmup_steps, "optim.schedule": reg.schedule,
        "train.epochs": reg.epochs, "train.seed": run.seed, "train.run_dir": str(run_dir),
        "train.log_every": spe, "train.eval_every": reg.eval_every_epochs * spe,
        # full-data runs are the memorisation diagnostic: score every batch
        "train.diagnose_scores": run.strategy == "full",
        **dict(run.extra),
    }
    return [f"{k}={v}" for k, v in ov.items()]


def train(reg: Regime, run: Run, data: Path, runs_root: Path) -> dict[str, Any]:
    run_dir = runs_root / run.key.replace("/", "__")
    shutil.rmtree(run_dir, ignore_errors=True)
    r = run_training(overrides(reg, run, data, run_dir), log=run_dir / "launch.log")
    if r.returncode != 0:
        raise RuntimeError(f"{run.key} failed (exit {r.returncode}); log: "
                           f"{run_dir / 'launch.log'}\n{r.output[-2000:]}")
    wall = r.wall_s
    res = summarise(read_metrics(run_dir), reg)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # metrics are what we keep
    return {**dataclasses.asdict(run), "key": run.key, "wall_s": wall, "code": _commit(),
            **res}


def _commit() -> str:
    """The code a run was measured with: HEAD, plus '+dirty' if tracked files differ."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=str(REPO), capture_output=True,
                              text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _finite(x: Any) -> Any:
    return x if not (isinstance(x, float) and not math.isfinite(x)) else None


def summarise(rows: list[dict[str, Any]], reg: Regime) -> dict[str, Any]:
    spe = reg.steps_per_epoch
    trained_at = {x["step"]: x["trained_total"] for x in rows if x["kind"] == "train"}
    metric = METRICS[reg.data][0]
    evals: dict[int, float] = {}
    for x in rows:
        if x["kind"] == "eval":
            evals[x["step"]] = (x["zeroshot_acc"] if reg.data == "fmnist"
                                else (x["i2t_R@1"] + x["t2i_R@1"]) / 2)
    curve = [{"epoch": s / spe, "trained": trained_at[s], "metric": m}
             for s, m in sorted(evals.items())]
    train_rows = [x for x in rows if x["kind"] == "train"]
    epochs = [x for x in rows if x["kind"] == "epoch"]
    n_ep = len(epochs)
    hist_at = sorted({0, n_ep // 4, n_ep // 2, (3 * n_ep) // 4, n_ep - 1}) if n_ep else []
    best = max(curve, key=lambda c: c["metric"])
    return {
        "metric": metric,
        "final": curve[-1]["metric"], "best": best["metric"], "best_epoch": best["epoch"],
        "curve": curve,
        "steps": train_rows[-1]["step"], "trained_samples": train_rows[-1]["trained_total"],
        "kept_precision": [_finite(x.get("kept_precision")) for x in train_rows],
        "delta_auroc": [_finite(x.get("key_auroc_clean_vs_noisy")) for x in epochs],
        # full/random runs: δ of dissect_momentum's rule on this model, steering nothing
        "shadow_delta_auroc": [_finite(x.get("shadow_delta_auroc_clean_vs_noisy"))
                               for x in epochs],
        "score_clean": [_finite(x.get("mean_score_clean")) for x in epochs],
        "score_noisy": [_finite(x.get("mean_score_noisy")) for x in epochs],
        "key_hist": {str(i): epochs[i]["key_hist"] for i in hist_at if "key_hist" in epochs[i]},
    }


# ------------------------------------------------------------------ results file
def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}}


def save_results(path: Path, res: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, allow_nan=False))
    os.replace(tmp, path)  # a crash never leaves a half-written results file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smoke grid (<= 5 min)")
    p.add_argument("--regime", action="append", choices=sorted(REGIMES),
                   help="run only these regimes (repeatable)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no new run after this many minutes")
    p.add_argument("--report", action="store_true", help="only print tables and draw plots")
    p.add_argument("--refresh", action="store_true",
                   help="re-derive finished runs' summaries from their kept metrics.jsonl "
                   "(after the summary gains a field), keeping wall time and code version")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/"
                   "noisy_correspondence[_quick].json)")
    p.add_argument("--data", default=str(REPO / "data" / "nc"))
    p.add_argument("--runs", default=str(REPO / "runs" / "nc"))
    a = p.parse_args()
    names = ["quick"] if a.quick else (a.regime or ["early", "memorise"])
    out = Path(a.out or REPO / "benchmarks" / "results" /
               f"noisy_correspondence{'_quick' if a.quick else ''}.json")
    res = load_results(out)
    if a.refresh:
        n = 0
        for key, r in res["runs"].items():
            metrics = Path(a.runs) / key.replace("/", "__")
            if r["regime"] in REGIMES and (metrics / "metrics.jsonl").exists():
                r.update(summarise(read_metrics(metrics), REGIMES[r["regime"]]))
                n += 1
        save_results(out, res)
        print(f"[nc] refreshed {n} of {len(res['runs'])} runs from {a.runs}")
    if not a.report:
        todo = interleave([grid(REGIMES[n]) for n in names])
        done = [r for r in todo if r.key in res["runs"]]
        todo = [r for r in todo if r.key not in res["runs"]]
        print(f"[nc] {len(done)} finished runs kept from {out}; {len(todo)} to run", flush=True)
        t_start = time.perf_counter()
        for i, run in enumerate(todo):
            spent = (time.perf_counter() - t_start) / 60
            if a.budget_min is not None and spent >= a.budget_min:
                print(f"[nc] budget of {a.budget_min:g} min spent: {len(todo) - i} runs left "
                      "for the next invocation", flush=True)
                break
            reg = REGIMES[run.regime]
            data = dataset(reg, run.noise, Path(a.data))
            print(f"[nc] ({i + 1}/{len(todo)}, {spent:.1f} min) {run.key} ...", flush=True)
            r = train(reg, run, data, Path(a.runs))
            res["runs"][run.key] = r
            meta = res.setdefault("meta", {"regimes": {}})
            meta["regimes"].update({n: dataclasses.asdict(REGIMES[n]) for n in names})
            meta.update(ranks=2, machine=_machine())
            save_results(out, res)
            print(f"[nc]   final {r['final']:.3f} best {r['best']:.3f} kept precision "
                  f"{_mean(r['kept_precision']):.3f} trained {r['trained_samples']} "
                  f"wall {r['wall_s']:.0f} s", flush=True)
    report(res, names, out.with_suffix(""))
    return 0


# ------------------------------------------------------------------ report
def _runs(res: dict[str, Any], regime: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in res["runs"].values() if r["regime"] == regime
            and all(r[k] == v for k, v in match.items())]


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """The runs' labels in table order: the strategies as ALL lists them, the variant
    rows, then any other label (not the results file's order, which depends on what was
    rerun when)."""
    order = ALL + [v[0] for v in VARIANTS]
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
             f"| strategy | seeds | final {what} | best {what} | kept precision (mean over epochs) "
             "| key AUROC clean vs noisy, first / mid / last epoch with a key (δ for dissect) | trained samples | samples to reach full's "
             "best | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    labels = _labels(reg_runs)
    for label in labels:
        rs = [r for r in _runs(res, regime, label=label, noise=noise)
              if r["ratio"] in (ratio, 1.0)]
        if not rs:
            continue
        kp = [_mean(r["kept_precision"]) for r in rs]
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
        lines.append(
            f"| {label} | {len(rs)} | {_ms([r['final'] for r in rs])} | "
            f"{_ms([r['best'] for r in rs])} | {_ms(kp)} | {au_s} | "
            f"{np.mean([r['trained_samples'] for r in rs]):.0f} | {reach_s} | "
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
                         f"{_mean(rs[0]['kept_precision']):.2f}" if rs else "-")
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
            ep = np.arange(1, len(f["score_clean"]) + 1)
            ax.plot(ep, f["score_clean"], color="tab:blue", alpha=0.8,
                    label="clean pairs" if i == 0 else None)
            ax.plot(ep, f["score_noisy"], color="tab:red", alpha=0.8,
                    label="noisy pairs" if i == 0 else None)
            ax2.plot([c["epoch"] for c in f["curve"]], [c["metric"] for c in f["curve"]],
                     color="k", ls="--", marker=".", alpha=0.7,
                     label=f"held-out {what}" if i == 0 else None)
        ax.set(xlabel="epoch", ylabel="mean CLIPScore during training",
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
            ax.set(title=f"epoch {int(ep) + 1}", xlabel="δ = hist − curr")
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
            au = [r["delta_auroc"] for r in dis if r["label"] == label]
            if au:
                arr = np.array([[np.nan if x is None else x for x in a] for a in au], float)
                seen = (~np.isnan(arr)).sum(0)  # epochs without a key (warm-up) stay NaN
                m = np.where(seen > 0, np.nansum(arr, 0) / np.maximum(seen, 1), np.nan)
                ax.plot(np.arange(1, len(m) + 1), m, color=color,
                        label=f"{label}: δ AUROC clean vs noisy ({len(au)} seeds)")
        ax.axhline(0.5, color="grey", lw=0.8)
        shadow = [f["shadow_delta_auroc"] for f in fulls
                  if any(x is not None for x in f.get("shadow_delta_auroc") or [])]
        if shadow:
            m = np.array([[np.nan if x is None else x for x in a] for a in shadow], float)
            ax.plot(np.arange(1, m.shape[1] + 1), m.mean(0), color="tab:blue", ls="-.",
                    label=f"full data: δ AUROC of the same rule, steering nothing "
                    f"({len(shadow)} seeds)")
        gap = np.mean([np.subtract(f["score_clean"], f["score_noisy"]) for f in fulls], axis=0)
        ax2.plot(np.arange(1, len(gap) + 1), gap, color="tab:red", ls="--",
                 label="full data: clean − noisy mean CLIPScore")
        best = np.mean([f["best_epoch"] for f in fulls])
        ax.axvline(best, color="k", ls=":", label=f"full data: best {what} (epoch {best:.0f})")
        ax.set(xlabel="epoch", ylabel="AUROC of δ (clean above noisy)", ylim=(0, 1),
               title=f"{regime}: is δ informative before the noisy pairs are memorised?")
        ax2.set_ylabel("clean − noisy score gap (full data)")
        _legend(ax, ax2, fontsize=7, loc="lower left")
        paths.append(_save(fig, prefix, regime, "timing"))
    # 4. kept precision over training
    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        for r in [x for x in main if x["label"] == label][:1]:
            kp = [np.nan if x is None else x for x in r["kept_precision"]]
            ax.plot(np.arange(1, len(kp) + 1), kp, label=label)
    ax.axhline(1 - noise, color="k", ls=":", label="clean fraction of the data")
    ax.set(xlabel="epoch", ylabel="precision of kept pairs (fraction clean)",
           title=f"{regime}: noise {noise}, r = {ratio}")
    ax.legend(fontsize=7)
    paths.append(_save(fig, prefix, regime, "kept_precision"))
    return paths


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


def _mean(xs: list[Any]) -> float:
    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else float("nan")


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores, {sys.platform}, python {sys.version.split()[0]}"


if __name__ == "__main__":
    sys.exit(main())
