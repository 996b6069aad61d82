"""Do pairs with δ > 0 have smaller per-sample gradient norms than pairs with δ < 0? The
DISSect paper motivates training on the top δ = hist − curr by a gradient offset between
the two; measured here on the memorise data under full-data training.

    python benchmarks/gradient_offset.py                      # 3 seeds, epochs 4 16 32 64
    python benchmarks/gradient_offset.py --seeds 0 --epochs 8 64

Per seed: one `full` run of the memorise config (launch/configs/tiny-cpu.yaml: 500
Fashion-MNIST pairs, 40% swapped captions, 64 epochs) through the real trainer on 2 CPU
ranks, every batch scored (train.diagnose_scores) and recorded (train.record_samples),
a checkpoint every 4 epochs. At the checkpoint after epoch e:
  hist  dissect_momentum's history of each pair, rebuilt from the scores recorded in
        epochs 0..e (β of the config; the first sighting records curr; float64, where the
        store keeps fp16 with stochastic rounding)
  curr  the checkpoint model's score of the pair (eval mode, as the scoring pass)
  δ     hist − curr: the key dissect_momentum ranks by at the first step of epoch e + 1
  |g|   the norm of the gradient, over all parameters, of the pair's symmetric InfoNCE
        within a batch of 64 pairs (the run's global batch; batches drawn at random)
Printed and saved (results/gradient_offset.json, results/gradient_offset.png): per epoch
and seed, the mean and median |g| of the pairs with δ > 0 and δ < 0 (all, clean, noisy),
their ratio, and Spearman's ρ between δ and |g|.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/gradient_offset.py
    import common  # type: ignore[no-redef]

from dissect_dist import model as modellib
from dissect_dist.config import load_config
from dissect_dist.data import Manifest
from dissect_dist.data.builders import build_fashion_mnist
from dissect_dist.data.loader import ShardReader, decode_sample

CONFIG = common.REPO / "launch" / "configs" / "tiny-cpu.yaml"
STEPS_PER_EPOCH = 7  # 500 pairs / (2 ranks x 32)
BATCH = 64


def _run(data: Path, run_dir: Path, seed: int) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    common.launch([f"data.train_manifest={data}/train/manifest.json",
                   f"data.noise_ledger={data}/train/noise_ledger.npy",
                   f"data.zeroshot_dir={data}", "selection.strategy=full",
                   "train.diagnose_scores=true", "train.record_samples=true",
                   f"train.checkpoint_every={4 * STEPS_PER_EPOCH}", "train.keep_checkpoints=16",
                   f"train.seed={seed}", f"train.run_dir={run_dir}"],
                  what=f"gradient_offset full seed {seed}", config=CONFIG,
                  log=run_dir / "launch.log")


def _history(run_dir: Path, n: int, beta: float, last_epoch: int) -> np.ndarray:
    """dissect_momentum's history after epochs 0..last_epoch, from the recorded scores."""
    rows = []
    for r in (0, 1):
        rows += [json.loads(x) for x in (run_dir / f"samples-rank{r}.jsonl").read_text()
                 .splitlines()]
    rows.sort(key=lambda x: (x["step"], x["rank"] if "rank" in x else 0))
    hist = np.full(n, np.nan)
    for x in rows:
        if x["epoch"] > last_epoch:
            break
        ids, curr = np.asarray(x["ids"], dtype=np.int64), np.asarray(x["curr"], dtype=float)
        h = hist[ids]
        hist[ids] = np.where(np.isnan(h), curr, beta * h + (1 - beta) * curr)
    return hist


