"""Do canaries tell what the noise ledger tells? (selection.canaries, dissect_dist/canaries.py)

On data with a ledger of its noisy pairs, runs with canaries on and compares, per run, what
the canaries say about the selection with what the ledger says:

- kept ratio: canaries among the kept rows over their share of the rows seen
  (canary_kept_share / canary_share), against the same for the ledger's noisy pairs
  ((1 - kept_precision) / noisy share of the data); 1.0 = kept as often as chance, < 1 =
  the selection avoids them; means over the second half of the run's log windows;
- ranking: per epoch, the AUROC of the ranking key for the rest against the canaries
  (key_auroc_rest_vs_canary) and for clean against noisy pairs (key_auroc_clean_vs_noisy):
  their mean absolute difference and correlation over the epochs.

    python benchmarks/canary_validation.py                       # memorise, 3 seeds
    python benchmarks/canary_validation.py --regime icons --seeds 0
    python benchmarks/canary_validation.py --regime early --subset 60000 --epochs 3 \
        --canaries 0.005 --strategies clipscore                  # the default share, at size

--subset and --epochs change the regime's data size and run length (log windows become a
quarter epoch, evaluation once per epoch): at the default share 0.005 a data set needs
tens of thousands of pairs before canaries are more than a handful.

Runs through benchmarks/nc_runner.py (the regimes of noisy_correspondence.py), one at a
time; writes benchmarks/results/canary_validation_<regime>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

if __package__:
    from benchmarks import common, nc_runner
else:  # run as a file
    import common  # type: ignore[no-redef]
    import nc_runner  # type: ignore[no-redef]


def compare(rows: list[dict[str, Any]], noisy_share: float) -> dict[str, Any]:
    train = [r for r in rows if r["kind"] == "train"]
    half = train[len(train) // 2:]
    canary_ratio = [r["canary_kept_share"] / r["canary_share"] for r in half
                    if r.get("canary_share")]
    ledger_ratio = [(1 - r["kept_precision"]) / noisy_share for r in half
                    if "kept_precision" in r]
    epochs = [r for r in rows if r["kind"] == "epoch" and "key_auroc_rest_vs_canary" in r
              and "key_auroc_clean_vs_noisy" in r]
    c = np.array([r["key_auroc_rest_vs_canary"] for r in epochs])
    n = np.array([r["key_auroc_clean_vs_noisy"] for r in epochs])
    out: dict[str, Any] = {
        "canary_kept_ratio": statistics.mean(canary_ratio) if canary_ratio else None,
        "ledger_kept_ratio": statistics.mean(ledger_ratio) if ledger_ratio else None,
        "canary_share": statistics.mean(r["canary_share"] for r in train),
        "epochs_with_auroc": len(epochs),
        "auroc_canary_mean": float(c.mean()) if c.size else None,
        "auroc_ledger_mean": float(n.mean()) if n.size else None,
        "auroc_mean_abs_diff": float(np.abs(c - n).mean()) if c.size else None,
        "auroc_correlation": float(np.corrcoef(c, n)[0, 1]) if c.size > 2 else None,
        "auroc_canary": c.tolist(), "auroc_ledger": n.tolist(),
    }
    return out


def predicted(auroc_ledger: float | None, kept_ledger: float | None, noisy_share: float,
              matched: float) -> dict[str, float | None]:
    """What the ledger's figures predict for canaries, if a canary that is still mismatched
    after its swap is treated like a noisy pair of the ledger and one whose new caption still
    describes its image (share `matched`) like a clean pair. The canaries' AUROC is against
    *the rest*, which holds the data's noisy pairs too (share n), so it is compressed toward
    0.5: A_c = 0.5 + (A - 0.5)(1 - n - q), A = the ledger's AUROC, q = matched. The kept ratio
    mixes the ledger's noisy (R_n) and clean ((1 - n R_n) / (1 - n)) kept ratios."""
    n, q = noisy_share, matched
    return {
        "predicted_auroc_canary": None if auroc_ledger is None
        else 0.5 + (auroc_ledger - 0.5) * (1 - n - q),
        "predicted_canary_kept_ratio": None if kept_ledger is None
        else (1 - q) * kept_ledger + q * (1 - n * kept_ledger) / (1 - n),
    }


