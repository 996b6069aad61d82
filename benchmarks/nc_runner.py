"""The runner of the noisy-correspondence benchmark: its regimes, the grid of runs in each,
one run through the real trainer and its summary, and the results file.

A regime's trainer settings (model, batch, epochs, optimiser, evaluation cadence, data
workers, T_w) are a run config in launch/configs/ (CONFIG_FILES), the file the demo also
reads for `memorise`; each run passes it to `launch/train.py` and overrides only what the
run varies. What is not a trainer setting (the dataset and its size, the noise levels,
seeds, strategies and sweeps) is the regime's grid below.

Two ways to compare a selection run with `full` (Regime.pool):
  batch  every run loads the config's batch; a selection run trains r of it (r x the rows
         of `full` per step, and a r x smaller batch of negatives in the contrastive loss).
  pool   every run trains the config's batch B per rank per step, for the same number of
         steps (the config's full-data run): a selection run loads and scores a pool of
         round(B / r) per rank and trains r of it, as the paper's runs do (1280 loaded,
         256 trained per GPU). pool_settings() derives such a run's batch, epochs, step
         cap, log and evaluation cadence and T_w (the config's fraction of the run).
and one way to compare them at equal compute (Regime.equal_compute):
  flops  every run loads the config's batch and trains until it has spent the FLOPs of
         the config's full-data run (train.max_flops; scoring and training counted as
         dissect_dist/compute.py counts them): a selection run pays its scoring pass with
         fewer trained rows, random (no scoring) trains r of each batch for 1 / r times
         as many steps, and `oracle` (the ledger's clean pairs, at no selection cost) is
         the ceiling. The configs' learning rate is constant after warm-up, so where a
         run stops does not bend its schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/<script>.py
    import common  # type: ignore[no-redef]

import numpy as np

from dissect_dist import compute
from dissect_dist.config import SelectionConfig, load_config
from dissect_dist.metrics import auroc
from dissect_dist.selection import build_strategy
from store import ScoreStore, SnapshotLocation

REPO = common.REPO
CONFIGS = REPO / "launch" / "configs"

ALL = ["full", "random", "clipscore", "small_loss", "big_loss", "dissect_momentum",
       "dissect_warmup"]
# The order of the tables' rows: the strategies, then the equal-compute regimes' ceiling.
ORDER = [*ALL, "learnability", "reference_filter", "oracle"]
# Strategies that read a reference model's scores (selection.reference).
REFERENCE = ("learnability", "reference_filter")
# The reference model of a run (`reference`): trained on this share of the regime's pairs,
# clean and disjoint from them, for REF_EPOCHS epochs at batch REF_BATCH per rank.
REF_SHARE, REF_EPOCHS, REF_BATCH = 0.1, 100, 16
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
                "icons": "nc-icons.yaml", "quick": "nc-quick.yaml",
                "pool": "tiny-cpu.yaml", "pool-quick": "nc-quick.yaml",
                "icons-pool": "nc-icons-pool.yaml", "compute": "tiny-cpu.yaml",
                "icons-compute": "nc-icons.yaml"}


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
    beta: float  # β of dissect_momentum
    seeds: tuple[int, ...] = (0, 1, 2)
    noise: float = 0.4
    ratio: float = 0.3
    noise_sweep: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    noise_sweep_strategies: tuple[str, ...] = ("full", "random", "clipscore", "dissect_momentum")
    ratio_sweep: tuple[float, ...] = (0.3, 0.5, 0.7)
    ratio_sweep_strategies: tuple[str, ...] = ("random", "dissect_momentum")
    main_strategies: tuple[str, ...] = tuple(ALL)
    variants: bool = True
    # T_w of dissect_warmup (as a fraction of the run) and β of dissect_momentum: the
    # other values tried, one seed each (the paper leaves both to tuning)
    warmup_sweep: tuple[float, ...] = ()
    beta_sweep: tuple[float, ...] = ()
    # selection.score_patch_dropout values tried on these strategies (one seed each): the
    # cheap scoring pass
    score_dropout_sweep: tuple[float, ...] = ()
    score_dropout_strategies: tuple[str, ...] = ()
    # selection.score_resolution values tried on score_dropout_strategies (one seed each)
    score_resolution_sweep: tuple[int, ...] = ()
    # see the module docstring: selection runs load a pool of B / r and train B
    pool: bool = False
    # see the module docstring: every run spends the FLOPs of the config's full-data run
    equal_compute: bool = False
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

    @property
    def steps(self) -> int:
        """Steps of the config's full-data run: every run of a pool regime takes as many."""
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_fraction(self) -> float:
        """T_w of the config as a fraction of the run."""
        return self.warmup_epochs / self.epochs


