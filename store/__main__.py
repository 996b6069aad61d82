"""python -m store {inspect,export} URL ...: look into committed score-store snapshots.

    python -m store inspect s3://bucket/run/scores
    python -m store export  ./run/scores --out kept/ --top-fraction 0.3
    python -m store export  ./run/scores --out kept/ --threshold 25
    python -m store export  ./run/scores --out kept/ --by delta --baseline-step 2000 \
                            --top-fraction 0.3

export writes scores.npy (N,) float16 (NaN = never scored), kept_ids.npy (int64,
ascending), and with --by delta also delta.npy = baseline - scores (float32), the
DISSect differential between two snapshots; never-scored samples are never kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from store.cli import Parser, fail
from store.persist import CommitRecord, SnapshotError, SnapshotLocation


def _load_all(loc: SnapshotLocation, step: int | None) -> tuple[CommitRecord, np.ndarray]:
    record = loc.read_commit(step)
    return record, loc.read_all(record)


def _summary(values: np.ndarray) -> dict[str, Any]:
    v = values[~np.isnan(values)].astype(np.float32)
    out: dict[str, Any] = {"scored": int(v.size), "fraction_scored": v.size / max(values.size, 1)}
    if v.size:
        q = np.quantile(v, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
        out.update(mean=float(v.mean()), std=float(v.std()),
                   quantiles=dict(zip(["min", "p5", "p25", "p50", "p75", "p95", "max"],
                                      [round(float(x), 4) for x in q])))
    return out


def cmd_inspect(loc: SnapshotLocation, args: argparse.Namespace) -> int:
    steps = loc.steps()
    record, values = _load_all(loc, args.step)
    info = {
        "url": args.url,
        "step": record.step,
        "n": record.n,
        "saved_world_size": record.layout.world_size,
        # what the stochastic rounding of later writes continues from
        "rounding_seed": record.seed, "exchanges": record.exchanges,
        "layout": record.layout.to_dict(),
        "committed_steps": [s for s, ok in steps if ok],
        "torn_steps": [s for s, ok in steps if not ok],
        **_summary(values),
        "extra": dict(record.extra),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_export(loc: SnapshotLocation, args: argparse.Namespace) -> int:
    if (args.threshold is None) == (args.top_fraction is None):
        print("export: give exactly one of --threshold or --top-fraction", file=sys.stderr)
        return 2
    record, scores = _load_all(loc, args.step)
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "scores.npy"), scores)
    if args.by == "delta":
        if args.baseline_step is None:
            print("export --by delta needs --baseline-step (the older snapshot)", file=sys.stderr)
            return 2
        _, base = _load_all(loc, args.baseline_step)
        key = base.astype(np.float32) - scores.astype(np.float32)
        np.save(os.path.join(args.out, "delta.npy"), key)
    else:
        key = scores.astype(np.float32)
    valid = ~np.isnan(key)
    if args.threshold is not None:
        kept = np.flatnonzero(valid & (key >= args.threshold))
    else:
        if not 0.0 < args.top_fraction <= 1.0:
            print(f"--top-fraction {args.top_fraction}: need 0 < f <= 1", file=sys.stderr)
            return 2
        cand = np.flatnonzero(valid)
        k = int(round(args.top_fraction * cand.size))
        # Highest key first; ties broken by lower id for a reproducible list.
        top = cand[np.lexsort((cand, -key[cand]))[:k]]
        kept = np.sort(top)
    np.save(os.path.join(args.out, "kept_ids.npy"), kept.astype(np.int64))
    print(json.dumps({"step": record.step, "n": record.n, "by": args.by,
                      "scored": int(valid.sum()), "kept": int(kept.size), "out": args.out}))
    return 0


URL_HELP = "the snapshots' root: a local path or an fsspec URL (s3://bucket/run/scores)"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage-options", type=json.loads, default=None,
                   help="fsspec options as JSON, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="N, saved world size, step, fraction scored, value summary")
    i.add_argument("url", help=URL_HELP)
    i.add_argument("--step", type=int, default=None, help="default: newest committed")
    e = sub.add_parser("export", help="scores and kept ids as .npy for offline filtering")
    e.add_argument("url", help=URL_HELP)
    e.add_argument("--step", type=int, default=None, help="default: newest committed")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--by", choices=["score", "delta"], default="score",
                   help="rank samples by their score, or by delta = baseline - score "
                        "(default: score)")
    e.add_argument("--baseline-step", type=int, default=None,
                   help="with --by delta: the older snapshot's step")
    e.add_argument("--threshold", type=float, default=None, help="keep key >= threshold")
    e.add_argument("--top-fraction", type=float, default=None,
                   help="keep this fraction of scored samples with the highest key")
    args = p.parse_args(argv)
    try:
        loc = SnapshotLocation(args.url, args.storage_options)
        return cmd_inspect(loc, args) if args.cmd == "inspect" else cmd_export(loc, args)
    except SnapshotError as err:
        return fail(p.prog, str(err))


if __name__ == "__main__":
    sys.exit(main())
