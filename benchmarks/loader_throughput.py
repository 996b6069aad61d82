"""Our loader vs a plain webdataset pipeline over the same shards, same decode and
preprocessing, same tokenizer, same number of workers, side by side in one run; and
the cost of resuming at 90% of an epoch vs reading up to that point.

    python benchmarks/loader_throughput.py [--samples 20000] [--workers 2]

Writes benchmarks/results/loader_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402

from dissect_dist.data import Manifest, WebDatasetLoader  # noqa: E402
from dissect_dist.data.builders import build_fashion_mnist  # noqa: E402

PRE = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(),
                 T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def _tokenizer():
    import open_clip

    return open_clip.get_tokenizer("RN50")


def run_ours(m: Manifest, bs: int, workers: int, tok) -> tuple[float, int]:
    loader = WebDatasetLoader(m, rank=0, world_size=1, batch_size=bs, seed=0,
                              preprocess=PRE, tokenizer=tok, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(b.ids) for b in loader)
    return n / (time.perf_counter() - t0), n


def run_wds(m: Manifest, bs: int, workers: int, tok) -> tuple[float, int]:
    import webdataset as wds

    ds = (wds.WebDataset(list(m.urls), shardshuffle=False, empty_check=False,
                         nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
          .decode("pil").to_tuple("png", "txt").map_tuple(PRE, lambda s: s)
          .batched(bs, partial=False))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for images, texts in loader:
        tok(list(texts))
        n += images.shape[0]
    return n / (time.perf_counter() - t0), n


def resume_cost(m: Manifest, bs: int, workers: int, tok) -> dict[str, float]:
    def mk():
        return WebDatasetLoader(m, rank=0, world_size=1, batch_size=bs, seed=0,
                                preprocess=PRE, tokenizer=tok, num_workers=workers)

    first = mk()
    stop = int(0.9 * len(first))
    t0 = time.perf_counter()
    for i, _ in enumerate(first):
        if i + 1 == stop:
            break
    t_read = time.perf_counter() - t0
    state = first.state_dict()
    t0 = time.perf_counter()
    resumed = mk()
    resumed.load_state_dict(state)
    next(iter(resumed))
    t_resume = time.perf_counter() - t0
    return {"batches_read_to_90pct": stop, "read_to_90pct_s": t_read,
            "resume_to_first_batch_s": t_resume, "ratio": t_resume / t_read}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=str(REPO / "data" / "bench-fmnist"))
    a = p.parse_args()
    torch.set_num_threads(1)
    mpath = Path(a.data) / "train" / "manifest.json"
    if not mpath.exists():
        print(f"[loader_throughput] building {a.samples} Fashion-MNIST shards in {a.data}")
        build_fashion_mnist(a.data, noise=0.0, subset=a.samples, shard_size=1000)
    m = Manifest.load(str(mpath))
    tok = _tokenizer()
    ours, theirs = [], []
    for r in range(a.repeats):  # alternate, so drift hits both alike
        ours.append(run_ours(m, a.batch_size, a.workers, tok)[0])
        theirs.append(run_wds(m, a.batch_size, a.workers, tok)[0])
        print(f"  repeat {r}: ours {ours[-1]:.0f} samples/s, webdataset {theirs[-1]:.0f}",
              flush=True)
    res = {
        "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")},
        "samples": m.total, "shards": len(m.urls), "workers": a.workers,
        "batch_size": a.batch_size,
        "ours_samples_per_s": ours, "webdataset_samples_per_s": theirs,
        "ratio_median": statistics.median(ours) / statistics.median(theirs),
        "resume": resume_cost(m, a.batch_size, a.workers, tok),
    }
    out = REPO / "benchmarks" / "results" / "loader_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    r = res["resume"]
    print(f"\nthroughput: ours {statistics.median(ours):.0f} vs webdataset "
          f"{statistics.median(theirs):.0f} samples/s -> {res['ratio_median']:.2f}x (target >= 0.9)")
    print(f"resume at 90%: {r['resume_to_first_batch_s']:.2f}s to the first batch vs "
          f"{r['read_to_90pct_s']:.2f}s reading up to it -> {r['ratio']:.3f}x (target <= 0.1)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