def fashion_matched_share(data: Path, share: float, seed: int, batch: int,
                          swaps: int = 4000) -> float:
    """The share of canaries whose new caption still names their image's class, on a
    Fashion-MNIST data set (captions are one of 8 templates x 10 classes, so a partner's
    caption can name the same class): the trainer's own swap (canaries.swap_captions) over
    random orders of the training set cut into rank batches of `batch`, until at least
    `swaps` canaries were swapped."""
    import torch

    from dissect_dist.canaries import is_canary, swap_captions
    from dissect_dist.data import builders
    from dissect_dist.data.loader import ShardReader
    from dissect_dist.data.manifest import Manifest

    caption_class = {t.format(c): i for i, c in enumerate(builders.FASHION_CLASSES)
                     for t in builders.FASHION_TEMPLATES}
    codes = {c: i for i, c in enumerate(caption_class)}
    labels = builders._read_idx(Path(builders.FASHION_MNIST_DIR)
                                / "train-labels-idx1-ubyte.gz").astype(np.int64)
    reader = ShardReader(Manifest.load(str(data / "train" / "manifest.json")))
    code: list[int] = []  # per sample id: its caption's code
    img: list[int] = []  # and its image's class
    for shard, count in enumerate(reader.manifest.counts.tolist()):
        for pos in range(count):
            members = reader.read(shard, pos)[1]
            if isinstance(members, str):  # the reader's reason
                raise ValueError(f"{reader.manifest.urls[shard]} sample {pos}: {members}")
            code.append(codes[members["txt"].decode()])
            img.append(int(labels[json.loads(members["json"])["source_index"]]))
    ids = np.arange(len(code))
    code_a, img_a = np.array(code), np.array(img)
    cls_of_code = np.array(list(caption_class.values()))
    canary = is_canary(ids, share, seed)
    rng = np.random.default_rng(seed)
    got_n = matched_n = 0
    while got_n < swaps:
        order = rng.permutation(ids.size)
        for lo in range(0, order.size - batch + 1, batch):
            b = order[lo:lo + batch]
            texts = torch.from_numpy(code_a[b]).unsqueeze(1)
            out, got = swap_captions(texts, canary[b])
            rows = np.flatnonzero(got)
            got_n += rows.size
            matched_n += int((cls_of_code[out[rows, 0].numpy()] == img_a[b][rows]).sum())
        if not got_n:
            raise ValueError(f"no canary at share {share} among {ids.size} samples")
    return matched_n / got_n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", default="memorise",
                   choices=["memorise", "icons", "quick", "early"])
    p.add_argument("--subset", type=int, default=None,
                   help="pairs of the data set (default: the regime's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of each run (default: the regime's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=["dissect_momentum", "random"])
    p.add_argument("--canaries", type=float, default=0.05,
                   help="share of samples made canaries (the runs have few samples: 0.05 of "
                   "memorise's 500 pairs is 25 canaries)")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--out", default=None)
    p.add_argument("--report", action="store_true",
                   help="train nothing: add the ledger's predictions to the results file "
                   "(--out, or the regime's) and print its table")
    a = p.parse_args()
    reg = nc_runner.REGIMES[a.regime]
    sized: tuple[tuple[str, Any], ...] = ()
    if a.subset or a.epochs:
        reg = dataclasses.replace(reg, subset=a.subset or reg.subset,
                                  epochs=a.epochs or reg.epochs)
        spe = reg.steps_per_epoch
        sized = (("train.epochs", reg.epochs), ("train.log_every", max(1, spe // 4)),
                 ("train.eval_every", spe))
    name = a.regime + (f"_{reg.subset}" if a.subset else "")
    out = Path(a.out) if a.out else common.RESULTS / f"canary_validation_{name}.json"
    root = common.REPO / "runs" / "canary_validation"
    data = nc_runner.dataset(reg, a.noise, common.REPO / "data" / "nc")
    noisy_share = float(np.load(data / "train" / "noise_ledger.npy").size) / json.loads(
        (data / "train" / "manifest.json").read_text())["total"]
    if a.report:
        saved = json.loads(out.read_text())
        add_predictions(saved["runs"], reg, data, saved["canaries"], noisy_share)
        common.write_json(out, saved)
        print_table(saved["runs"])
        print(f"wrote {out}")
        return
    results = []
    for seed in a.seeds:  # seeds outer, strategies inner: drift hits every strategy alike
        for strategy in a.strategies:
            run = nc_runner.Run(regime=reg.name, label=f"{strategy}+canaries", strategy=strategy,
                                noise=a.noise, ratio=reg.ratio, seed=seed,
                                extra=(("selection.canaries", a.canaries), *sized))
            run_dir = root / run.dir_name
            r = common.launch(nc_runner.overrides(reg, run, data, run_dir), what=run.key,
                              ranks=nc_runner.RANKS, config=reg.config,
                              log=run_dir / "launch.log")
            res = {"strategy": strategy, "seed": seed, "wall_s": r.wall_s,
                   **compare(common.read_metrics(run_dir), noisy_share)}
            results.append(res)
            print(json.dumps({k: v for k, v in res.items()
                              if k not in ("auroc_canary", "auroc_ledger")}), flush=True)
    add_predictions(results, reg, data, a.canaries, noisy_share)
    common.write_json(out, {"regime": a.regime, "subset": reg.subset, "epochs": reg.epochs,
                            "canaries": a.canaries, "noise": a.noise,
                            "noisy_share": noisy_share, "runs": results,
                            "machine": common.machine_info(), "code": common.code_version()})
    print_table(results)
    print(f"wrote {out}")


def add_predictions(results: list[dict[str, Any]], reg: Any, data: Path, share: float,
                    noisy_share: float) -> None:
    """Each run's `matched` share and what the ledger predicts. Fashion-MNIST only: on icons
    every caption names one icon, so a swapped caption describes its image only when the
    partner is a noisy pair that carries this icon's name (about 1 in 1800): taken as 0."""
    matched: dict[int, float] = {}
    for r in results:
        if reg.data == "fmnist" and r["seed"] not in matched:
            matched[r["seed"]] = fashion_matched_share(data, share, r["seed"], reg.batch_per_rank)
        r["matched_share"] = matched.get(r["seed"], 0.0)
        r.update(predicted(r["auroc_ledger_mean"], r["ledger_kept_ratio"], noisy_share,
                           r["matched_share"]))


def print_table(results: list[dict[str, Any]]) -> None:
    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    print("\n| strategy | seed | canary kept ratio | ledger kept ratio | predicted from the "
          "ledger | AUROC canary (mean) | AUROC ledger (mean) | predicted from the ledger | "
          "matched share | mean abs diff | correlation |\n|" + "---|" * 11)
    for r in results:
        print(f"| {r['strategy']} | {r['seed']} | {fmt(r['canary_kept_ratio'])} | "
              f"{fmt(r['ledger_kept_ratio'])} | {fmt(r['predicted_canary_kept_ratio'])} | "
              f"{fmt(r['auroc_canary_mean'])} | {fmt(r['auroc_ledger_mean'])} | "
              f"{fmt(r['predicted_auroc_canary'])} | {fmt(r['matched_share'])} | "
              f"{fmt(r['auroc_mean_abs_diff'])} | {fmt(r['auroc_correlation'])} |")


if __name__ == "__main__":
    main()
