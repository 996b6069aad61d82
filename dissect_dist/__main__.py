"""python -m dissect_dist COMMAND ...  (installed as `dissect-dist`)

commands:
    data     build manifests and data sets (python -m dissect_dist.data --help)
    store    look into score-store snapshots: inspect, export (python -m store --help)
    report   one PNG and five lines for a run, finished or in progress

Training and reference scoring run on every rank, through DeepSpeed's launcher:
    deepspeed launch/train.py --config CONFIG.yaml          (README.md, "Train on your shards")
    deepspeed launch/score.py --config CONFIG.yaml --model CKPT --out URL
                                    (a reference model's scores; docs/training.md)"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dissect_dist.cli import Parser, version


def _commands() -> dict[str, Callable[[list[str]], int]]:
    from dissect_dist.data.__main__ import main as data_main
    from dissect_dist.report import main as report_main
    from store.__main__ import main as store_main

    return {"data": data_main, "report": report_main, "store": store_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = Parser(prog="python -m dissect_dist", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dissect-dist {version()}",
                   help="print the installed version and exit")
    p.add_argument("command", choices=sorted(_commands()), help="the command to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    a = p.parse_args(argv[:1])
    return _commands()[a.command](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
