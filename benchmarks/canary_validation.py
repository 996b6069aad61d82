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
    a = p.parse_args()
    reg = nc_runner.REGIMES[a.regime]
    sized: tuple[tuple[str, Any], ...] = ()
    if a.subset or a.epochs:
        reg = dataclasses.replace(reg, subset=a.subset or reg.subset,
                                  epochs=a.epochs or reg.epochs)
        spe = reg.steps_per_epoch
        sized = (("train.epochs", reg.epochs), ("train.log_every", max(1, spe // 4)),
                 ("train.eval_every", spe))
    root = common.REPO / "runs" / "canary_validation"
    data = nc_runner.dataset(reg, a.noise, common.REPO / "data" / "nc")
    noisy_share = float(np.load(data / "train" / "noise_ledger.npy").size) / json.loads(
        (data / "train" / "manifest.json").read_text())["total"]
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
    name = a.regime + (f"_{reg.subset}" if a.subset else "")
    out = Path(a.out) if a.out else common.RESULTS / f"canary_validation_{name}.json"
    common.write_json(out, {"regime": a.regime, "subset": reg.subset, "epochs": reg.epochs,
                            "canaries": a.canaries, "noise": a.noise,
                            "noisy_share": noisy_share, "runs": results,
                            "machine": common.machine_info(), "code": common.code_version()})

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    print("\n| strategy | seed | canary kept ratio | ledger kept ratio | AUROC canary (mean) | "
          "AUROC ledger (mean) | mean abs diff | correlation |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['strategy']} | {r['seed']} | {fmt(r['canary_kept_ratio'])} | "
              f"{fmt(r['ledger_kept_ratio'])} | {fmt(r['auroc_canary_mean'])} | "
              f"{fmt(r['auroc_ledger_mean'])} | {fmt(r['auroc_mean_abs_diff'])} | "
              f"{fmt(r['auroc_correlation'])} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
