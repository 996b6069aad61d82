"""The score store on one GPU: memory on the device vs the 2-bytes-per-sample floor,
exchange time through NCCL (world of one: the all_to_all path and its host sync are
exercised, the network is not), and snapshot save/load from device memory.

    python benchmarks/store_gpu.py [--out DIR]     # needs a CUDA GPU; ~2 min on an H100
    python benchmarks/store_gpu.py --device cpu    # the same on CPU with gloo (a dry run)

Writes store_gpu.json into --out (default benchmarks/results). The recorded run is
benchmarks/results/store_gpu_h200.json (NVIDIA H200).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from store import Momentum, ScoreStore, TorchDistributed

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/store_gpu.py
    import common  # type: ignore[no-redef]

REF_N = 10**6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_exchange(store: ScoreStore, b: int, iters: int, g: torch.Generator) -> float:
    dev = store.device
    ids = [torch.randint(0, store.n, (b,), generator=g).to(dev) for _ in range(iters)]
    curr = [(20 + 10 * torch.rand(b, generator=g)).to(dev) for _ in range(iters)]
    _sync(dev)
    t0 = time.perf_counter()
    for i, c in zip(ids, curr):
        store.exchange(i, c, Momentum(0.9))
    _sync(dev)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9])
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 32768, 262144])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--save-sizes", type=float, nargs="+", default=[1e8, 1e9])
    p.add_argument("--out", default=str(common.RESULTS))
    a = p.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{common.free_port()}", rank=0,
                            world_size=1,
                            device_id=dev if dev.type == "cuda" else None)
    comm = TorchDistributed()
    g = torch.Generator().manual_seed(0)
    machine = common.machine_info()
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": machine["torch"], "date": machine["date"], "machine": machine,
            "command": "python benchmarks/store_gpu.py " + " ".join(sys.argv[1:])}
    print(json.dumps(info), flush=True)
    ref = ScoreStore(REF_N, comm, device=dev)
    ref.values.fill_(25.0)
    rows = []
    for nf in a.sizes:
        n = int(nf)
        _sync(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        store = ScoreStore(n, comm, device=dev)
        _sync(dev)
        added = (torch.cuda.memory_allocated(dev) - before) if dev.type == "cuda" else 2 * n
        step = 1 << 26
        for i in range(0, n, step):
            k = min(step, n - i)
            store.values[i:i + k] = (25 + 4 * torch.randn(k, device=dev)).clamp_(0, 100)
        row = {"n": n, "device_bytes_added": added, "floor_bytes": 2 * n,
               "exchange_ms": {}, "exchange_ref_ms": {}}
        for b in a.batches:
            time_exchange(store, b, 5, g)
            time_exchange(ref, b, 5, g)
            big, small = [], []
            for _ in range(5):  # interleaved with the 1e6 store
                big.append(time_exchange(store, b, a.iters, g))
                small.append(time_exchange(ref, b, a.iters, g))
            row["exchange_ms"][b] = 1e3 * statistics.median(big)
            row["exchange_ref_ms"][b] = 1e3 * statistics.median(small)
        if nf in a.save_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                crc = zlib.crc32(store.local_numpy().data)
                _sync(dev)
                t0 = time.perf_counter()
                store.save(tmp, 1)
                row["save_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                back = ScoreStore.load(tmp, comm, n=n, device=dev)
                _sync(dev)
                row["load_s"] = time.perf_counter() - t0
                row["load_bit_exact"] = zlib.crc32(back.local_numpy().data) == crc
                row["disk_bytes_per_sample"] = sum(
                    f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / n
                del back
        del store
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    common.write_json(Path(a.out) / "store_gpu.json", {**info, "rows": rows})
    print("\n| N | device MiB added | floor MiB | exchange ms (B=" + ", ".join(map(str, a.batches))
          + ") | ÷ same on 1e6 store | save s | load s | bit-exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ex = " / ".join(f"{r['exchange_ms'][b]:.2f}" for b in a.batches)
        rel = " / ".join(f"{r['exchange_ms'][b] / r['exchange_ref_ms'][b]:.2f}" for b in a.batches)
        print(f"| {r['n']:.0e} | {r['device_bytes_added'] / 2**20:.1f} | {r['floor_bytes'] / 2**20:.1f}"
              f" | {ex} | {rel} | {r.get('save_s', float('nan')):.2f} | "
              f"{r.get('load_s', float('nan')):.2f} | {r.get('load_bit_exact', '-')} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
