"""What DISSect adds to a step's communication, and how it grows with the world size.

    python benchmarks/collective_scaling.py                  # W = 2, 4, 8; b = 1024; ~2 min
    python benchmarks/collective_scaling.py --worlds 2 4 --batch 256

For each W, W real rank processes (gloo on 127.0.0.1) run the two collective phases that
selection adds to a step, with the project's own code:
  exchange  ScoreStore.exchange: three all_to_all (a (W, 3) header of counts and input
            checks, the (ids, curr) rows to their owners, the old scores back);
  ranking   Selector.select with global scope: one all_gather of every rank's keys (with
            its row count and non-finite count in the same buffer), then the same sort of
            the global batch on every rank.
Bytes per rank per step are counted on the tensors each collective sends and receives
(a wrapper around the store's Collective; the ranking's buffer sizes from its one
all_gather). Times are medians over `--steps` steps after warm-up, every rank's maximum.

Then a model for W = 64 .. 512 (benchmarks/README.md, "Beyond one machine"): the bytes
are exact functions of (W, b); time = latency per peer x (W - 1) + bytes / bandwidth,
evaluated with (a) the per-peer cost fitted to the W = 2, 4, 8 runs here (processes on 2
shared cores over loopback: a pessimistic bound, scheduling-dominated) and (b) stated
datacenter figures for a ring/pairwise NCCL schedule over InfiniBand. Prints a table and
writes benchmarks/results/collective_scaling.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/collective_scaling.py
    import common  # type: ignore[no-redef]

OUT = common.RESULTS / "collective_scaling.json"


class _Counting:
    """The store's Collective, counting the bytes this rank sends and receives."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.sent, self.received = inner, 0, 0

    @property
    def rank(self) -> int:
        return int(self.inner.rank)

    @property
    def world_size(self) -> int:
        return int(self.inner.world_size)

    def all_to_all(self, send: torch.Tensor, send_splits: list[int],
                   recv_splits: list[int]) -> torch.Tensor:
        row = send.element_size() * (send.shape[1] if send.dim() > 1 else 1)  # bytes per row
        me = self.rank
        self.sent += row * (sum(send_splits) - send_splits[me])  # to other ranks only
        self.received += row * (sum(recv_splits) - recv_splits[me])
        return self.inner.all_to_all(send, send_splits, recv_splits)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return list(self.inner.all_gather_object(obj))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.inner.broadcast_object(obj, src)

    def barrier(self) -> None:
        self.inner.barrier()


