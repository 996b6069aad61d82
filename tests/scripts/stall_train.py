"""launch/train.py with one rank's main thread blocked for good while it reads a sample
(data.workers=0: the read runs on the main thread); its other threads (the heartbeat)
go on, as in a deadlock or a read that never returns.

    STALL_RANK=R STALL_AT_READ=N  stall_train.py ARGS

Rank R blocks in its N-th sample read (1-based) after printing
`[rank R] stalling on purpose at <unix time>`. ARGS are launch/train.py's.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dissect_dist.data import loader  # noqa: E402

RANK, AT = int(os.environ["STALL_RANK"]), int(os.environ["STALL_AT_READ"])
_read = loader.ShardReader.read
_calls = [0]


def read(self: Any, shard: int, pos: int) -> Any:
    if int(os.environ.get("RANK", "-1")) == RANK:
        _calls[0] += 1
        if _calls[0] == AT:
            sys.stderr.write(f"[rank {RANK}] stalling on purpose at {time.time():.3f}\n")
            sys.stderr.flush()
            threading.Event().wait()
    return _read(self, shard, pos)


loader.ShardReader.read = read  # type: ignore[method-assign]
sys.argv = [str(REPO / "launch" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
