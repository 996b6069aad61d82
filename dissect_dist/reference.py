"""A reference model's score of every pair of a manifest, scored once, as a score-store
snapshot: what the `learnability` and `reference_filter` strategies read
(selection.reference). `deepspeed launch/score.py` runs it on every rank.

Each rank scores the manifest's shards s with s % world == rank, in order, with the
model in eval mode and no gradient: CLIPScore = max(100 cos, 0) of the pair, as the
training step scores (NaN where a sample cannot be decoded). Each finished shard's
scores are written whole (atomically) under OUT.parts/, so a killed job resumes from
its finished shards. When every shard is scored, the ranks assemble a score store from
the parts (each rank its own id range) and save it to OUT as step 0: fp16, the store's
id-range layout, COMMIT.json naming the model (path, architecture, sha256), the manifest
(path and fingerprint) and what the scores cost (`flops_scoring`: the pairs scored x one
pair's forward, compute.py; `flops_model`: the FLOPs that trained the model, from the
metrics.jsonl of the run that exported it, or given). A snapshot or a parts directory
made from another model or manifest is refused, never mixed in."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from dissect_dist import compute
from dissect_dist import model as modellib
from dissect_dist.config import RunConfig
from dissect_dist.data import Manifest
from dissect_dist.data.loader import ShardReader, decode_sample
from store import Collective, ScoreStore, SnapshotError, SnapshotLocation
from store.persist import atomic_write

KIND = "reference_scores"


class ReferenceError(ValueError):
    """A reference snapshot (or its parts) that belongs to another model or manifest."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_training_flops(model_path: str) -> float | None:
    """The FLOPs of the run that exported `model_path` (RUN/open_clip_model.pt): the last
    train row's flops_total in RUN/metrics.jsonl; None when there is none."""
    metrics = Path(model_path).parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    last = None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row.get("kind") == "train" and "flops_total" in row:
            last = float(row["flops_total"])
    return last


def identity(cfg: RunConfig, model_path: str) -> dict[str, Any]:
    """What a reference snapshot must match: the model and the manifest."""
    return {"kind": KIND, "model": model_path, "model_name": cfg.model.name,
            "model_sha256": file_sha256(model_path), "manifest": cfg.data.train_manifest,
            "manifest_fingerprint": Manifest.load(cfg.data.train_manifest).fingerprint()}


def _mismatch(where: str, have: dict[str, Any], want: dict[str, Any]) -> str | None:
    for key in ("kind", "model_name", "model_sha256", "manifest_fingerprint"):
        if have.get(key) != want[key]:
            return (f"{where} holds scores of {key} {have.get(key)!r}, this job's is "
                    f"{want[key]!r}: give another --out, or remove it to score anew")
    return None