def _rank(rank: int, world: int, port: int, b: int, n: int, steps: int, q: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dissect_dist.selection import ScoredBatch, Selector, build_strategy
    from store import Momentum, ScoreStore, TorchDistributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    comm = _Counting(TorchDistributed())
    store = ScoreStore(n, comm, seed=0)
    rule = Momentum(beta=0.9)
    selector = Selector(build_strategy("clipscore"), 0.3, "global", rank, world, 0, max_rows=b)
    g = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {"exchange": [], "ranking": []}
    for step in range(steps + 5):
        ids = torch.randint(0, n, (b,), generator=g)
        curr = torch.rand(b, generator=g) * 40
        comm.sent = comm.received = 0
        dist.barrier()
        t0 = time.perf_counter()
        store.exchange(ids, curr, rule)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        selector.select(ScoredBatch(ids, curr, None, 0))
        t3 = time.perf_counter()
        if step >= 5:
            times["exchange"].append(t1 - t0)
            times["ranking"].append(t3 - t2)
    sent, received = comm.sent, comm.received
    med = torch.tensor([statistics.median(times["exchange"]), statistics.median(times["ranking"])])
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    if rank == 0:
        # the ranking's one all_gather: (b + 2) float32 per rank, to and from every peer
        gather = (b + 2) * 4
        q.put({"world": world, "b": b, "exchange_ms": 1e3 * float(med[0]),
               "ranking_ms": 1e3 * float(med[1]),
               "exchange_bytes_sent": sent, "exchange_bytes_received": received,
               "ranking_bytes_sent": gather * (world - 1),
               "ranking_bytes_received": gather * (world - 1)})
    dist.destroy_process_group()


def measure(world: int, b: int, n: int, steps: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = common.free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, b, n, steps, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"rank process exited {p.exitcode} at W={world}")
    return dict(res)


def bytes_per_rank(world: int, b: int) -> dict[str, float]:
    """Exact bytes one rank sends (= receives, on average) per step, from the code: header
    24 B per peer; (id, curr) as 2 float64 per row and the old score as 1 float32 per row,
    for the (W-1)/W of a rank's rows owned elsewhere (uniform ids); the ranking's
    (b + 2) float32 to every peer."""
    other = (world - 1) / world
    return {"exchange": 24 * (world - 1) + (16 + 4) * b * other,
            "ranking": 4 * (b + 2) * (world - 1)}


def model(world: int, b: int, per_peer_s: dict[str, float], bw: float) -> dict[str, float]:
    """Seconds per step: each phase's latency (per peer x (W - 1)) + its bytes / bw."""
    by = bytes_per_rank(world, b)
    return {k: per_peer_s[k] * (world - 1) + by[k] / bw for k in by}


def _fit(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Least squares t = c0 + c1 (W - 1) over the measured worlds (seconds)."""
    xs = [r["world"] - 1 for r in rows]
    ys = [r[key] / 1e3 for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - c1 * mx, c1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8],
                   help="world sizes to measure (rank processes on this machine)")
    p.add_argument("--batch", type=int, default=1024, help="per-rank batch b")
    p.add_argument("--store-size", type=int, default=10**6, help="samples N in the store")
    p.add_argument("--steps", type=int, default=30, help="timed steps per world size")
    p.add_argument("--out", default=str(OUT), help="results JSON")
    a = p.parse_args()
    rows = []
    for w in a.worlds:
        r = measure(w, a.batch, a.store_size, a.steps)
        exact = bytes_per_rank(w, a.batch)
        print(f"W={w:2d} b={a.batch}: exchange {r['exchange_ms']:.2f} ms, "
              f"{r['exchange_bytes_sent'] / 1e3:.1f} kB sent (model {exact['exchange'] / 1e3:.1f}); "
              f"ranking {r['ranking_ms']:.2f} ms, {r['ranking_bytes_received'] / 1e3:.1f} kB "
              "received", flush=True)
        rows.append(r)
    fits = {k: _fit(rows, f"{k}_ms") for k in ("exchange", "ranking")} if len(rows) > 1 else {}
    out: dict[str, Any] = {"measured": rows, "machine": common.machine_info(),
                           "transport": "gloo over loopback, one process per rank",
                           "fit_seconds_c0_c1": fits, "model": []}
    # (a) this machine's per-peer cost, its loopback bandwidth taken as unlimited;
    # (b) datacenter: 3 collectives x ~10 us per peer step (exchange) and 1 (ranking) on a
    # 200 Gb/s link (25 GB/s).
    scenarios = {"this VM, fitted": ({k: max(c1, 0.0) for k, (_, c1) in fits.items()}, 1e12),
                 "IB 200 Gb/s, 10 us/peer/collective": ({"exchange": 30e-6, "ranking": 10e-6},
                                                       25e9)}
    print("\nModel per step (ms), b = 1024 per rank:")
    print(f"{'W':>5} {'global batch':>12} {'exch kB':>8} {'rank kB':>8} " +
          " ".join(f"{s[:26]:>28}" for s in scenarios))
    for w in (64, 128, 256, 512):
        by = bytes_per_rank(w, 1024)
        cells, row = [], {"world": w, "global_batch": w * 1024, "bytes": by}
        for name, (lat, bw) in scenarios.items():
            if set(lat) != {"exchange", "ranking"}:
                continue
            t = model(w, 1024, lat, bw)
            row[name] = {k: 1e3 * v for k, v in t.items()}
            cells.append(f"{1e3 * t['exchange']:>13.1f} + {1e3 * t['ranking']:>10.1f}")
        out["model"].append(row)
        print(f"{w:>5} {w * 1024:>12} {by['exchange'] / 1e3:>8.1f} {by['ranking'] / 1e3:>8.1f} "
              + " ".join(f"{c:>28}" for c in cells))
    for w in (8, 64, 512):
        out.setdefault("store_mib_per_rank_1e9", {})[w] = 2 * 10**9 / w / 2**20
    common.write_json(Path(a.out), out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