@dataclasses.dataclass(frozen=True)
class PoolRun:
    """A pool-regime run's trainer settings (pool_settings)."""

    batch_per_rank: int  # rows loaded (and, for selection strategies, scored) per rank
    steps_per_epoch: int
    epochs: int  # enough for Regime.steps; train.max_steps stops the run there
    log_every: int  # once per epoch
    eval_every: int  # the config's cadence rounded to whole epochs
    warmup_epochs: int  # the config's T_w as the same fraction of the run's steps


def pool_settings(reg: Regime, strategy: str, ratio: float,
                  warmup_fraction: float | None = None) -> PoolRun:
    """How a run of the pool regime `reg` trains reg.batch_per_rank rows per rank and step
    for reg.steps steps: `full` loads that batch, a selection strategy a pool of
    round(batch / ratio) (the selector keeps round(ratio x pool) over the global batch)."""
    b = reg.batch_per_rank if strategy == "full" else round(reg.batch_per_rank / ratio)
    spe = reg.train_pairs // (RANKS * b)
    if spe < 1:
        raise ValueError(f"regime {reg.name}: a pool of {RANKS} x {b} pairs (r = {ratio}) is "
                         f"larger than its {reg.train_pairs} training pairs")
    every = reg.eval_every_epochs * reg.steps_per_epoch
    frac = reg.warmup_fraction if warmup_fraction is None else warmup_fraction
    return PoolRun(batch_per_rank=b, steps_per_epoch=spe, epochs=-(-reg.steps // spe),
                   log_every=spe, eval_every=spe * max(1, round(every / spe)),
                   warmup_epochs=round(frac * reg.steps / spe))


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
                  warmup_epochs=cfg.selection.warmup_epochs, beta=cfg.selection.beta,
                  ratio=cfg.selection.ratio, workers=cfg.data.workers, **grid)


_POOL_FOUR = ("full", "random", "dissect_warmup", "dissect_momentum")
_COMPUTE = dict(main_strategies=("full", "random", "clipscore", "dissect_momentum",
                                 "dissect_warmup", "oracle"), variants=False,
                noise_sweep=(), ratio_sweep=(), equal_compute=True)
_COMPUTE_REF = {**_COMPUTE, "main_strategies": (*_COMPUTE["main_strategies"], *REFERENCE),
                # the best two selectors of the main table (3 seeds) against random and full
                "noise_sweep": (0.2, 0.6),
                "noise_sweep_strategies": ("full", "random", "learnability",
                                           "reference_filter"),
                "score_dropout_sweep": (0.5,),
                "score_resolution_sweep": (21, 14),
                "score_dropout_strategies": ("dissect_momentum", "clipscore")}
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
    # memorise's data and trainer settings, every run training 64 rows per step
    "pool": load_regime("pool", subset=500, pool=True,
                        noise_sweep_strategies=_POOL_FOUR, ratio_sweep=(0.2, 0.3, 0.5),
                        ratio_sweep_strategies=_POOL_FOUR, warmup_sweep=(0.1, 0.4),
                        beta_sweep=(0.5, 0.99)),
    # every icon, unique captions, at a size where full-data training generalises
    "icons-pool": load_regime("icons-pool", data="icons", subset=16034, pool=True,
                              seeds=(0, 1), main_strategies=_POOL_FOUR, variants=False,
                              noise_sweep=(), ratio_sweep=()),
    # memorise's data and trainer settings, every run spending full's FLOPs
    "compute": load_regime("compute", subset=500, **_COMPUTE_REF),
    # icons' data and settings, every run spending full's FLOPs
    "icons-compute": load_regime("icons-compute", data="icons", subset=2000,
                                 **{**_COMPUTE, "main_strategies": _COMPUTE_REF["main_strategies"]}),
    # the test suite's smoke run of the pool code path
    "pool-quick": load_regime("pool-quick", subset=512, pool=True, seeds=(0,),
                              main_strategies=("full", "dissect_warmup"), variants=False,
                              noise_sweep=(), ratio_sweep=(), warmup_sweep=(0.25,)),
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
    """The regime's runs in phases (main table seed by seed, noise sweep, ratio sweep,
    T_w and β), without duplicates: a run shared by two phases is listed in the first."""
    seen: set[str] = set()
    phases: list[list[Run]] = []

    def add(label: str, strategy: str, noise: float, ratio: float, seed: int,
            extra: dict[str, Any] | None = None) -> None:
        ratio = 1.0 if strategy in ("full", "oracle") else ratio
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
    phases.append([])
    for frac in reg.warmup_sweep:
        tw = pool_settings(reg, "dissect_warmup", reg.ratio, frac).warmup_epochs if reg.pool \
            else round(frac * reg.epochs)
        add(f"dissect_warmup[T_w={frac:.0%}]", "dissect_warmup", reg.noise, reg.ratio,
            reg.seeds[0], {"selection.warmup_epochs": tw})
    for beta in reg.beta_sweep:
        add(f"dissect_momentum[beta={beta:g}]", "dissect_momentum", reg.noise, reg.ratio,
            reg.seeds[0], {"selection.beta": beta})
    for p in reg.score_dropout_sweep:
        for strategy in reg.score_dropout_strategies:
            add(f"{strategy}[score_patch_dropout={p:g}]", strategy, reg.noise, reg.ratio,
                reg.seeds[0], {"selection.score_patch_dropout": p})
    for px in reg.score_resolution_sweep:
        for strategy in reg.score_dropout_strategies:
            add(f"{strategy}[score_resolution={px}]", strategy, reg.noise, reg.ratio,
                reg.seeds[0], {"selection.score_resolution": px})
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


