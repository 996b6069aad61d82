"""Selection quality under noisy correspondence: DISSect against its baselines on real data
with a known fraction of swapped captions, in two regimes.

    python benchmarks/noisy_correspondence.py                 # the full grid (resumable)
    python benchmarks/noisy_correspondence.py --quick         # a <= 5 min smoke run
    python benchmarks/noisy_correspondence.py --regime memorise --budget-min 60
    python benchmarks/noisy_correspondence.py --report        # tables + plots from the JSON

Every run goes through the real trainer (`deepspeed launch/train.py`, 2 CPU ranks, global
ranking unless the row says local) with the same number of steps, so a selection run
trains on r x the samples of the full-data run (in the pool regimes: on as many). Finished runs are kept in the results
JSON (written after every run) and skipped on re-run, so the grid can be completed over
several invocations; `--budget-min` stops starting new runs after that many minutes.
Runs are ordered so that a partial grid is useful: the main table's first seed in every
regime, then the other seeds, then the sweeps.

Regimes (trainer settings in launch/configs/, grids in benchmarks/nc_runner.py;
benchmarks/README.md says how they were chosen and sized):
  early     Fashion-MNIST, many pairs, few epochs: the model is still learning the clean
            majority when training ends (the regime of the first pilot). nc-early.yaml
  memorise  Fashion-MNIST, few pairs, many epochs, a constant learning rate: full-data
            training fits the noisy pairs and held-out accuracy peaks, then falls.
            tiny-cpu.yaml, the demo's config
  icons     (not in the default grid: `--regime icons`) the icon fonts' glyphs captioned
            with their own names, so every caption is unique, as web captions nearly are;
            few pairs, many epochs. Exploratory: one seed, full / random / DISSect.
            nc-icons.yaml
  quick     (`--quick`) the smoke run of the test suite. nc-quick.yaml
  pool      (`--regime pool`) memorise's data and settings, but every strategy trains as
            many rows per step as full: a selection run loads and scores a pool of B / r
            per rank and trains B of it (the paper's design). tiny-cpu.yaml
  icons-pool  (`--regime icons-pool`) the same design on all 16,034 icons, 20 epochs, 2
            seeds of full / random / dissect_warmup / dissect_momentum. nc-icons-pool.yaml
  pool-quick  the test suite's smoke run of the pool design. nc-quick.yaml
  compute   (`--regime compute`) memorise's data and settings at equal compute: every run
            trains until it has spent the FLOPs of the full-data run (train.max_flops),
            3 seeds of full / random / clipscore / dissect_momentum / dissect_warmup /
            learnability / reference_filter (a reference model trained on 50 clean
            held-out pairs, its training and scoring paid from the budget) / oracle (the
            ledger's clean pairs at no cost: the ceiling). tiny-cpu.yaml
  icons-compute  (`--regime icons-compute`) the same on icons' 2000-icon data (the reference
            model: the next 200 icons in font order under their own names). nc-icons.yaml
Fashion-MNIST runs are scored by zero-shot accuracy on the clean 10k test split, icon runs
by image<->text retrieval R@1 on the held-out icons (mean of both directions).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__:
    from benchmarks import common, nc_compute, nc_report, nc_runner
else:  # run as a file: python benchmarks/noisy_correspondence.py
    import common  # type: ignore[no-redef]
    import nc_compute  # type: ignore[no-redef]
    import nc_report  # type: ignore[no-redef]
    import nc_runner  # type: ignore[no-redef]

REGIMES = nc_runner.REGIMES


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--data", default=str(common.REPO / "data" / "nc"),
                   help="where the datasets are built (once) and read")
    p.add_argument("--runs", default=str(common.REPO / "runs" / "nc"),
                   help="the runs' directories (metrics.jsonl and launch log are kept)")
    a = p.parse_args(argv)
    names = ["quick"] if a.quick else (a.regime or ["early", "memorise"])
    out = Path(a.out or common.RESULTS / f"noisy_correspondence{'_quick' if a.quick else ''}.json")
    res = nc_runner.load_results(out)
    if a.refresh:
        n = 0
        for key, r in res["runs"].items():
            metrics = Path(a.runs) / key.replace("/", "__")
            if r["regime"] in REGIMES and (metrics / "metrics.jsonl").exists():
                r.update(nc_runner.summarise(common.read_metrics(metrics), REGIMES[r["regime"]],
                                             r["strategy"], r["ratio"]))
                n += 1
        nc_runner.save_results(out, res)
        print(f"[nc] refreshed {n} of {len(res['runs'])} runs from {a.runs}")
    if not a.report:
        run_grid(res, names, out, Path(a.data), Path(a.runs), a.budget_min)
    prefix = out.with_suffix("")
    nc_report.report(res, [n for n in names if not REGIMES[n].equal_compute], prefix)
    for n in names:
        if REGIMES[n].equal_compute:
            nc_compute.report(res, n, prefix)
    return 0


def run_grid(res: dict, names: list[str], out: Path, data_root: Path, runs_root: Path,
             budget_min: float | None) -> None:
    """Train the regimes' runs that `res` has not finished, saving `res` after each."""
    todo = nc_runner.interleave([nc_runner.grid(REGIMES[n]) for n in names])
    done = [r for r in todo if r.key in res["runs"]]
    todo = [r for r in todo if r.key not in res["runs"]]
    print(f"[nc] {len(done)} finished runs kept from {out}; {len(todo)} to run", flush=True)
    t_start = time.perf_counter()
    for i, run in enumerate(todo):
        spent = (time.perf_counter() - t_start) / 60
        if budget_min is not None and spent >= budget_min:
            print(f"[nc] budget of {budget_min:g} min spent: {len(todo) - i} runs left "
                  "for the next invocation", flush=True)
            break
        reg = REGIMES[run.regime]
        data = nc_runner.dataset(reg, run.noise, data_root)
        print(f"[nc] ({i + 1}/{len(todo)}, {spent:.1f} min) {run.key} ...", flush=True)
        r = nc_runner.train(reg, run, data, runs_root, data_root)
        res["runs"][run.key] = r
        meta = res.setdefault("meta", {"regimes": {}})
        meta["regimes"].update({n: dataclasses.asdict(REGIMES[n]) for n in names})
        meta.update(ranks=nc_runner.RANKS, machine=common.machine_line())
        nc_runner.save_results(out, res)
        print(f"[nc]   final {r['final']:.3f} best {r['best']:.3f} kept precision "
              f"{common.mean_logged(r['kept_precision']):.3f} trained {r['trained_samples']} "
              f"wall {r['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
