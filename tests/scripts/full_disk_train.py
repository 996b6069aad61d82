"""launch/train.py on a disk that another process fills up in the middle of a checkpoint,
after the checkpoint's free-space check passed: the writes then fail with a real ENOSPC.

    FILL_FILE=PATH FILL_STEP=S FILL_AT=scores|model FILL_RANK=R  full_disk_train.py ARGS

At the checkpoint of step S, right before the score-store snapshot (scores) or DeepSpeed's
model and optimizer files (model) are written, rank R appends to PATH until its
filesystem is full. ARGS are launch/train.py's.
"""

from __future__ import annotations

import errno
import os
import re
import runpy
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch.distributed as dist  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

from store import ScoreStore  # noqa: E402

STEP, AT, RANK = int(os.environ["FILL_STEP"]), os.environ["FILL_AT"], int(os.environ["FILL_RANK"])


def fill(step: int) -> None:
    if step != STEP or dist.get_rank() != RANK:
        return
    fd = os.open(os.environ["FILL_FILE"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\xff" * block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    print(f"[rank {RANK}] filled the disk before the {AT} of step {step}", flush=True)


def before(at: str, fn: Any, step_of: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if at == AT:
            fill(step_of(*args, **kwargs))
        return fn(*args, **kwargs)

    return call


ScoreStore.save = before("scores", ScoreStore.save, lambda self, url, step, **kw: step)
DeepSpeedEngine.save_checkpoint = before(
    "model", DeepSpeedEngine.save_checkpoint,
    lambda self, save_dir, tag=None, **kw: int(re.search(r"step-(\d+)", str(tag))[1]))

sys.argv[0] = str(REPO / "launch" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
