"""The runner of the noisy-correspondence benchmark: its regimes, the grid of runs in each,
one run through the real trainer and its summary, and the results file.

A regime's trainer settings (model, batch, epochs, optimiser, evaluation cadence, data
workers, T_w) are a run config in launch/configs/ (CONFIG_FILES), the file the demo also
reads for `memorise`; each run passes it to `launch/train.py` and overrides only what the
run varies. What is not a trainer setting (the dataset and its size, the noise levels,
seeds, strategies and sweeps) is the regime's grid below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/<script>.py
    import common  # type: ignore[no-redef]

from dissect_dist.config import load_config

REPO = common.REPO
CONFIGS = REPO / "launch" / "configs"

ALL = ["full", "random", "clipscore", "small_loss", "big_loss", "dissect_momentum",
       "dissect_warmup"]
# Variant rows of the main table: (label, strategy, extra overrides)
VARIANTS = [("dissect_momentum[first_sight=zero]", "dissect_momentum",
             {"selection.first_sight": "zero"}),
            ("dissect_momentum[local]", "dissect_momentum", {"selection.scope": "local"})]

# What a run is scored by, per dataset: (key in the results, name in tables and plots)
METRICS = {"fmnist": ("zeroshot_acc", "accuracy"), "icons": ("retrieval_R@1", "R@1")}
HELDOUT = 0.1  # fraction of the icons held out for retrieval
RANKS = 2

# Each regime's run config (trainer settings), in launch/configs/.
CONFIG_FILES = {"early": "nc-early.yaml", "memorise": "tiny-cpu.yaml",
                "icons": "nc-icons.yaml", "quick": "nc-quick.yaml"}


@dataclasses.dataclass(frozen=True)
class Regime:
    """A regime as the results file records it (`meta.regimes`): the grid, and the trainer
    settings read from its run config (load_regime)."""

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
        return self.train_pairs // (RANKS * self.batch_per_rank)

    @property
    def config(self) -> Path:
        """The regime's run config, which every run of it passes to launch/train.py."""
        return CONFIGS / CONFIG_FILES[self.name]


def load_regime(name: str, *, subset: int, data: Literal["fmnist", "icons"] = "fmnist",
                **grid: Any) -> Regime:
    """The regime `name`: `subset`, `data` and `grid` (Regime's grid fields) plus the
    trainer settings of its run config, which must log once per epoch and evaluate
    every whole number of epochs (the summaries are per epoch)."""
    path = CONFIGS / CONFIG_FILES[name]
    cfg = load_config(str(path), [])
    train_pairs = subset - (round(HELDOUT * subset) if data == "icons" else 0)
    spe = train_pairs // (RANKS * cfg.data.batch_size)
    if cfg.train.log_every != spe or cfg.train.eval_every <= 0 or cfg.train.eval_every % spe:
        raise ValueError(
            f"{path}: train.log_every is {cfg.train.log_every} and train.eval_every "
            f"{cfg.train.eval_every}; the {name} regime summarises per epoch, so set "
            f"log_every to the steps per epoch, {train_pairs} pairs / ({RANKS} ranks x "
            f"{cfg.data.batch_size}) = {spe}, and eval_every to a multiple of it")
    return Regime(name=name, subset=subset, data=data, model=cfg.model.name,
                  batch_per_rank=cfg.data.batch_size, epochs=cfg.train.epochs,
                  lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                  warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.schedule,
                  eval_every_epochs=cfg.train.eval_every // spe,
                  warmup_epochs=cfg.selection.warmup_epochs, ratio=cfg.selection.ratio,
                  workers=cfg.data.workers, **grid)


_SMALL_GRID: dict[str, Any] = dict(seeds=(0,), noise_sweep=(), ratio_sweep=(),
                                   main_strategies=("full", "random", "dissect_momentum"),
                                   variants=False)
REGIMES = {
    # the model is still learning the clean majority when training ends
    "early": load_regime("early", subset=8000),
    # full-data training fits the noisy pairs; held-out accuracy peaks, then falls
    "memorise": load_regime("memorise", subset=500),
    # unique captions (one name per icon); exploratory, one seed
    "icons": load_regime("icons", data="icons", subset=2000, **_SMALL_GRID),
    # the smoke run of the test suite: the same code path in about a minute per regime
    "quick": load_regime("quick", subset=512, **_SMALL_GRID),
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

    @property
    def dir_name(self) -> str:
        """The run's directory under the runs root."""
        return self.key.replace("/", "__")


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
    """What a run sets on top of its regime's run config."""
    ov = {
        "data.train_manifest": f"{data}/train/manifest.json",
        "data.noise_ledger": f"{data}/train/noise_ledger.npy",
        **({"data.retrieval_manifest": f"{data}/heldout/manifest.json"} if reg.data == "icons"
           else {"data.zeroshot_dir": str(data)}),
        "selection.strategy": run.strategy, "selection.ratio": run.ratio,
        "train.seed": run.seed, "train.run_dir": str(run_dir),
        # full-data runs are the memorisation diagnostic: score every batch
        "train.diagnose_scores": run.strategy == "full",
        **dict(run.extra),
    }
    return [f"{k}={v}" for k, v in ov.items()]


def train(reg: Regime, run: Run, data: Path, runs_root: Path) -> dict[str, Any]:
    run_dir = runs_root / run.dir_name
    shutil.rmtree(run_dir, ignore_errors=True)
    r = common.launch(overrides(reg, run, data, run_dir), what=run.key, ranks=RANKS,
                      config=reg.config, log=run_dir / "launch.log")
    res = summarise(common.read_metrics(run_dir), reg)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # metrics are what we keep
    return {**dataclasses.asdict(run), "key": run.key, "wall_s": r.wall_s,
            "code": common.code_version(), **res}


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
        return dict(json.loads(path.read_text()))
    return {"runs": {}}


def save_results(path: Path, res: dict[str, Any]) -> None:
    """Strict JSON (NaN is stored as null), written atomically after every run."""
    common.write_json(path, res, indent=1, strict=True)