def eval_metric(reg: Regime, row: dict[str, Any]) -> float:
    """What an eval row of metrics.jsonl scores: zero-shot accuracy (Fashion-MNIST) or the
    mean of both directions' R@1 (icons)."""
    return float(row["zeroshot_acc"] if reg.data == "fmnist"
                 else (row["i2t_R@1"] + row["t2i_R@1"]) / 2)


def _eval_data(reg: Regime, data: Path) -> dict[str, str]:
    """The override that points a run's evaluation at the data set's held-out pairs."""
    return {"data.retrieval_manifest": f"{data}/heldout/manifest.json"} if reg.data == "icons" \
        else {"data.zeroshot_dir": str(data)}


def overrides(reg: Regime, run: Run, data: Path, run_dir: Path,
              reference: Path | None = None) -> list[str]:
    """What a run sets on top of its regime's run config (`reference`: the reference
    scores of a strategy in REFERENCE)."""
    pool: dict[str, Any] = {}
    if reg.pool:
        p = pool_settings(reg, run.strategy, run.ratio)
        pool = {"data.batch_size": p.batch_per_rank, "train.epochs": p.epochs,
                "train.max_steps": reg.steps, "train.log_every": p.log_every,
                "train.eval_every": p.eval_every, "selection.warmup_epochs": p.warmup_epochs,
                # every step's ids, keep mask, key and scores, for the selection audit
                "train.record_samples": True}
    if reg.equal_compute:
        pool = {"train.max_flops": flop_budget(reg), "train.diagnose_scores": False,
                "train.epochs": epoch_cap(reg, run.strategy, run.ratio, run.noise)}
    ov = {
        "data.train_manifest": f"{data}/train/manifest.json",
        "data.noise_ledger": f"{data}/train/noise_ledger.npy",
        **_eval_data(reg, data),
        "selection.strategy": run.strategy, "selection.ratio": run.ratio,
        "train.seed": run.seed, "train.run_dir": str(run_dir),
        **({"selection.reference": str(reference)} if reference is not None else {}),
        # full-data runs are the memorisation diagnostic: score every batch (not at equal
        # compute, where its wall time would count)
        "train.diagnose_scores": run.strategy == "full",
        **pool,
        **dict(run.extra),
    }
    return [f"{k}={v}" for k, v in ov.items()]