def _pairs(data: Path, pre: Any, tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = Manifest.load(str(data / "train" / "manifest.json"))
    reader = ShardReader(manifest)
    images, caps = [], []
    for s, count in enumerate(manifest.counts.tolist()):
        for p in range(count):
            got = decode_sample(reader.read(s, p)[1], pre)
            assert not isinstance(got, str), got
            images.append(got[0])
            caps.append(got[1])
    reader.close()
    return torch.stack(images), tok(caps)


def _measure(model: Any, images: torch.Tensor, texts: torch.Tensor, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(curr, |g|) of every pair at this model."""
    n = images.shape[0]
    model.eval()
    with torch.no_grad():
        fi, ft = modellib.encode(model, images, texts)
        curr = modellib.clipscore(fi, ft).numpy().astype(float)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = np.zeros(n)
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n, BATCH):
        ids = torch.as_tensor(order[start:start + BATCH])
        img, txt = modellib.encode(model, images[ids], texts[ids])
        logits = model.logit_scale.exp() * img @ txt.t()
        labels = torch.arange(ids.numel())
        loss = (F.cross_entropy(logits, labels, reduction="none")
                + F.cross_entropy(logits.t(), labels, reduction="none")) / 2
        for j in range(ids.numel()):
            grads = torch.autograd.grad(loss[j], params, retain_graph=j < ids.numel() - 1,
                                        allow_unused=True)
            norms[int(ids[j])] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads
                                                      if g is not None)))
    return curr, norms


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _split(norms: np.ndarray, delta: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    pos, neg = norms[mask & (delta > 0)], norms[mask & (delta < 0)]
    out: dict[str, Any] = {"n_pos": int(pos.size), "n_neg": int(neg.size)}
    if pos.size and neg.size:
        out.update(mean_pos=float(pos.mean()), mean_neg=float(neg.mean()),
                   median_pos=float(np.median(pos)), median_neg=float(np.median(neg)),
                   ratio_mean=float(pos.mean() / neg.mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=[4, 16, 32, 64],
                   help="checkpoints to measure at (multiples of 4, at most 64)")
    p.add_argument("--data", default=str(common.REPO / "data" / "nc" / "fmnist-500-noise0.4"))
    p.add_argument("--runs", default=str(common.REPO / "runs" / "gradient_offset"))
    p.add_argument("--out", default=str(common.RESULTS / "gradient_offset.json"))
    a = p.parse_args(argv)
    if any(e % 4 or not 4 <= e <= 64 for e in a.epochs):
        p.error(f"--epochs {a.epochs}: multiples of 4 from 4 to 64 (the run checkpoints "
                "every 4 epochs)")
    data = Path(a.data)
    if not (data / "train" / "noise_ledger.npy").exists():
        build_fashion_mnist(str(data), noise=0.4, subset=500, seed=0)
    cfg = load_config(str(CONFIG), [])
    noisy = np.zeros(500, dtype=bool)
    noisy[np.load(data / "train" / "noise_ledger.npy")] = True
    model, _, pre, tok = modellib.create(cfg.model.name, None)
    images, texts = _pairs(data, pre, tok)
    results: list[dict[str, Any]] = []
    for seed in a.seeds:
        run_dir = Path(a.runs) / f"seed{seed}"
        print(f"[grad] seed {seed}: full run with checkpoints every 4 epochs ...", flush=True)
        _run(data, run_dir, seed)
        for e in a.epochs:
            tag = run_dir / "checkpoints" / f"step-{e * STEPS_PER_EPOCH:09d}"
            state = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
            model.load_state_dict(state["module"])
            curr, norms = _measure(model, images, texts, seed)
            delta = _history(run_dir, 500, cfg.selection.beta, e - 1) - curr
            row = {"seed": seed, "epoch": e, "spearman_delta_gradnorm": _spearman(delta, norms),
                   "all": _split(norms, delta, np.ones(500, bool)),
                   "clean": _split(norms, delta, ~noisy), "noisy": _split(norms, delta, noisy),
                   "mean_gradnorm_clean": float(norms[~noisy].mean()),
                   "mean_gradnorm_noisy": float(norms[noisy].mean())}
            results.append(row)
            al = row["all"]
            print(f"[grad] seed {seed} epoch {e}: |g| mean δ>0 {al.get('mean_pos', float('nan')):.3f} "
                  f"(n {al['n_pos']}) vs δ<0 {al.get('mean_neg', float('nan')):.3f} "
                  f"(n {al['n_neg']}), ratio {al.get('ratio_mean', float('nan')):.3f}; "
                  f"ρ(δ, |g|) {row['spearman_delta_gradnorm']:+.3f}; clean {row['clean'].get('ratio_mean', float('nan')):.3f}, "
                  f"noisy {row['noisy'].get('ratio_mean', float('nan')):.3f}", flush=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    out = Path(a.out)
    common.write_json(out, {"machine": common.machine_line(), "rows": results}, indent=1,
                      strict=False)
    _plot(results, out.with_suffix(".png"))
    print(f"[grad] wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        ep = [r["epoch"] for r in rs]
        for part, ls in (("all", "-"), ("clean", "--"), ("noisy", ":")):
            axes[0].plot(ep, [r[part].get("ratio_mean", np.nan) for r in rs], ls,
                         label=f"seed {seed} {part}")
        axes[1].plot(ep, [r["spearman_delta_gradnorm"] for r in rs], "o-", label=f"seed {seed}")
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set(xlabel="epoch", ylabel="mean |g| of δ>0 / of δ<0",
                title="per-sample gradient norm, δ > 0 vs δ < 0")
    axes[1].axhline(0.0, color="k", lw=0.5)
    axes[1].set(xlabel="epoch", ylabel="Spearman ρ(δ, |g|)", title="δ against |g|")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