def score_manifest(cfg: RunConfig, model_path: str, out: str, comm: Collective,
                   device: torch.device, *, flops_model: float | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Collective. Score every pair of cfg.data.train_manifest with the open_clip
    checkpoint `model_path` (architecture cfg.model.name) into a snapshot at `out`;
    returns its COMMIT.json's `extra`. Resumes from OUT.parts; refuses (ReferenceError,
    on every rank) a snapshot or parts of another model or manifest. An existing
    snapshot of the same model and manifest is kept as it is."""
    rank, world = comm.rank, comm.world_size
    want = identity(cfg, model_path)
    loc = SnapshotLocation(out)
    found: dict[str, Any] | str | None = None
    if rank == 0:
        try:
            found = dict(loc.read_commit(0).extra)
        except SnapshotError:
            found = None
    found = comm.broadcast_object(found, src=0)
    if isinstance(found, dict):
        bad = _mismatch(out, found, want)
        if bad:
            raise ReferenceError(bad)
        log(f"[score] {out} already holds this model's scores of this manifest: nothing to do")
        return found
    fs, parts = fsspec.core.url_to_fs(out.rstrip("/") + ".parts")
    err = None
    if rank == 0:
        meta = posixpath.join(parts, "META.json")
        fs.makedirs(parts, exist_ok=True)
        if fs.exists(meta):
            err = _mismatch(f"{out}.parts", json.loads(fs.cat_file(meta)), want)
        else:
            atomic_write(meta, json.dumps(want).encode(), fs)
    err = comm.broadcast_object(err, src=0)
    if err:
        raise ReferenceError(err)

    manifest = Manifest.load(cfg.data.train_manifest)
    model, _, pre_eval, tokenizer = modellib.create(cfg.model.name, model_path,
                                                    attention=cfg.model.attention)
    row = compute.count_row_cost(model, *modellib.blank_row(
        pre_eval, tokenizer, torch.device("cpu"), torch.float32))
    dtype = torch.bfloat16 if cfg.model.precision == "bf16" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    autocast = torch.bfloat16 if cfg.model.precision == "amp_bf16" else None
    mine = list(range(rank, len(manifest.urls), world))
    reader = ShardReader(manifest)
    t0, done_pairs = time.perf_counter(), 0
    try:
        for i, s in enumerate(mine):
            path = posixpath.join(parts, f"shard-{s:06d}.npy")
            if fs.exists(path):
                continue  # finished before a restart (written whole or not at all)
            scores = _score_shard(model, reader, s, int(manifest.counts[s]), pre_eval,
                                  tokenizer, cfg.data.batch_size, device, dtype, autocast)
            buf = io.BytesIO()
            np.save(buf, scores)
            atomic_write(path, buf.getvalue(), fs)
            done_pairs += scores.size
            rate = done_pairs / max(time.perf_counter() - t0, 1e-9)
            log(f"[score] rank {rank}: shard {s} done ({i + 1}/{len(mine)} of this rank's "
                f"shards, {rate:.0f} pairs/s)")
    finally:
        reader.close()
    comm.barrier()

    store = ScoreStore(manifest.total, comm, device="cpu")
    offsets = manifest.offsets
    for s in range(len(manifest.urls)):
        a, b = int(offsets[s]), int(offsets[s] + manifest.counts[s])
        lo, hi = max(a, store.lo), min(b, store.hi)
        if lo >= hi:
            continue
        vals = np.load(io.BytesIO(fs.cat_file(posixpath.join(parts, f"shard-{s:06d}.npy"))))
        if vals.shape != (b - a,):
            raise ReferenceError(f"{out}.parts/shard-{s:06d}.npy holds {vals.shape} scores, "
                                 f"the manifest says {b - a}: remove it and run again")
        store.values[lo - store.lo:hi - store.lo] = torch.from_numpy(vals[lo - a:hi - a])
    scored = int(sum(comm.all_gather_object(int(torch.isfinite(store.values).sum()))))
    trained = flops_model if flops_model is not None else model_training_flops(model_path)
    extra = {**want, "pairs": manifest.total, "pairs_scored": scored,
             "flops_scoring": float(scored * row.score), "flops_model": float(trained or 0.0),
             "flops_model_known": trained is not None, "row_flops": row.to_dict()}
    store.save(loc, 0, extra=extra)
    if rank == 0:
        fs.rm(parts, recursive=True)
    log(f"[score] {out}: {scored} of {manifest.total} pairs scored "
        f"({extra['flops_scoring']:.3e} FLOPs of scoring)")
    return extra


@torch.no_grad()
def _score_shard(model: Any, reader: ShardReader, shard: int, count: int, pre: Any,
                 tokenizer: Any, batch: int, device: torch.device, dtype: torch.dtype,
                 autocast: torch.dtype | None) -> np.ndarray:
    """(count,) fp16 CLIPScores of the shard's samples in position order (NaN: unreadable)."""
    out = np.full(count, np.nan, dtype=np.float16)
    pos: list[int] = []
    images: list[torch.Tensor] = []
    caps: list[str] = []

    def flush() -> None:
        if not pos:
            return
        img = torch.stack(images).to(device=device, dtype=dtype)
        with modellib.autocast(device, autocast):
            fi, ft = modellib.encode(model, img, tokenizer(caps).to(device))
        out[pos] = modellib.clipscore(fi, ft).cpu().numpy().astype(np.float16)
        pos.clear()
        images.clear()
        caps.clear()

    for p in range(count):
        key, members = reader.read(shard, p)
        if not key:
            continue
        assert isinstance(members, dict)
        got = decode_sample(members, pre)
        if isinstance(got, str):
            continue
        pos.append(p)
        images.append(got[0])
        caps.append(got[1])
        if len(pos) == batch:
            flush()
    flush()
    return out
