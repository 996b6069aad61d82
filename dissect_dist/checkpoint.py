"""Checkpoints that are complete or absent.

    RUN/checkpoints/step-000000001200/   one tag: DeepSpeed's files (model, optimizer,
                                          scheduler), scores/ (store snapshot),
                                          rank-00000.pt ... (data cursor, selection state
                                          and RNG per rank), run.json, COMPLETE (last)
    RUN/checkpoints/latest                the newest COMPLETE tag, replaced atomically

A crash while writing leaves `latest` pointing at the previous complete tag; the torn
tag directory is cleared by the next save at that step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step-{step:09d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(root: str, step: int, engine: Any, store: Any, rank_state: dict[str, Any],
         run_info: dict[str, Any], keep: int) -> str:
    """Collective. Returns the tag written."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = Path(root) / tag
    if rank == 0:
        if tag_dir.exists():
            shutil.rmtree(tag_dir)  # debris of an interrupted save at this step
        tag_dir.mkdir(parents=True)
    dist.barrier()
    store.save(str(tag_dir / "scores"), step)
    buf = _to_bytes(rank_state)
    _atomic_write(tag_dir / f"rank-{rank:05d}.pt", buf)
    engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        info = {**run_info, "step": step, "world_size": dist.get_world_size(),
                "saved_unix": time.time()}
        (tag_dir / "run.json").write_text(json.dumps(info, indent=1))
        _atomic_write(tag_dir / COMPLETE, b"ok\n")
        _atomic_write(Path(root) / "latest", tag.encode())
        _prune(Path(root), keep)
    dist.barrier()
    return tag


def _to_bytes(obj: Any) -> bytes:
    import io

    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(root: str) -> str | None:
    p = Path(root) / "latest"
    if not p.exists():
        return None
    tag = p.read_text().strip()
    if not (Path(root) / tag / COMPLETE).exists():
        raise RuntimeError(f"{root}/latest names {tag}, which is not complete: the "
                           "checkpoint directory was edited by hand; point --resume at a tag")
    return tag


def resolve(root: str, resume: str) -> str | None:
    """`latest`, a tag name, or a tag directory path -> tag (None: nothing to resume)."""
    if resume == "latest":
        return latest(root)
    tag = Path(resume).name
    if not (Path(root) / tag / COMPLETE).exists():
        raise RuntimeError(f"--resume {resume}: {root}/{tag} is not a complete checkpoint")
    return tag


def load_rank_state(root: str, tag: str, rank: int, world_size: int) -> dict[str, Any]:
    info = json.loads((Path(root) / tag / "run.json").read_text())
    path = Path(root) / tag / f"rank-{rank:05d}.pt"
    if not path.exists():
        path = Path(root) / tag / "rank-00000.pt"  # more ranks than saved: rank 0's view
    state: dict[str, Any] = torch.load(path, weights_only=False)
    state["saved_world_size"] = info["world_size"]
    return state


def saved_world_size(root: str, tag: str) -> int:
    return int(json.loads((Path(root) / tag / "run.json").read_text())["world_size"])


UNIVERSAL = "universal"  # the tag's optimizer state re-cut for any world size


def universal_dir(root: str, tag: str) -> str:
    """Collective. The tag converted to DeepSpeed's universal checkpoint format, made once
    by rank 0 under <root>/<tag>/universal/ (DONE written last; an interrupted conversion
    is redone). ZeRO 1/2 partition the optimizer state over the saving world and DeepSpeed
    refuses to load it into another; the universal format holds each parameter's state
    whole. Returns the load_dir to pass with tag=UNIVERSAL."""
    base = Path(root) / tag
    out = base / UNIVERSAL
    err = None
    if dist.get_rank() == 0 and not (out / "DONE").exists():
        shutil.rmtree(out, ignore_errors=True)
        print(f"[train] {tag}: converting the ZeRO optimizer state for another world size "
              f"(deepspeed.checkpoint.ds_to_universal -> {out})", flush=True)
        r = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(base), "--output_folder", str(out / UNIVERSAL), "--num_extract_workers", "1",
             "--num_merge_workers", "1", "--inject_missing_state"],
            capture_output=True, text=True)
        if r.returncode != 0:
            err = (f"converting {base} to DeepSpeed's universal format failed "
                   f"(exit {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
        else:
            _atomic_write(out / "DONE", b"ok\n")
    errs = [None]
    if dist.get_world_size() > 1:
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
    else:
        errs = [err]
    failed = [e for e in errs if e]
    if failed:
        raise RuntimeError(failed[0])
    return str(out)
