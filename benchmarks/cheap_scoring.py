"""The cheap scoring pass, measured before it is trusted: what dropping a share of the
image patches in the scoring pass (selection.score_patch_dropout) or scoring at a lower
image resolution (selection.score_resolution) saves and what it does to the scores.

    python benchmarks/cheap_scoring.py           # p = 0.25, 0.5, 0.75; 21 and 14 px
    python benchmarks/cheap_scoring.py --dropouts 0.5 --resolutions 14 --repeats 3

One `full` run of the memorise config (500 Fashion-MNIST pairs, 40% swapped captions)
through the real trainer on 2 CPU ranks, with checkpoints at epochs 16 and 64 (still
learning; memorised). At each, every pair is scored by the trainer's scoring pass
(modellib.Scorer, eval mode) at full cost and at each dropout p, in batches of 64 (the
run's global batch), and compared:
  FLOPs per pair   one pair's scoring forward as the ledger counts it (compute.py), for
                   this model (28 px, 7 px patches: a 4 x 4 grid; 21 px is 3 x 3, 14 px
                   2 x 2) and for ViT-B-32 (counted only; 224 px is a 7 x 7 grid, a lower
                   resolution maps to the nearest grid of the same share of a side)
  wall per pair    seconds per scored pair, the settings timed alternately, `--repeats`
                   rounds, median; one process, one thread
  Spearman ρ       of the cheap scores with the full-cost ones
  top-r overlap    |top 30% by cheap ∩ top 30% by full| / |top 30% by full|
  noisy dropped    the share of the swapped pairs outside the top 30% (a CLIPScore
                   filter at r = 0.3 would drop them), against full cost
  AUROC            of the scores, clean vs swapped pairs
Saved to results/cheap_scoring.json. What the cheap pass does to the equal-compute table:
`python benchmarks/noisy_correspondence.py --regime compute` runs dissect_momentum and
clipscore with score_patch_dropout 0.5 and score_resolution 21 and 14 (the table's
[score_patch_dropout=0.5] and [score_resolution=N] rows).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__:
    from benchmarks import common
    from benchmarks.gradient_offset import CONFIG, STEPS_PER_EPOCH, _pairs, _spearman
else:  # run as a file: python benchmarks/cheap_scoring.py
    import common  # type: ignore[no-redef]
    from gradient_offset import (  # type: ignore[no-redef]
        CONFIG,
        STEPS_PER_EPOCH,
        _pairs,
        _spearman,
    )

from dissect_dist import compute
from dissect_dist import model as modellib
from dissect_dist.config import load_config
from dissect_dist.data.builders import build_fashion_mnist
from dissect_dist.metrics import auroc

RATIO, BATCH = 0.3, 64


def _settings(dropouts: list[float], resolutions: list[int]) -> list[tuple[str, float, int]]:
    """(label, patch dropout, resolution) of the full pass and each cheaper one."""
    return [("full", 0.0, 0), *[(f"p={d:g}", d, 0) for d in dropouts],
            *[(f"{r}px", 0.0, r) for r in resolutions]]


def _vitb32_resolution(px: int, full: int = 28) -> int:
    """ViT-B-32's resolution for this model's `px`: the same share of a side, in whole
    32 px patches (0: full)."""
    return 32 * max(1, round(7 * px / full)) if px else 0


def _scores(model: Any, scorer: modellib.Scorer, images: torch.Tensor, texts: torch.Tensor
            ) -> tuple[np.ndarray, float]:
    """(scores of every pair, seconds) through the scoring pass, batch by batch."""
    out = []
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, images.shape[0], BATCH)):
        scorer.reseed(i)
        fi, ft = scorer(model, images[start:start + BATCH], texts[start:start + BATCH])
        out.append(modellib.clipscore(fi, ft))
    return torch.cat(out).numpy().astype(float), time.perf_counter() - t0


def _top(x: np.ndarray) -> np.ndarray:
    k = round(RATIO * x.size)
    keep = np.zeros(x.size, dtype=bool)
    keep[np.argsort(-x, kind="stable")[:k]] = True
    return keep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dropouts", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    p.add_argument("--resolutions", type=int, nargs="*", default=[21, 14],
                   help="scoring resolutions in px (multiples of 7 below 28)")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (alternating)")
    p.add_argument("--data", default=str(common.REPO / "data" / "nc" / "fmnist-500-noise0.4"))
    p.add_argument("--runs", default=str(common.REPO / "runs" / "cheap_scoring"))
    p.add_argument("--out", default=str(common.RESULTS / "cheap_scoring.json"))
    a = p.parse_args(argv)
    if any(not 0 < d < 1 for d in a.dropouts):
        p.error(f"--dropouts {a.dropouts}: shares of the patches, 0 < p < 1")
    for px in a.resolutions:
        try:
            modellib.check_scoring_resolution("tiny-vit-28", px)
        except ValueError as e:
            p.error(f"--resolutions: {e}")
    torch.set_num_threads(1)
    data = Path(a.data)
    if not (data / "train" / "noise_ledger.npy").exists():
        build_fashion_mnist(str(data), noise=0.4, subset=500, seed=0)
    cfg = load_config(str(CONFIG), [])
    run_dir = Path(a.runs) / "full"
    shutil.rmtree(run_dir, ignore_errors=True)
    print("[cheap] full run of the memorise config, checkpoints at epochs 16 and 64 ...",
          flush=True)
    common.launch([f"data.train_manifest={data}/train/manifest.json",
                   f"data.noise_ledger={data}/train/noise_ledger.npy",
                   f"data.zeroshot_dir={data}", "selection.strategy=full",
                   f"train.checkpoint_every={16 * STEPS_PER_EPOCH}", "train.keep_checkpoints=4",
                   f"train.run_dir={run_dir}"], what="cheap_scoring full run", config=CONFIG,
                  log=run_dir / "launch.log")
    noisy = np.zeros(500, dtype=bool)
    noisy[np.load(data / "train" / "noise_ledger.npy")] = True
    model, _, pre, tok = modellib.create(cfg.model.name, None)
    images, texts = _pairs(data, pre, tok)
    blank = modellib.blank_row(pre, tok, torch.device("cpu"), torch.float32)
    vitb, _, pre_b, tok_b = modellib.create("ViT-B-32", None)
    blank_b = modellib.blank_row(pre_b, tok_b, torch.device("cpu"), torch.float32)
    settings = _settings(a.dropouts, a.resolutions)
    flops = {k: compute.count_row_cost(model, *blank, score_patch_dropout=d,
                                       score_resolution=px).score for k, d, px in settings}
    flops_b = {k: compute.count_row_cost(vitb, *blank_b, score_patch_dropout=d,
                                         score_resolution=_vitb32_resolution(px)).score
               for k, d, px in settings}
    del vitb
    rows: list[dict[str, Any]] = []
    for epoch in (16, 64):
        tag = run_dir / "checkpoints" / f"step-{epoch * STEPS_PER_EPOCH:09d}"
        model.load_state_dict(torch.load(tag / "mp_rank_00_model_states.pt",
                                         weights_only=False)["module"])
        scorers = {k: modellib.Scorer(mode="eval", autocast_dtype=None, patch_dropout=d,
                                      resolution=px, seed=0) for k, d, px in settings}
        scores: dict[str, np.ndarray] = {}
        secs: dict[str, list[float]] = {k: [] for k, _, _ in settings}
        for _ in range(a.repeats):  # alternating: every setting once per round
            for k, _, _ in settings:
                scores[k], t = _scores(model, scorers[k], images, texts)
                secs[k].append(t)
        ref, ref_top = scores["full"], _top(scores["full"])
        for k, d, px in settings:
            s, top = scores[k], _top(scores[k])
            row = {"epoch": epoch, "setting": k, "patch_dropout": d, "resolution": px,
                   "flops_per_pair": flops[k], "flops_share": flops[k] / flops["full"],
                   "vitb32_resolution": _vitb32_resolution(px) or 224,
                   "vitb32_flops_per_pair": flops_b[k],
                   "vitb32_flops_share": flops_b[k] / flops_b["full"],
                   "wall_per_pair_s": float(np.median(secs[k])) / 500,
                   "wall_share": float(np.median(secs[k]) / np.median(secs["full"])),
                   "spearman": _spearman(s, ref), "top_overlap": float((top & ref_top).sum()
                                                                        / ref_top.sum()),
                   "noisy_dropped": float((noisy & ~top).sum() / noisy.sum()),
                   "auroc_clean_vs_noisy": auroc(s, ~noisy)}
            rows.append(row)
            print(f"[cheap] epoch {epoch} {k}: FLOPs {row['flops_share']:.3f} (ViT-B-32 "
                  f"at {row['vitb32_resolution']} px {row['vitb32_flops_share']:.3f}), wall "
                  f"{row['wall_share']:.3f} "
                  f"of full cost; ρ {row['spearman']:.3f}, top-30% overlap "
                  f"{row['top_overlap']:.3f}, noisy dropped {row['noisy_dropped']:.3f}, "
                  f"AUROC {row['auroc_clean_vs_noisy']:.3f}", flush=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    common.write_json(Path(a.out), {"machine": common.machine_line(), "rows": rows}, indent=1,
                      strict=True)
    print(f"[cheap] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
