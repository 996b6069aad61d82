"""Score-store cost at scale: resident memory per rank, exchange time per step, and
snapshot save/load speed and size, with W real rank processes (torch.distributed.run,
gloo on CPU), plus the reference layout (a dict of 9-digit id strings -> float).

    python benchmarks/store_memory.py            # N = 1e6, 1e7, 1e8 (W=4) and 1e9 (W=8)
    python benchmarks/store_memory.py --quick    # N = 1e6, 1e7 at W=2, about a minute

Writes benchmarks/results/store_memory[_quick].json and .png and prints a table.
Targets (from the store's design): added resident memory per rank <= 1.05 * 2N/W bytes
+ 64 MiB; exchange time at the largest N within 1.2x of N=1e6 at the same W; <= 2.0
bytes per sample on disk; save throughput >= 50% of the same disk's raw sequential
write speed, both measured in the same run with the same fsync discipline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

if __package__:
    from benchmarks import common
else:  # run as a file: python benchmarks/store_memory.py (and its rank processes)
    import common  # type: ignore[no-redef]

REPO = common.REPO
RESULTS = common.RESULTS
MiB = 1 << 20
REF_N = 10**6  # the "small N" every exchange time is compared against


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from store import Momentum, ScoreStore, TorchDistributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    comm = TorchDistributed()
    rank, w, n = comm.rank, comm.world_size, args.samples
    rule = Momentum(0.9)
    g = torch.Generator().manual_seed(1234 + rank)

    def exchange_once(store: ScoreStore, b: int) -> None:
        ids = torch.randint(0, store.n, (b,), generator=g)  # uniform: every owner gets traffic
        store.exchange(ids, 20 + 10 * torch.rand(b, generator=g), rule)

    # Warm up allocator, gloo buffers and kernels on a tiny store, so the baseline
    # below holds everything except the big store itself.
    tiny = ScoreStore(4096, comm)
    for b in args.batches:
        exchange_once(tiny, b // w)
    del tiny
    # A 1e6-sample store timed side by side with the big one (interleaved), so "flat
    # in N" is a ratio measured in the same processes at the same moments. Allocated
    # before the baseline: it is not counted in the big store's memory.
    ref = ScoreStore(REF_N, comm)
    ref.values.fill_(25.0)
    gc.collect()
    comm.barrier()
    rss0 = rss_bytes()

    store = ScoreStore(n, comm)
    rss_alloc = rss_bytes()
    # Realistic, fully scored history: momentum-averaged CLIPScores ~ N(25, 4).
    step = 1 << 18  # small blocks: the fill's temporaries must not inflate the RSS figure
    for a in range(0, store.values.numel(), step):
        blk = store.values[a : a + step]
        blk.copy_((25 + 4 * torch.randn(blk.numel(), generator=g)).clamp_(0, 100))
    exch: dict[str, float] = {}
    exch_ref: dict[str, float] = {}
    for b in args.batches:
        for _ in range(3):
            exchange_once(store, b // w)
            exchange_once(ref, b // w)
        times: dict[int, list[float]] = {id(store): [], id(ref): []}
        for _ in range(args.repeats):
            for target in (store, ref):
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    exchange_once(target, b // w)
                comm.barrier()
                times[id(target)].append((time.perf_counter() - t0) / args.iters)
        exch[str(b)] = statistics.median(times[id(store)])
        exch_ref[str(b)] = statistics.median(times[id(ref)])
    rss_steady = rss_bytes()
    peaks = {"fill+exchange": rss_bytes("VmHWM") - rss0}

    url = f"{args.disk_dir}/snap"
    comm.barrier()
    t0 = time.perf_counter()
    store.save(url, 1)
    comm.barrier()
    t_save = time.perf_counter() - t0
    peaks["save"] = rss_bytes("VmHWM") - rss0

    # The disk's raw sequential write speed, same bytes per rank, same concurrency,
    # same durability (fsync) as the save.
    raw_path = f"{args.disk_dir}/raw-{rank}.bin"
    buf = store.local_numpy()
    comm.barrier()
    t0 = time.perf_counter()
    with open(raw_path, "wb") as f:
        f.write(memoryview(buf).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    comm.barrier()
    t_raw = time.perf_counter() - t0
    os.unlink(raw_path)

    checksum = zlib.crc32(store.local_numpy().data)
    del store, buf
    gc.collect()
    comm.barrier()
    t0 = time.perf_counter()
    store = ScoreStore.load(url, comm, n=n)
    comm.barrier()
    t_load = time.perf_counter() - t0
    peaks["load"] = rss_bytes("VmHWM") - rss0
    assert zlib.crc32(store.local_numpy().data) == checksum, "load did not round-trip"

    row = {
        "rank": rank,
        "lo": store.lo,
        "hi": store.hi,
        "rss_added_alloc": rss_alloc - rss0,
        "rss_added_steady": rss_steady - rss0,
        "rss_added_peak": rss_bytes("VmHWM") - rss0,
        "hwm_after": peaks,
        "exchange_s": exch,
        "exchange_ref_s": exch_ref,
        "save_s": t_save,
        "raw_write_s": t_raw,
        "load_s": t_load,
    }
    rows = comm.all_gather_object(row)
    if rank == 0:
        disk = dir_bytes(Path(url))
        Path(args.out).write_text(
            json.dumps({"n": n, "world_size": w, "ranks": rows, "disk_bytes": disk})
        )
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- reference
def reference_dict(n: int) -> dict[str, float]:
    """Bytes per sample of the reference layout: {9-digit id string: float}."""
    import numpy as np

    gc.collect()
    before = rss_bytes()
    vals = np.random.default_rng(0).normal(25, 4, n).tolist()
    d = {f"{i:09d}": v for i, v in enumerate(vals)}
    del vals
    gc.collect()
    per = (rss_bytes() - before) / n
    del d
    return {"n": n, "bytes_per_sample": per}


# ---------------------------------------------------------------------------- driver
def run_config(n: int, w: int, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.disk_root))
    out = tmp / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={w}",
        f"--master_port={common.free_port()}",
        __file__,
        "--worker",
        "--samples",
        str(n),
        "--out",
        str(out),
        "--disk-dir",
        str(tmp),
        "--iters",
        str(args.iters),
        "--repeats",
        str(args.repeats),
        "--batches",
        *map(str, args.batches),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"N={n} W={w} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    res = json.loads(out.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - t0
    return summarise(res)


def summarise(res: dict) -> dict:
    n, w, ranks = res["n"], res["world_size"], res["ranks"]
    floor = 2 * n / w
    worst = max(ranks, key=lambda r: r["rss_added_steady"])
    budget = 1.05 * floor + 64 * MiB
    logical = 2 * n
    save_s = max(r["save_s"] for r in ranks)
    raw_s = max(r["raw_write_s"] for r in ranks)
    return {
        "n": n,
        "world_size": w,
        "floor_bytes_per_rank": floor,
        "largest_range_bytes": max(2 * (r["hi"] - r["lo"]) for r in ranks),
        "rss_added_steady_max": worst["rss_added_steady"],
        "rss_added_peak_max": max(r["rss_added_peak"] for r in ranks),
        "peak_after_phase_max": {
            k: max(r["hwm_after"][k] for r in ranks) for k in ranks[0]["hwm_after"]
        },
        "memory_budget_bytes": budget,
        "memory_ok": worst["rss_added_steady"] <= budget,
        "exchange_ms": {
            b: 1e3 * statistics.median(r["exchange_s"][b] for r in ranks)
            for b in ranks[0]["exchange_s"]
        },
        "exchange_ref_ms": {
            b: 1e3 * statistics.median(r["exchange_ref_s"][b] for r in ranks)
            for b in ranks[0]["exchange_ref_s"]
        },
        "save_s": save_s,
        "raw_write_s": raw_s,
        "save_MBps": logical / save_s / 1e6,
        "raw_write_MBps": logical / raw_s / 1e6,
        "save_vs_raw": raw_s / save_s,
        "load_s": max(r["load_s"] for r in ranks),
        "disk_bytes_per_sample": res["disk_bytes"] / n,
        "wall_s": res["wall_s"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["configs"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    ns = [r["n"] for r in rows]
    ax[0].loglog(
        ns,
        [r["rss_added_steady_max"] / MiB for r in rows],
        "o-",
        label="store: added RSS (worst rank)",
    )
    ax[0].loglog(ns, [r["floor_bytes_per_rank"] / MiB for r in rows], "k--", label="floor 2N/W")
    ref = result["reference"]["bytes_per_sample"]
    ax[0].loglog(
        ns,
        [ref * n / MiB for n in ns],
        "r:",
        label=f"reference dict ({ref:.0f} B/sample, every rank)",
    )
    for r in rows:
        ax[0].annotate(
            f"W={r['world_size']}", (r["n"], r["rss_added_steady_max"] / MiB), fontsize=7
        )
    ax[0].set(xlabel="samples N", ylabel="MiB per rank", title="memory per rank")
    ax[0].legend(fontsize=7)
    for b in rows[0]["exchange_ms"]:
        ax[1].semilogx(ns, [r["exchange_vs_1e6"][b] for r in rows], "o-", label=f"global batch {b}")
        for r in rows:
            ax[1].annotate(
                f"{r['exchange_ms'][b]:.1f} ms, W={r['world_size']}",
                (r["n"], r["exchange_vs_1e6"][b]),
                fontsize=6,
            )
    ax[1].axhline(1.2, color="r", ls=":", label="target 1.2x")
    ax[1].set(
        xlabel="samples N",
        ylabel="time / time of an N=1e6 store (same processes, interleaved)",
        title="exchange time relative to N=1e6",
    )
    ax[1].set_ylim(0.8, 1.6)
    ax[1].legend(fontsize=7)
    ax[2].semilogx(ns, [r["save_MBps"] for r in rows], "o-", label="save (logical MB/s)")
    ax[2].semilogx(ns, [r["raw_write_MBps"] for r in rows], "s--", label="raw write + fsync")
    ax2 = ax[2].twinx()
    ax2.semilogx(
        ns, [r["disk_bytes_per_sample"] for r in rows], "g^:", label="bytes/sample on disk"
    )
    ax2.set_ylabel("bytes per sample on disk", color="g")
    ax2.set_ylim(0, 2.5)
    ax[2].set(xlabel="samples N", ylabel="MB/s", title="snapshot save")
    ax[2].legend(fontsize=7, loc="lower left")
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="N = 1e6, 1e7 at W = 2 (about a minute)")
    p.add_argument(
        "--no-1e9", action="store_true", help="skip N = 1e9 (needs ~4 GB RAM, ~3 GB disk)"
    )
    p.add_argument(
        "--disk-root", default=None, help="where snapshots are written (default: system temp)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--disk-dir", help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 32768])
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.reference is not None:
        print(json.dumps(reference_dict(args.reference)))
        return
    if args.quick:
        configs = [(10**6, 2), (10**7, 2)]
        args.iters, args.repeats = 10, 3
        ref_ns = [10**6]
    else:
        configs = [(10**6, 4), (10**7, 4), (10**8, 4)] + ([] if args.no_1e9 else [(10**9, 8)])
        ref_ns = [10**6, 10**7]
    rows = []
    for n, w in configs:
        print(f"[store_memory] N={n:.0e} W={w} ...", flush=True)
        rows.append(run_config(n, w, args))
        r = rows[-1]
        print(
            f"  added RSS {r['rss_added_steady_max'] / MiB:8.1f} MiB/rank (floor {r['floor_bytes_per_rank'] / MiB:.1f}), "
            f"exchange {r['exchange_ms']} ms, save {r['save_MBps']:.0f} MB/s vs raw {r['raw_write_MBps']:.0f} MB/s, "
            f"{r['disk_bytes_per_sample']:.3f} B/sample on disk",
            flush=True,
        )
    refs = []
    for n in ref_ns:
        # a fresh process each, so one measurement's freed memory cannot hide another's
        out = subprocess.run(
            [sys.executable, __file__, "--reference", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        refs.append(json.loads(out.stdout))
    ref_per = refs[-1]["bytes_per_sample"]
    for r in rows:
        r["reference_bytes_per_rank"] = ref_per * r["n"]  # replicated on every rank
        r["reference_over_store"] = r["reference_bytes_per_rank"] / max(
            r["rss_added_steady_max"], 1
        )
    flat = {}
    for r in rows:
        r["exchange_vs_1e6"] = {
            b: r["exchange_ms"][b] / r["exchange_ref_ms"][b] for b in r["exchange_ms"]
        }
        flat[f"N={r['n']:.0e} W={r['world_size']}"] = r["exchange_vs_1e6"]
    import torch

    result = {
        "title": f"score store, {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}",
        "command": " ".join(["python", "benchmarks/store_memory.py", *sys.argv[1:]]),
        "machine": common.machine_info(),
        "configs": rows,
        "reference": {"measured": refs, "bytes_per_sample": ref_per},
        "exchange_time_vs_1e6_same_run": flat,
    }
    stem = "store_memory_quick" if args.quick else "store_memory"
    common.write_json(RESULTS / f"{stem}.json", result)
    plot(result, RESULTS / f"{stem}.png")
    print_table(result)
    print(f"\nwrote {RESULTS / (stem + '.json')} and .png")


def print_table(result: dict) -> None:
    bs = ", ".join(result["configs"][0]["exchange_ms"])
    print(
        "\n| N | W | added RSS/rank MiB | floor 2N/W MiB | peak MiB | mem ok | reference dict/rank MiB | "
        f"reference/store | exchange ms (B={bs}) | exchange / same at N=1e6 | save MB/s | raw MB/s | "
        "save/raw | load s | B/sample on disk |"
    )
    print("|" + "---|" * 15)
    for r in result["configs"]:
        print(
            f"| {r['n']:.0e} | {r['world_size']} | {r['rss_added_steady_max'] / MiB:.1f} | "
            f"{r['floor_bytes_per_rank'] / MiB:.1f} | {r['rss_added_peak_max'] / MiB:.1f} | "
            f"{'yes' if r['memory_ok'] else 'NO'} | {r['reference_bytes_per_rank'] / MiB:,.0f} | "
            f"{r['reference_over_store']:.0f}x | {' / '.join(f'{v:.2f}' for v in r['exchange_ms'].values())} | "
            f"{' / '.join(f'{v:.2f}' for v in r['exchange_vs_1e6'].values())} | "
            f"{r['save_MBps']:.0f} | {r['raw_write_MBps']:.0f} | {r['save_vs_raw']:.2f} | "
            f"{r['load_s']:.2f} | {r['disk_bytes_per_sample']:.3f} |"
        )
    print(
        f"\nreference layout: {result['reference']['bytes_per_sample']:.0f} bytes/sample, on every rank"
    )


if __name__ == "__main__":
    main()
