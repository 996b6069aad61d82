"""Launched by torch.distributed.run: `save` runs steps and saves, `verify` reloads
under the current world size and checks against the values the save run recorded."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from store import Momentum, ScoreStore, TorchDistributed

N = 77_777


def main(mode: str, root: str) -> None:
    dist.init_process_group("gloo")
    comm = TorchDistributed()
    if mode == "save":
        store = ScoreStore(N, comm, chunk_target=256, shard_target=1024)
        for step in range(5):
            g = torch.Generator().manual_seed(step * 10 + comm.rank)
            ids = torch.randint(0, N, (2000,), generator=g)
            store.exchange(ids, 30 * torch.rand(2000, generator=g), Momentum(0.9))
        store.save(f"{root}/scores", 5)
        parts = comm.all_gather_object((store.lo, store.local_numpy()))
        if comm.rank == 0:
            full = np.full(N, np.nan, np.float16)
            for lo, v in parts:
                full[lo:lo + v.size] = v
            np.save(f"{root}/expected.npy", full)
    else:
        store = ScoreStore.load(f"{root}/scores", comm, n=N)
        want = np.load(f"{root}/expected.npy")[store.lo:store.hi]
        assert np.array_equal(store.local_numpy().view(np.uint16), want.view(np.uint16))
        comm.barrier()
        if comm.rank == 0:
            print(f"verified {N} values at world size {comm.world_size}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