def train(reg: Regime, run: Run, data: Path, runs_root: Path,
          data_root: Path | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {}
    scores = None
    if run.strategy in REFERENCE:
        scores, ref = reference(reg, run.seed, run.noise, data, data_root or data.parent,
                                runs_root)
    run_dir = runs_root / run.dir_name
    shutil.rmtree(run_dir, ignore_errors=True)
    r = common.launch(overrides(reg, run, data, run_dir, scores), what=run.key, ranks=RANKS,
                      config=reg.config, log=run_dir / "launch.log")
    res = summarise(common.read_metrics(run_dir), reg, run.strategy, run.ratio)
    res.update(ref)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # metrics are what we keep
    return {**dataclasses.asdict(run), "key": run.key, "wall_s": r.wall_s,
            "code": common.code_version(), **res}


@functools.cache
def row_cost(model: str) -> compute.RowCost:
    """One pair's FLOPs on `model`, as the trainer counts them."""
    import torch

    from dissect_dist import model as modellib

    m, _, pre, tok = modellib.create(model, None)
    return compute.count_row_cost(m, *modellib.blank_row(pre, tok, torch.device("cpu"),
                                                         torch.float32))


def flop_budget(reg: Regime) -> float:
    """What the config's full-data run spends: reg.steps steps of RANKS x B pairs trained."""
    b = reg.batch_per_rank
    step = compute.step_cost(row_cost(reg.model), [b] * RANKS, [b] * RANKS, scored=False,
                             per_sample_loss=False)
    return float(reg.steps * step.flops_train)


def epoch_cap(reg: Regime, strategy: str, ratio: float, noise: float) -> int:
    """train.epochs of an equal-compute run: more than its budget can pay for (the budget
    ends it), from a step that keeps half the rows the strategy keeps on average."""
    if strategy == "full":  # it spends the budget at the config's last step
        return reg.epochs
    b = reg.batch_per_rank
    rows = { "oracle": (1 - noise) * 2 * b}.get(strategy, ratio * 2 * b)
    half = max(1, int(rows / 2)) // RANKS
    step = compute.step_cost(row_cost(reg.model), [b] * RANKS, [half] * RANKS,
                             scored=_needs_scores(strategy), per_sample_loss=False)
    return math.ceil(flop_budget(reg) / (step.flops_score + step.flops_train)
                     / reg.steps_per_epoch) + 1


def reference(reg: Regime, seed: int, noise: float, data: Path, data_root: Path,
              runs_root: Path) -> tuple[Path, dict[str, Any]]:
    """The reference scores of the regime's training pairs for runs of `seed` (made once,
    then reused): a model trained with `full` on REF_SHARE x subset clean pairs that are
    not training pairs, exported, and its scores of every training pair (launch/score.py).
    Returns the snapshot and what the run's summary records of it."""
    from dissect_dist.data.builders import build_fashion_mnist_reference, build_icons_reference

    size = round(REF_SHARE * reg.subset)
    ref_data = data_root / f"{reg.data}-reference-{reg.subset}-{size}"
    if not (ref_data / "manifest.json").exists():
        tmp = ref_data.with_name(ref_data.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if reg.data == "icons":  # the `size` icons after the regime's, under their names
            build_icons_reference(str(tmp), limit=reg.subset, size=size)
        else:
            build_fashion_mnist_reference(str(tmp), subset=reg.subset, size=size, seed=0)
        tmp.rename(ref_data)
    run_dir = runs_root / f"{reg.name}__reference__seed{seed}"
    model = run_dir / "open_clip_model.pt"
    if not model.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        common.launch([f"data.train_manifest={ref_data}/manifest.json",
                       "data.noise_ledger=null",
                       *[f"{k}={v}" for k, v in _eval_data(reg, data).items()],
                       f"data.batch_size={REF_BATCH}", "selection.strategy=full",
                       f"train.epochs={REF_EPOCHS}", "train.log_every=10",
                       f"train.eval_every={REF_EPOCHS * (size // (RANKS * REF_BATCH))}",
                       f"train.seed={seed}", f"train.run_dir={run_dir}"],
                      what=f"{reg.name} reference model, seed {seed}", ranks=RANKS,
                      config=reg.config, log=run_dir / "launch.log")
    scores = data_root / f"{data.name}-reference-scores-seed{seed}"
    common.launch([f"data.train_manifest={data}/train/manifest.json"],
                  what=f"{reg.name} reference scores, seed {seed}", ranks=RANKS,
                  config=reg.config, log=run_dir / "score.log", script="score.py",
                  args=["--model", str(model), "--out", str(scores)])
    rows = common.read_metrics(run_dir)
    acc = [eval_metric(reg, x) for x in rows if x["kind"] == "eval"]
    extra = dict(SnapshotLocation(str(scores)).read_commit(0).extra)
    ref_scores = ScoreStore.load(str(scores)).local_numpy().astype("float64")
    noisy = np.zeros(ref_scores.size, dtype=bool)
    noisy[np.load(data / "train" / "noise_ledger.npy")] = True
    return scores, {"reference": {
        "pairs": size, "epochs": REF_EPOCHS, "heldout_metric": acc[-1] if acc else None,
        "flops_model": extra["flops_model"], "flops_scoring": extra["flops_scoring"],
        "auroc_clean_vs_noisy": auroc(ref_scores, ~noisy)}}


def steps_per_epoch(reg: Regime, strategy: str, ratio: float) -> int:
    return pool_settings(reg, strategy, ratio).steps_per_epoch if reg.pool \
        else reg.steps_per_epoch


def _needs_scores(strategy: str) -> bool:
    """Does the strategy run the no-grad scoring pass (as the trainer builds it)?"""
    import torch

    s = SelectionConfig(strategy=strategy)
    return build_strategy(s.strategy, beta=s.beta, first_sight=s.first_sight,
                          warmup_epochs=s.warmup_epochs, warmup_train=s.warmup_train,
                          noisy=torch.zeros(1, dtype=torch.bool)).needs_scores


def _finite(x: Any) -> Any:
    return x if not (isinstance(x, float) and not math.isfinite(x)) else None


def summarise(rows: list[dict[str, Any]], reg: Regime, strategy: str,
              ratio: float) -> dict[str, Any]:
    spe = steps_per_epoch(reg, strategy, ratio)
    trained_at = {x["step"]: x["trained_total"] for x in rows if x["kind"] == "train"}
    # FLOPs and wall seconds spent by then (runs before the compute ledger: none)
    flops_at = {x["step"]: x.get("flops_total") for x in rows if x["kind"] == "train"}
    wall_at = {x["step"]: x.get("wall_s_total") for x in rows if x["kind"] == "train"}
    metric = METRICS[reg.data][0]
    evals: dict[int, float] = {}
    for x in rows:
        if x["kind"] == "eval":
            evals[x["step"]] = eval_metric(reg, x)
    r10 = {x["step"]: (x["i2t_R@10"] + x["t2i_R@10"]) / 2 for x in rows
           if x["kind"] == "eval" and "i2t_R@10" in x}  # icons: R@1 moves by 1/held-out
    curve = [{"epoch": s / spe, "step": s, "trained": trained_at[s], "flops": flops_at[s],
              "wall_s": wall_at[s], "metric": m, **({"R@10": r10[s]} if s in r10 else {})}
             for s, m in sorted(evals.items())]
    extra = {"final_R@10": r10[max(r10)], "best_R@10": max(r10.values())} if r10 else {}
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
        "steps_per_epoch": spe,
        # pairs loaded, and the pairs that went through the no-grad scoring pass (full's
        # diagnostic scoring, train.diagnose_scores, is not counted)
        "loaded_samples": train_rows[-1]["samples_seen"],
        "scored_samples": train_rows[-1].get(
            "pairs_scored_total",
            train_rows[-1]["samples_seen"] if _needs_scores(strategy) else 0),
        "flops": train_rows[-1].get("flops_total"),
        "flops_score": train_rows[-1].get("flops_score_total"),
        "flops_reference": train_rows[-1].get("flops_reference_total"),
        "train_wall_s": train_rows[-1].get("wall_s_total"),
        "dropped_noisy_recall": [_finite(x.get("dropped_noisy_recall")) for x in train_rows],
        "kept_precision": [_finite(x.get("kept_precision")) for x in train_rows],
        # the step of each entry of the per-train-row and per-epoch lists
        "train_steps": [x["step"] for x in train_rows],
        "epoch_steps": [x["step"] for x in epochs],
        "delta_auroc": [_finite(x.get("key_auroc_clean_vs_noisy")) for x in epochs],
        # full/random runs: δ of dissect_momentum's rule on this model, steering nothing
        "shadow_delta_auroc": [_finite(x.get("shadow_delta_auroc_clean_vs_noisy"))
                               for x in epochs],
        "score_clean": [_finite(x.get("mean_score_clean")) for x in epochs],
        "score_noisy": [_finite(x.get("mean_score_noisy")) for x in epochs],
        "key_hist": {str(i): epochs[i]["key_hist"] for i in hist_at if "key_hist" in epochs[i]},
        **extra,
    }


# ------------------------------------------------------------------ results file
def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    return {"runs": {}}


def save_results(path: Path, res: dict[str, Any]) -> None:
    """Strict JSON (NaN is stored as null), written atomically after every run."""
    common.write_json(path, res, indent=1, strict=True)
