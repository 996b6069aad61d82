"""python -m dissect_dist.report RUN_DIR [--out report.png]  (installed as `dissect-report`)

One picture and five lines for a run, finished or in progress: the training loss, the kept
fraction, what the noise ledger says about the kept rows (when the run has one), the
evaluation curves, and where a step's time goes. Reads RUN_DIR/metrics.jsonl only (a line
being written while it reads is skipped), so it is safe to run while training."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from store.cli import Parser, fail

PHASES = ("input", "score", "wait", "select", "fwd_bwd", "optim")
EVAL_PREFERRED = ("zeroshot_acc", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5")


class ReportError(Exception):
    pass


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ReportError(f"{path} does not exist: RUN_DIR is the run's train.run_dir "
                          "(metrics.jsonl appears after the first logged step)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line the trainer is writing now
            continue
    if not any(r.get("kind") == "train" for r in rows):
        raise ReportError(f"{path} holds no training row yet (train.log_every steps "
                          "after the start)")
    return rows


def _series(rows: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows
           if r.get("kind") == kind and isinstance(r.get(key), (int, float))
           and math.isfinite(float(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _eval_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in rows if r.get("kind") == "eval" for k, v in r.items()
            if isinstance(v, (int, float)) and k not in ("step", "eval_s")}
    return [k for k in EVAL_PREFERRED if k in keys] + sorted(keys - set(EVAL_PREFERRED))


def phase_ms(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median ms per step phase over the logged windows after the first (warm-up)."""
    train = [r for r in rows if r.get("kind") == "train"]
    steady = train[1:] or train
    out = {}
    for p in PHASES:
        vals = [float(r[f"time_{p}_ms"]) for r in steady if f"time_{p}_ms" in r]
        if vals:
            out[p] = statistics.median(vals)
    return out


