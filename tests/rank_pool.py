"""A pool of real rank processes joined by a gloo process group, for tests.

Each worker is a separate spawned Python process that calls
torch.distributed.init_process_group("gloo") over TCP on 127.0.0.1, then runs the
functions the test sends it. Every rank runs the same function with the same
arguments (SPMD); each reads its own rank from torch.distributed. A per-worker
`ctx` dict carries state between calls (e.g. the store under test).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from typing import Any

from dissect_dist.launching import free_port

__all__ = ["RankError", "RankPool", "free_port"]  # free_port: the tests import it from here


class RankError(RuntimeError):
    pass


def _worker(rank: int, world_size: int, port: int, conn: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    ctx: dict[str, Any] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(ctx, *args)))
        except BaseException as e:  # noqa: BLE001 - reported to the test process
            conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, timeout_s: float = 120.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        port = free_port()
        self._conns = []
        self._procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            # Not daemonic: ranks may start DataLoader worker processes of their own.
            p = ctx.Process(target=_worker, args=(rank, world_size, port, child), daemon=False)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run fn(ctx, *args) on every rank; return the per-rank results, or raise
        RankError with every failing rank's traceback."""
        for c in self._conns:
            c.send((fn, args))
        out: list[Any] = []
        for rank, c in enumerate(self._conns):
            if not c.poll(self.timeout_s):
                self.close(force=True)
                raise RankError(f"rank {rank} did not answer within {self.timeout_s}s (hang?)")
            out.append(c.recv())
        errors = [f"rank {r}: {v}" for r, (s, v) in enumerate(out) if s == "err"]
        if errors:
            raise RankError("\n".join(errors))
        return [v for _, v in out]

    def close(self, force: bool = False) -> None:
        for c, p in zip(self._conns, self._procs):
            if p.is_alive() and not force:
                try:
                    c.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for p in self._procs:
            p.join(timeout=10 if not force else 0.1)
            if p.is_alive():
                p.kill()
