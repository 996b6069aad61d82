"""Where a profiled step's time goes, phase by phase, from the Chrome trace the trainer
writes with `train.profile_at` (RUN/profile/rank{r}.trace.json; the step's phases are
the `dissect_dist.phase.<name>` ranges of its StepTimer).

Per phase, summed over the profiled steps: wall time; on a GPU, the time the device was
busy inside the phase (the union of kernel, memcpy and memset intervals, clipped to the
phase; meaningful with train.time_breakdown=true, which waits for the device at every
phase boundary), its share of the wall time, the kernels by time, and the host's time in
CUDA synchronisation and allocation calls. Without device events (a CPU run) the CPU
operators by inclusive time stand in for the kernels. So "this phase is slow" splits into
"the device computes longer" (busy ~ wall: which kernels) and "the device waits"
(busy << wall: for what the host does).

    python benchmarks/profile_summary.py RUN/profile/rank0.trace.json [--top 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

PHASE_PREFIX = "dissect_dist.phase."  # dissect_dist.observers.StepTimer.PHASE_PREFIX
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
ALLOC_CALLS = ("cudaMalloc", "cudaFree", "cudaMallocHost", "cudaFreeHost", "cudaHostAlloc")


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds in, ms out)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s  # type: ignore[operator]
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s  # type: ignore[operator]
    return total / 1e3


def _clip(ev: dict[str, Any], lo: float, hi: float) -> tuple[float, float] | None:
    s, e = float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0))
    s, e = max(s, lo), min(e, hi)
    return (s, e) if e > s else None


def summarize(trace: str | Path, top: int = 8) -> dict[str, Any]:
    """The per-phase summary of one rank's trace (see the module docstring)."""
    doc = json.loads(Path(trace).read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    xs = [e for e in events if e.get("ph") == "X" and "ts" in e]
    phases = [e for e in xs if e.get("cat") == "user_annotation"
              and str(e.get("name", "")).startswith(PHASE_PREFIX)]
    if not phases:
        raise ValueError(f"{trace}: no {PHASE_PREFIX}* ranges: profile a step of this "
                         "revision's trainer (train.profile_at)")
    device = [e for e in xs if e.get("cat") in DEVICE_CATS]
    runtime = [e for e in xs if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    cpu_ops = [e for e in xs if e.get("cat") == "cpu_op"]
    out: dict[str, Any] = {"trace": str(trace), "device_events": len(device), "phases": {}}
    by_phase: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in phases:
        by_phase[p["name"][len(PHASE_PREFIX):]].append(p)
    for name, ranges in by_phase.items():
        spans = [(float(r["ts"]), float(r["ts"]) + float(r["dur"])) for r in ranges]
        wall = sum(e - s for s, e in spans) / 1e3
        busy: list[tuple[float, float]] = []
        kernels: dict[str, float] = defaultdict(float)
        calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        ops: dict[str, float] = defaultdict(float)
        for lo, hi in spans:
            for e in device:
                c = _clip(e, lo, hi)
                if c:
                    busy.append(c)
                    kernels[str(e["name"])] += (c[1] - c[0]) / 1e3
            for e in runtime:
                n = str(e.get("name", ""))
                if n in SYNC_CALLS or n in ALLOC_CALLS:
                    c = _clip(e, lo, hi)
                    if c:
                        calls[n][0] += 1
                        calls[n][1] += (c[1] - c[0]) / 1e3
            if not device:
                for e in cpu_ops:
                    c = _clip(e, lo, hi)
                    if c:
                        ops[str(e["name"])] += (c[1] - c[0]) / 1e3
        busy_ms = _union_ms([(s, e) for s, e in busy])
        item: dict[str, Any] = {
            "ranges": len(ranges), "wall_ms": wall,
            "device_busy_ms": busy_ms if device else None,
            "device_busy_fraction": busy_ms / wall if device and wall > 0 else None,
            "top_kernels_ms": sorted(kernels.items(), key=lambda kv: -kv[1])[:top],
            "cuda_calls": {n: {"count": int(v[0]), "ms": v[1]} for n, v in calls.items()},
        }
        if not device:  # inclusive times: nested operators are counted in their parents too
            item["top_cpu_ops_inclusive_ms"] = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        out["phases"][name] = item
    return out


def table(summary: dict[str, Any]) -> str:
    """The summary as a short text table (one line per phase, then the top kernels)."""
    lines = ["| phase | ranges | wall ms | device busy ms | busy / wall | sync calls ms | "
             "alloc calls |", "|---|---|---|---|---|---|---|"]
    for name, p in summary["phases"].items():
        sync = sum(v["ms"] for n, v in p["cuda_calls"].items() if n in SYNC_CALLS)
        alloc = sum(v["count"] for n, v in p["cuda_calls"].items() if n in ALLOC_CALLS)
        busy = "-" if p["device_busy_ms"] is None else f"{p['device_busy_ms']:.1f}"
        frac = "-" if p["device_busy_fraction"] is None else f"{p['device_busy_fraction']:.2f}"
        lines.append(f"| {name} | {p['ranges']} | {p['wall_ms']:.1f} | {busy} | {frac} | "
                     f"{sync:.1f} | {alloc} |")
    for name, p in summary["phases"].items():
        top = p["top_kernels_ms"] or p.get("top_cpu_ops_inclusive_ms", [])
        what = "kernels" if p["top_kernels_ms"] else "CPU operators (inclusive)"
        lines.append(f"\n{name}: top {what}")
        lines += [f"  {ms:9.2f} ms  {n[:110]}" for n, ms in top]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="RUN/profile/rank{r}.trace.json")
    p.add_argument("--top", type=int, default=8, help="kernels (or operators) per phase")
    p.add_argument("--json", default="", help="also write the summary here")
    a = p.parse_args()
    s = summarize(a.trace, a.top)
    print(table(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
