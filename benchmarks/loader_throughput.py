"""Loader throughput on web-like JPEGs at 224 px with open_clip's training transform:

  ours      this checkout's loader: reduced-size JPEG decoding (ImagePlan), crops resized
            by torch's vectorised kernels (data.resampling=fast), captions from the token
            cache (filled once, before the timed runs), uint8 batches normalised on the
            device (here the CPU: the normalisation is timed too)
  ours-host the same without the normalisation: the host's share on a GPU machine,
            where the uint8 batch is normalised on the GPU
  ours-exact  the same as ours with PIL's resize of the exact box (data.resampling=exact)
  device-host data.decode=device: the workers read the JPEG bytes, draw the crop box and
            read the tokens; the decoding itself is left to the device and not run here
            (on a GPU host: the host's share; the device's is measured by gpu_smoke.py)
  main      the loader of another git revision (default 7b22067, the loader before the
            fast path), extracted with `git archive` and run as it is: full-size decode,
            the transform, per-batch tokenisation, float batches
  wds       plain webdataset: decode("pil") + the same transform + per-batch tokenisation
  pil       decode only: PIL decodes every JPEG at full size to RGB (the reference floor)
  pil-1/8   decode only at libjpeg's smallest DCT scale (1/8): what entropy decoding alone
            costs, the floor under any loader that decodes with libjpeg, reduced or not

Every measurement runs in a fresh subprocess; the configurations alternate, `--repeats`
rounds. Per core = samples / CPU seconds of the process and its worker processes; per
worker = samples/s / workers. Also the cost of resuming ours at 25, 50 and 90% of an epoch vs
reading up to that point.

    python benchmarks/loader_throughput.py [--samples 3000] [--workers 2] [--repeats 3]

Writes benchmarks/results/loader_throughput.json.

    python benchmarks/loader_throughput.py --epoch-starts [--epochs 12] [--before REV]

The epoch-start columns instead: how long a loader takes to its first batch when it starts
(first epoch) and at each later epoch's start, and an epoch's wall time, for ours and for
the loader of revision REV (default e1efe2a: workers forked anew every epoch from the
training process), on the 28-px demo data (Fashion-MNIST, the tiny-cpu config's transform
and batch) and on the photo set; fresh subprocesses, alternating, `--repeats` rounds.
Writes benchmarks/results/loader_epoch_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("ours", "ours-host", "ours-exact", "device-host", "main", "wds", "pil",
           "pil-1/8")
BASELINE = "7b22067"  # the loader before the fast path
MODEL = "RN50"  # only its transform (224 px, RandomResizedCrop scale 0.9-1) and tokenizer


def _cpu() -> float:
    """CPU seconds of this process, its ended children, and its live descendants (the
    loader's workers are children of its fork server and live across epochs: they are
    not this process's children, and are not ended when the pass is timed)."""
    import psutil

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            live += t.user + t.system
        except psutil.Error:
            pass
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + live


def _transform_and_tokenizer():
    import open_clip

    _, pre_train, _ = open_clip.create_model_and_transforms(MODEL)
    return pre_train, open_clip.get_tokenizer(MODEL)


def _loader(a, m, pre, tok, token_cache, decode="workers"):
    from dissect_dist.data import WebDatasetLoader

    kw: dict[str, Any] = {"token_cache": token_cache} if token_cache else {}
    if decode != "workers":
        kw["decode"] = decode
    return WebDatasetLoader(m, rank=0, world_size=1, batch_size=a.batch_size, seed=0,
                            preprocess=pre, tokenizer=tok, num_workers=a.workers, **kw)


def one(a) -> dict:
    """One timed pass of config `a.one`, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    from dissect_dist.data import Manifest

    m = Manifest.load(str(Path(a.data) / "manifest.json"))
    pre, tok = _transform_and_tokenizer()
    n = 0
    if a.one in ("ours", "ours-host", "ours-exact", "device-host", "main"):
        ours = a.one != "main"
        if ours:
            from dissect_dist.data.decode import ImagePlan

            pre = ImagePlan.from_transform(
                pre, resampling="exact" if a.one == "ours-exact" else "fast")
        loader = _loader(a, m, pre, tok, a.token_cache if ours else None,
                         "device" if a.one == "device-host" else "workers")
        t0, c0 = time.perf_counter(), _cpu()
        for b in loader:
            if ours and a.one not in ("ours-host", "device-host"):  # as the trainer does
                b.images_on("cpu", torch.float32)  # (main's are float already)
            n += len(b.ids)
    elif a.one == "wds":
        import webdataset as wds

        ds = (wds.WebDataset(list(m.urls), shardshuffle=False, empty_check=False,
                             nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
              .decode("pil").to_tuple("jpg", "txt").map_tuple(pre, lambda s: s)
              .batched(a.batch_size, partial=False))
        loader = wds.WebLoader(ds, batch_size=None, num_workers=a.workers)
        t0, c0 = time.perf_counter(), _cpu()
        for images, texts in loader:
            tok(list(texts))
            n += images.shape[0]
    else:
        import tarfile

        from PIL import Image

        t0, c0 = time.perf_counter(), _cpu()
        for url in m.urls:
            with tarfile.open(url) as tf:
                for member in tf:
                    if member.name.endswith(".jpg"):
                        f = tf.extractfile(member)
                        assert f is not None
                        with Image.open(f) as im:
                            if a.one == "pil-1/8":
                                im.draft("RGB", (im.width // 8, im.height // 8))
                            im.convert("RGB")
                        n += 1
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    import dissect_dist

    return {"samples": n, "wall_s": wall, "cpu_s": cpu, "code": dissect_dist.__file__}


def resume_cost(a) -> dict[str, Any]:
    """Resuming ours at 25%, 50% and 90% of an epoch (a new loader, load_state_dict, the
    first batch) against reading up to that point: the first is flat in the cursor (it
    reads nothing before it), the second grows with it."""
    import torch

    torch.set_num_threads(1)
    from dissect_dist.data import Manifest
    from dissect_dist.data.decode import ImagePlan

    m = Manifest.load(str(Path(a.data) / "manifest.json"))
    pre, tok = _transform_and_tokenizer()
    plan = ImagePlan.from_transform(pre)
    out: dict[str, Any] = {"at": []}
    for frac in (0.25, 0.5, 0.9):
        # Both clocks stop when the batch arrives, before the loader's iterator is
        # dropped (dropping it joins the workers: a cost of stopping, not of reading).
        first = _loader(a, m, plan, tok, a.token_cache)
        stop = max(1, int(frac * len(first)))
        t0 = time.perf_counter()
        it = iter(first)
        for _ in range(stop):
            next(it)
        t_read = time.perf_counter() - t0
        state = first.state_dict()
        del it, first
        t0 = time.perf_counter()
        resumed = _loader(a, m, plan, tok, a.token_cache)
        resumed.load_state_dict(state)
        it = iter(resumed)
        next(it)
        t_resume = time.perf_counter() - t0
        del it, resumed
        out["at"].append({"fraction": frac, "batches_read": stop, "read_s": t_read,
                          "resume_to_first_batch_s": t_resume, "ratio": t_resume / t_read})
    last = out["at"][-1]  # the 90% point, as before
    out.update(batches_read_to_90pct=last["batches_read"], read_to_90pct_s=last["read_s"],
               resume_to_first_batch_s=last["resume_to_first_batch_s"], ratio=last["ratio"],
               epoch_batches=len(_loader(a, m, plan, tok, a.token_cache)))
    return out


BEFORE = "e1efe2a"  # workers forked from the training process at every epoch start


def epoch_starts(a) -> dict[str, Any]:
    """One loader, `a.epochs` epochs, in this (fresh) process: seconds to the first batch
    of the first epoch (the loader's start) and of each later epoch, and epoch walls."""
    import torch

    torch.set_num_threads(1)
    from dissect_dist.data import Manifest
    from dissect_dist.data.decode import ImagePlan

    m = Manifest.load(str(Path(a.data) / "manifest.json"))
    if a.set == "demo":
        from dissect_dist import model as modellib

        _, pre, _, tok = modellib.create("tiny-vit-28", None)
        plan = ImagePlan.from_transform(pre, resampling="exact")
    else:
        pre, tok = _transform_and_tokenizer()
        plan = ImagePlan.from_transform(pre)
    from dissect_dist.data import WebDatasetLoader

    loader = WebDatasetLoader(m, rank=0, world_size=a.world, batch_size=a.batch_size, seed=0,
                              preprocess=plan, tokenizer=tok, num_workers=a.workers,
                              token_cache=a.token_cache)
    first, walls = [], []
    for _ in range(a.epochs):
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first.append(time.perf_counter() - t0)
        for _ in it:
            pass
        walls.append(time.perf_counter() - t0)
    return {"start_s": first[0], "epoch_start_s": first[1:], "epoch_wall_s": walls[1:],
            "batches": len(loader), "code": __import__("dissect_dist").__file__}


def epoch_start_table(a) -> None:
    if __package__:
        from benchmarks import common
    else:
        import common  # type: ignore[no-redef]
    sets = {"demo": str(REPO / "data" / "fmnist-500-noise0.4" / "train"), "photos": a.data}
    if not (Path(sets["demo"]) / "manifest.json").exists():
        from dissect_dist.data.builders import build_fashion_mnist

        build_fashion_mnist(str(Path(sets["demo"]).parent), noise=0.4, seed=0, subset=500)
    if not (Path(a.data) / "manifest.json").exists():
        from dissect_dist.data.photos import build_photos

        build_photos(a.data, samples=a.samples, seed=0)
    shape = {"demo": ("32", "2"), "photos": (str(a.batch_size), "1")}  # batch, world
    res: dict[str, Any] = {"command": "python benchmarks/loader_throughput.py "
                           + " ".join(sys.argv[1:]),
                           "machine": {**common.machine_info(),
                                       "date": time.strftime("%Y-%m-%d %H:%M")},
                           "workers": a.workers, "epochs": a.epochs, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        res["before"] = _baseline(a.before, tmp)
        code = {"ours": str(REPO), "before": tmp}
        for name, data in sets.items():
            bs, world = shape[name]
            extra = ["--epoch-starts-one", "--set", name, "--epochs", str(a.epochs),
                     "--world", world]
            b = argparse.Namespace(**{**vars(a), "data": data, "batch_size": int(bs),
                                      "token_cache": str(Path(tmp) / f"tokens-{name}")})
            _run(b, "ours", code["ours"], extra)  # fills the token cache
            runs: dict[str, list[dict]] = {"ours": [], "before": []}
            for _ in range(a.repeats):
                for c in runs:
                    runs[c].append(_run(b, "ours", code[c], extra))
            res["sets"][name] = {"data": data, "batch_size": int(bs), "world": int(world),
                                 "runs": runs}
            for c, rs in runs.items():
                print(f"| {name} | {c} | {statistics.median(r['start_s'] for r in rs):.3f} | "
                      f"{statistics.median(x for r in rs for x in r['epoch_start_s']):.3f} | "
                      f"{statistics.median(x for r in rs for x in r['epoch_wall_s']):.3f} | "
                      f"{rs[0]['batches']} |", flush=True)
    common.write_json(Path(a.out), res)
    print(f"wrote {a.out}")


def _baseline(ref: str, into: str) -> str:
    """The package of git revision `ref`, extracted into `into` (no checkout touched)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    arch = subprocess.run(["git", "-C", str(REPO), "archive", sha, "dissect_dist", "store"],
                          check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=arch, check=True)
    return sha


def _run(a, config: str, code: str, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", config, "--data", a.data,
           "--workers", str(a.workers), "--batch-size", str(a.batch_size),
           "--token-cache", a.token_cache, *(extra or [])]
    env = {**os.environ, "PYTHONPATH": code}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=3000, help="pairs in the photos set")
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of all configs")
    p.add_argument("--data", default="",
                   help="the photos set (built here when absent; default "
                   "data/bench-photos-<samples>)")
    p.add_argument("--baseline", default=BASELINE,
                   help="git revision whose loader is `main` (default: the loader before the "
                   "fast path)")
    p.add_argument("--token-cache", default="", help="token cache directory (default: temp)")
    p.add_argument("--one", choices=CONFIGS + ("resume",), help=argparse.SUPPRESS)
    p.add_argument("--epoch-starts", action="store_true",
                   help="measure loader and epoch start times instead (see above)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per --epoch-starts run")
    p.add_argument("--before", default=BEFORE,
                   help="git revision of the loader compared with --epoch-starts")
    p.add_argument("--epoch-starts-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--set", default="photos", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help="result JSON")
    a = p.parse_args()
    a.data = a.data or str(REPO / "data" / f"bench-photos-{a.samples}")
    a.out = a.out or str(REPO / "benchmarks" / "results" / (
        "loader_epoch_start.json" if a.epoch_starts else "loader_throughput.json"))
    if a.epoch_starts_one:
        print(json.dumps(epoch_starts(a)))
        return
    if a.epoch_starts:
        epoch_start_table(a)
        return
    if a.one == "resume":
        print(json.dumps(resume_cost(a)))
        return
    if a.one:
        print(json.dumps(one(a)))
        return
    # Not at import: the timed subprocesses (above) run this file against another
    # revision's package (`main`), which need not have what benchmarks/common.py imports.
    if __package__:
        from benchmarks import common
    else:  # run as a file: python benchmarks/loader_throughput.py
        import common  # type: ignore[no-redef]
    if not (Path(a.data) / "manifest.json").exists():
        from dissect_dist.data.photos import build_photos

        print(f"[loader_throughput] building {a.samples} photo pairs in {a.data}", flush=True)
        print(build_photos(a.data, samples=a.samples, seed=0), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        a.token_cache = a.token_cache or str(Path(tmp) / "tokens")
        base_sha = _baseline(a.baseline, tmp)
        code = {c: str(REPO) for c in CONFIGS}
        code["main"] = tmp
        cold = _run(a, "ours", code["ours"])  # fills the token cache: reported, not compared
        print(f"  cold (token cache filled): ours {cold['samples'] / cold['wall_s']:.0f} "
              "samples/s", flush=True)
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for r in range(a.repeats):  # alternate, so drift hits all alike
            for c in CONFIGS:
                runs[c].append(_run(a, c, code[c]))
            print(f"  round {r}: " + ", ".join(
                f"{c} {runs[c][-1]['samples'] / runs[c][-1]['wall_s']:.0f}/s "
                f"({runs[c][-1]['samples'] / runs[c][-1]['cpu_s']:.0f}/cpu-s)"
                for c in CONFIGS), flush=True)
        resume = _run(a, "resume", code["ours"])
    table = {}
    for c in CONFIGS:
        workers = 1 if c.startswith("pil") else a.workers
        wall = [x["samples"] / x["wall_s"] for x in runs[c]]
        core = [x["samples"] / x["cpu_s"] for x in runs[c]]
        table[c] = {"samples_per_s": wall, "per_core": core,
                    "per_worker": [w / max(workers, 1) for w in wall],
                    "median_per_core": statistics.median(core),
                    "median_samples_per_s": statistics.median(wall), "processes": workers}
    ratio = {f"ours/{c}_per_core": table["ours"]["median_per_core"] / table[c]["median_per_core"]
             for c in CONFIGS if c != "ours"}
    res = {
        "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:]),
        "machine": {**common.machine_info(), "date": time.strftime("%Y-%m-%d %H:%M")},
        "data": a.data, "samples": runs["ours"][0]["samples"], "workers": a.workers,
        "batch_size": a.batch_size, "model_transform": MODEL, "baseline": base_sha,
        "cold_ours": cold, "runs": runs, "table": table, "ratios": ratio, "resume": resume,
    }
    common.write_json(Path(a.out), res)
    print("\n| loader | samples/s | per worker | per core (samples/CPU-s) |")
    print("|---|---|---|---|")
    for c in CONFIGS:
        t = table[c]
        print(f"| {c} | {t['median_samples_per_s']:.0f} | "
              f"{statistics.median(t['per_worker']):.0f} | {t['median_per_core']:.0f} |")
    print(f"\nours per core: {ratio['ours/main_per_core']:.2f}x main (target >= 2.5), "
          f"{ratio['ours/pil_per_core']:.2f}x decode-only PIL (target >= 1), "
          f"{ratio['ours/wds_per_core']:.2f}x webdataset, "
          f"{ratio['ours/ours-exact_per_core']:.2f}x ours with exact resampling; without "
          f"the normalisation (a GPU host's share) {1 / ratio['ours/ours-host_per_core']:.2f}x "
          f"ours, {table['ours-host']['median_per_core'] / table['pil']['median_per_core']:.2f}x "
          "decode-only PIL; with the decoding left to the device, the host's share "
          f"{table['device-host']['median_per_core'] / table['ours']['median_per_core']:.1f}x "
          "ours")
    floor = table["pil-1/8"]["median_per_core"]
    print(f"entropy-decoding floor (decode-only at 1/8 scale): {floor:.0f} per core = "
          f"{floor / table['pil']['median_per_core']:.2f}x decode-only PIL at full size; ours "
          f"reaches {table['ours']['median_per_core'] / floor:.2f}x of it")
    for x in resume["at"]:
        print(f"resume at {x['fraction']:.0%} of a {resume['epoch_batches']}-batch epoch: "
              f"{x['resume_to_first_batch_s']:.2f}s to the first batch vs {x['read_s']:.2f}s "
              f"reading up to it -> {x['ratio']:.3f}x (target <= 0.1)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