def summary(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    train = [r for r in rows if r.get("kind") == "train"]
    last = train[-1]
    # The trainer exports the model once the last step is done.
    state = "finished" if (run_dir / "open_clip_model.pt").exists() \
        else "in progress (or stopped before its end)"
    lines = [f"{run_dir}: step {last['step']}, epoch {last.get('epoch', '?')}, "
             f"{last.get('samples_seen', 0):,} samples seen, "
             f"{last.get('trained_total', 0):,} trained; {state}"]
    lines.append(f"loss {train[0]['loss']:.4f} -> {last['loss']:.4f}; kept fraction "
                 f"{last.get('kept_fraction', float('nan')):.3f}; lr {last.get('lr', 0):.3g}")
    tail = train[len(train) // 2:]
    sps = statistics.mean(float(r.get("samples_per_s", 0.0)) for r in tail)
    tps = statistics.mean(float(r.get("trained_per_s", 0.0)) for r in tail)
    split = phase_ms(rows)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items()) if split else \
        "no split (train.time_breakdown=false)"
    spent = ""
    if "flops_total" in last:  # the compute ledger (dissect_dist/compute.py)
        total = max(float(last["flops_total"]), 1e-30)
        spent = (f"; spent {total:.3e} FLOPs (scoring "
                 f"{float(last.get('flops_score_total', 0)) / total:.0%}, reference "
                 f"{float(last.get('flops_reference_total', 0)) / total:.0%}) in "
                 f"{float(last.get('wall_s_total', 0)):,.0f} s")
    lines.append(f"throughput {sps:,.0f} samples/s seen, {tps:,.0f} trained/s; step ms: "
                 f"{parts}{spent}")
    if any("canary_share" in r for r in train):
        half = train[len(train) // 2:]
        share = statistics.mean(float(r["canary_share"]) for r in half)
        kept = statistics.mean(float(r["canary_kept_share"]) for r in half)
        _, cau = _series(rows, "epoch", "key_auroc_rest_vs_canary")
        au = f", ranking-key AUROC rest vs canaries {cau[-1]:.3f}" if cau else ""
        ledger = ""
        if any("kept_precision" in r for r in train):
            _, prec = _series(rows, "train", "kept_precision")
            ledger = f"; ledger: clean share of kept {statistics.mean(prec[len(prec) // 2:]):.3f}"
        lines.append(f"selection (canaries): {kept:.4f} of kept rows vs {share:.4f} of rows "
                     f"seen over the second half{au}{ledger}")
    elif any("kept_precision" in r for r in train):
        _, prec = _series(rows, "train", "kept_precision")
        _, auroc = _series(rows, "epoch", "key_auroc_clean_vs_noisy")
        au = f", ranking-key AUROC clean vs noisy {auroc[-1]:.3f} (0.5 = chance)" \
            if auroc else ""
        lines.append(f"selection (noise ledger): clean share of kept rows "
                     f"{statistics.mean(prec[len(prec) // 2:]):.3f} over the second half{au}")
    else:
        lines.append("selection: no noise ledger and no canaries in this run, nothing says "
                     "which kept rows are clean (selection.canaries: 0.005)")
    keys = _eval_keys(rows)
    if keys:
        steps, vals = _series(rows, "eval", keys[0])
        best = max(range(len(vals)), key=vals.__getitem__)
        lines.append(f"eval {keys[0]}: last {vals[-1]:.4f} (step {steps[-1]}), best "
                     f"{vals[best]:.4f} (step {steps[best]})")
    else:
        lines.append("eval: no evaluation row yet (train.eval_every)")
    return lines


def plot(run_dir: Path, rows: list[dict[str, Any]], out: Path) -> Path:
    try:
        import matplotlib
    except ImportError as e:
        raise ReportError("the report draws with matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    (a_loss, a_kept, a_sel), (a_eval, a_time, a_rate) = ax
    a_loss.plot(*_series(rows, "train", "loss"))
    a_loss.set(title="training loss", xlabel="step")
    a_kept.plot(*_series(rows, "train", "kept_fraction"))
    a_kept.set(title="kept fraction", xlabel="step", ylim=(0, 1.05))
    s, v = _series(rows, "train", "kept_precision")
    cs, cv = _series(rows, "train", "canary_kept_share")
    if cs:
        _, seen = _series(rows, "train", "canary_share")
        a_sel.plot(cs, [k / max(x, 1e-12) for k, x in zip(cv, seen)],
                   label="canaries kept / their share (1 = chance)")
        ces, cev = _series(rows, "epoch", "key_auroc_rest_vs_canary")
        if ces:
            a_sel.plot(ces, cev, "s-", label="ranking-key AUROC, canaries (epoch)")
    if s:
        a_sel.plot(s, v, label="clean share of kept rows")
        es, ev = _series(rows, "epoch", "key_auroc_clean_vs_noisy")
        if es:
            a_sel.plot(es, ev, "o-", label="ranking-key AUROC (epoch)")
    if s or cs:
        a_sel.axhline(0.5, color="grey", lw=0.5)
        a_sel.legend(fontsize=8)
        a_sel.set(title="selection: noise ledger and canaries", xlabel="step")
    else:
        a_sel.text(0.5, 0.5, "no noise ledger and no canaries (selection.canaries)",
                   ha="center", va="center")
        a_sel.set(title="selection: noise ledger and canaries", xticks=[], yticks=[])
    keys = _eval_keys(rows)
    for k in keys[:4]:
        a_eval.plot(*_series(rows, "eval", k), "o-", label=k)
    if keys:
        a_eval.legend(fontsize=8)
    else:
        a_eval.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")
    a_eval.set(title="evaluation", xlabel="step")
    split = phase_ms(rows)
    if split:
        a_time.bar(list(split), list(split.values()))
    else:
        a_time.text(0.5, 0.5, "train.time_breakdown=false", ha="center", va="center")
    a_time.set(title="step time by phase (median ms)")
    a_rate.plot(*_series(rows, "train", "samples_per_s"), label="seen")
    a_rate.plot(*_series(rows, "train", "trained_per_s"), label="trained")
    a_rate.legend(fontsize=8)
    a_rate.set(title="samples / s", xlabel="step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m dissect_dist.report", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run's directory (train.run_dir)")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/report.png)")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    try:
        rows = read_rows(run_dir)
        out = plot(run_dir, rows, Path(a.out) if a.out else run_dir / "report.png")
    except ReportError as e:
        return fail(p.prog, str(e))
    print("\n".join(summary(run_dir, rows)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
