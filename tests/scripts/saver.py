"""A single-process writer used to test crash safety.

    saver.py ROOT torn       commit step 1, then die (SIGKILL) between writing the
                             shards of step 2 and committing it
    saver.py ROOT loop N     commit steps 1..N; the values of step s are values_for(s)
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import torch

from store import ScoreStore, persist

N = 300_000


def values_for(step: int) -> np.ndarray:
    g = np.random.default_rng(step)
    v = (20 + 10 * g.random(N)).astype(np.float16)
    v[g.random(N) < 0.3] = np.nan
    return v


def store_for(step: int) -> ScoreStore:
    s = ScoreStore(N, chunk_target=4096, shard_target=16384)
    s.values.copy_(torch.from_numpy(values_for(step)))
    return s


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    if mode == "torn":
        store_for(1).save(root, 1)

        def die(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        persist.SnapshotLocation.commit = die  # type: ignore[assignment, method-assign]
        store_for(2).save(root, 2)
    else:
        for step in range(1, int(sys.argv[3]) + 1):
            store_for(step).save(root, step)
            print(step, flush=True)


if __name__ == "__main__":
    main()
