"""Checkpoints that are complete or absent.

    RUN/checkpoints/step-000001200/   one tag: DeepSpeed's files (model, optimizer,
                                       scheduler), scores/ (store snapshot),
                                       rank-00000.pt ... (data cursor, selection state
                                       and RNG per rank), run.json, COMPLETE (last)
    RUN/checkpoints/latest             the newest COMPLETE tag, replaced atomically
    RUN/checkpoints/.step-000001200.new/  a checkpoint replacing the complete one at its
                                       step (the end of a run saves again at the step
                                       the loop saved), moved to its tag once complete

Tags are named as the store names its snapshots (store.persist.step_name).

A crash while writing leaves `latest` pointing at the previous complete tag; the torn
tag directory is cleared by the next save at that step.

A checkpoint that cannot be written (no space, an I/O error, a read-only directory) is
removed again and `save` raises CheckpointError on every rank with one message: the
path, the cause, the tag that is still `latest`, and how to go on. Before writing, every
rank checks the free space against an estimate of the whole checkpoint, which catches a
full disk before anything is written; a write that fails anyway (the disk filled up
meanwhile) is reported the same way. No rank raises out of the middle of a collective
write: each rank records its error, goes through the same collectives as the others, and
the errors are gathered after the writes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from store import persist
from store.persist import SnapshotError, atomic_write, step_name, step_of

COMPLETE = "COMPLETE"
_STAGED = re.compile(r"\.(step-\d+)\.new")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written. Raised on every rank with the same message;
    the previous complete checkpoint is still `latest`."""


def save(root: str, step: int, engine: Any, store: Any, rank_state: dict[str, Any],
         run_info: dict[str, Any], keep: int) -> str:
    """Collective. Returns the tag written, or raises CheckpointError on every rank."""
    rank = dist.get_rank()
    tag = step_name(step)
    tag_dir = Path(root) / tag
    rank_bytes = _to_bytes(rank_state)
    need = estimate_bytes(engine, store, len(rank_bytes), rank, _block_size(Path(root)))

    # Rank 0 clears debris of an interrupted save and creates the directory to write; then
    # every rank checks its free space against the whole checkpoint's estimate. A complete
    # checkpoint at this step (the end of a run saves again at the step the loop just
    # saved) stays in place, and `latest`, until its replacement is complete: the
    # replacement is written beside it.
    head: tuple[str | None, bool, str | None] = (None, False, None)
    if rank == 0:
        replacing = (tag_dir / COMPLETE).exists()
        out = _staging(tag_dir) if replacing else tag_dir
        head = (_read_latest(Path(root)), replacing, _attempt(_make_tag_dir, out))
    previous, replacing, prep_error = _broadcast(head)
    out = _staging(tag_dir) if replacing else tag_dir
    report = _Report(str(tag_dir), step, previous)
    if prep_error is not None:
        raise CheckpointError(report.message(f"rank 0: {prep_error}", removed=None))
    space = _gather((need, _free_bytes(out)))
    needed = sum(n for n, _ in space)
    free = min(f for _, f in space)
    if needed > free:
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)  # still empty
        raise CheckpointError(report.message(
            f"no space: {_size(free)} free, about {_size(needed)} needed (checked before "
            "writing)", removed=None, free=free, needed=needed))

    fault: _Fault | None = None
    try:
        store.save(str(out / "scores"), step)
    except SnapshotError as e:  # raised on every rank alike, naming the failed ranks
        fault = _Fault.of(e, None, out, need)
    if fault is None:
        try:
            atomic_write(out / f"rank-{rank:05d}.pt", rank_bytes)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            fault = _Fault.of(e, rank, out, need)
        with _DeepSpeedWrites(engine, rank, out, need) as ds:
            engine.save_checkpoint(root, tag=out.name, client_state={"step": step},
                                   save_latest=False)
        fault = fault or ds.fault
    faults = list(dict.fromkeys(f for f in _gather(fault) if f is not None))
    if faults:
        _fail(report, faults, out, needed)

    final: _Fault | None = None
    if rank == 0:
        info = {**run_info, "step": step, "world_size": dist.get_world_size(),
                "param_layout": LAYOUT,
                "saved_unix": time.time(), "bytes_estimate": needed}
        try:
            (out / "run.json").write_text(json.dumps(info, indent=1))
            atomic_write(out / COMPLETE, b"ok\n")
            atomic_write(Path(root) / "latest", out.name.encode())
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            final = _Fault.of(e, 0, out, need)
            (Path(root) / "latest.tmp").unlink(missing_ok=True)
        else:
            if replacing:
                _replace(tag_dir, out)
            _prune(Path(root), keep)
    final = _broadcast(final)
    if final is not None:  # `latest` was not replaced
        _fail(report, [final], out, needed)
    return tag


def _staging(tag_dir: Path) -> Path:
    return tag_dir.with_name(f".{tag_dir.name}.new")


def _replace(tag_dir: Path, staged: Path) -> None:
    """Rank 0, once `latest` names the complete staged copy: move it to its tag. Between
    the rename and the last write `latest` names a staged copy that is gone; latest()
    reads that as the tag."""
    try:
        shutil.rmtree(tag_dir)
        os.rename(staged, tag_dir)
        atomic_write(tag_dir.parent / "latest", tag_dir.name.encode())
    except OSError as e:  # the staged copy is complete and `latest`: nothing is lost
        print(f"checkpoint {staged} is complete and latest, but could not be moved to "
              f"{tag_dir.name} ({_one_line(e)}); --resume latest uses it as it is",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- write failures
# Per file: a zip entry and pickle record per tensor storage, and the pickled non-tensor
# fields (DeepSpeed's config, parameter names and shapes).
TENSOR_RECORD = 512
FILE_FIELDS = 64 << 10


def estimate_bytes(engine: Any, store: Any, rank_state_bytes: int, rank: int,
                   block: int = 4096) -> int:
    """An upper estimate of the bytes this rank writes for one checkpoint.

    DeepSpeed's files are pickled state dicts: the bytes of every distinct tensor storage
    they hold (torch.save writes whole storages), plus TENSOR_RECORD per storage and
    FILE_FIELDS per file. The model file (the data-parallel writer rank) holds the module's
    state and, without ZeRO, the optimizer's state; with ZeRO each rank's optimizer file
    holds its fp32 master partition and that partition's optimizer state. The score store
    part is persist.write_bytes_bound (values taken as incompressible); the rank state is
    its exact pickled size; rank 0 adds run.json, COMPLETE and `latest`. Every file is
    rounded up to the filesystem block, and the whole gets a 2% margin.
    Calibration (tiny-vit-28, 2 CPU ranks; tests/test_trainer.py checks the first):
    fp32 ZeRO 0 41.32 MB written, 42.39 MB estimated (1.026x); fp32 ZeRO 1 55.00 MB,
    56.39 MB (1.025x); bf16 ZeRO 0 48.23 MB, 49.38 MB (1.024x).
    """
    model_file = bool(getattr(engine, "save_non_zero_checkpoint", rank == 0))
    zero_file = bool(getattr(engine, "save_zero_checkpoint", False))
    zero = bool(engine.zero_optimization()) if hasattr(engine, "zero_optimization") else False
    files: list[tuple[int, int]] = []  # (bytes, storages) of each DeepSpeed file written here
    seen: set[int] = set()
    if model_file:
        files.append(_tensor_bytes(engine.module.state_dict(), seen))
    opt = _optimizer_bytes(engine.optimizer, seen)
    if model_file and not zero:
        files[0] = (files[0][0] + opt[0], files[0][1] + opt[1])
    if zero_file:
        files.append(opt)
    deepspeed = sum(b + TENSOR_RECORD * n + FILE_FIELDS + block for b, n in files)
    scores = persist.write_bytes_bound(store.layout, store.lo, store.hi, commits=rank == 0,
                                       block=block)
    own = rank_state_bytes + block + (3 * block + (16 << 10) if rank == 0 else 0)
    return int((deepspeed + scores + own) * 1.02)


def _tensor_bytes(obj: Any, seen: set[int]) -> tuple[int, int]:
    """(bytes, count) of the distinct tensor storages reachable from obj not yet in seen."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0, 0
        seen.add(storage.data_ptr())
        return storage.nbytes(), 1
    items: Any = ()
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    b = n = 0
    for x in items:
        xb, xn = _tensor_bytes(x, seen)
        b, n = b + xb, n + xn
    return b, n


def _optimizer_bytes(optimizer: Any, seen: set[int]) -> tuple[int, int]:
    """The torch optimizer inside DeepSpeed's wrappers: its state, and its parameters where
    they are not the model's (ZeRO's and the bf16 optimizer's fp32 master partitions)."""
    opt = optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    if opt is None:
        return 0, 0
    state = _tensor_bytes(list(opt.state.values()), seen)
    masters = _tensor_bytes([g["params"] for g in opt.param_groups], seen)
    return state[0] + masters[0], state[1] + masters[1]


def _block_size(root: Path) -> int:
    try:
        return int(os.statvfs(_existing(root)).f_frsize) or 4096
    except OSError:
        return 4096


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int:
    """Bytes a non-root writer may still use on the filesystem holding path
    (UNKNOWN where the filesystem cannot tell)."""
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return UNKNOWN
    return int(st.f_bavail * st.f_frsize)


UNKNOWN = 1 << 62


def _size(n: int) -> str:
    if n >= UNKNOWN:
        return "an unknown amount"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _make_tag_dir(tag_dir: Path) -> None:
    if tag_dir.exists():
        shutil.rmtree(tag_dir)  # debris of an interrupted save at this step
    tag_dir.mkdir(parents=True)


def _attempt(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported on every rank by the caller
        return _one_line(e)
    return None


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except OSError:
        return None


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class _Fault:
    """The first error of one rank's writes (rank None: of a collective write that failed
    on every rank alike), and whether it means the disk is full."""

    rank: int | None
    error: str
    no_space: bool

    @classmethod
    def of(cls, e: BaseException, rank: int | None, tag_dir: Path, need: int) -> _Fault:
        return cls(rank, _one_line(e), _is_no_space(e, _free_bytes(tag_dir), need))

    def __str__(self) -> str:
        return self.error if self.rank is None else f"rank {self.rank}: {self.error}"


def _is_no_space(e: BaseException, free: int, need: int) -> bool:
    """ENOSPC/EDQUOT, also when a layer turned the OSError into text (the store's gathered
    errors). torch.save's C++ writer loses the errno ("unexpected pos", "file write
    failed"): such an error is taken for a full disk when less than this rank's share of
    the checkpoint is free right after it."""
    x: BaseException | None = e
    while x is not None:
        if isinstance(x, OSError) and x.errno is not None:
            return x.errno in (errno.ENOSPC, errno.EDQUOT)
        x = x.__cause__ or x.__context__
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT):
        if f"[Errno {code}]" in text:
            return True
    if "[Errno " in text:
        return False
    return free < need


class _Report:
    """The one message every rank raises for a checkpoint that was not written."""

    def __init__(self, path: str, step: int, previous: str | None) -> None:
        self.path, self.step, self.previous = path, step, previous

    def message(self, cause: str, *, removed: str | None, free: int | None = None,
                needed: int | None = None) -> str:
        if self.previous:
            kept = f"latest is still {self.previous} (complete)"
        else:
            kept = "no earlier checkpoint exists (--resume latest starts from scratch)"
        if free is not None and needed is not None and needed > free:
            todo = f"free at least {_size(needed - free)} on that filesystem"
        elif free is not None:
            todo = "free space on that filesystem"
        else:
            todo = "fix the cause"
        return (f"checkpoint {self.path} not written: {cause}. Nothing lost: {kept}"
                f"{removed or ''}. Training stopped at step {self.step}: {todo}, then rerun "
                "with --resume latest.")


def _fail(report: _Report, faults: list[_Fault], tag_dir: Path, needed: int) -> None:
    """Collective: rank 0 removes the torn tag, every rank raises the same CheckpointError."""
    outcome: tuple[str | None, int] = (None, 0)
    if dist.get_rank() == 0:
        removed = _attempt(shutil.rmtree, tag_dir)
        outcome = (removed, _free_bytes(tag_dir))
    removal_error, free = _broadcast(outcome)
    if removal_error is None:
        removed = f"; the partial {tag_dir.name} was removed"
    else:
        removed = (f"; the partial {tag_dir.name} could not be removed ({removal_error}): "
                   "it is never loaded, delete it by hand")
    errors = "; ".join(str(f) for f in faults[:3])
    if len(faults) > 3:
        errors += f"; and {len(faults) - 3} more ranks"
    if any(f.no_space for f in faults):
        cause = (f"no space while writing ({errors}): {_size(free)} free now, about "
                 f"{_size(needed)} needed")
        raise CheckpointError(report.message(cause, removed=removed, free=free,
                                             needed=needed))
    raise CheckpointError(report.message(errors, removed=removed))


class _DeepSpeedWrites:
    """Within `with`, DeepSpeed's file writes on this rank record their first exception
    instead of raising it (later writes of the same checkpoint are skipped).

    engine.save_checkpoint (DeepSpeed 0.19.8) runs collectives around its writes: a
    barrier after rank 0 creates the save dir, two all_reduces of the tag's hash, and a
    barrier at the end. Its writes go through checkpoint_engine.makedirs and .save (the
    model file on the data-parallel writer, each rank's ZeRO optimizer file) and, with
    ZeRO, rank 0's _copy_recovery_script. A rank that raised out of one of them would
    leave the others in the final barrier ("Connection closed by peer", or a hang); with
    the guard every rank goes through the whole call, and the errors are gathered after it.
    """

    def __init__(self, engine: Any, rank: int, tag_dir: Path, need: int) -> None:
        self.engine, self.rank, self.tag_dir, self.need = engine, rank, tag_dir, need
        self.fault: _Fault | None = None
        self._patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> _DeepSpeedWrites:
        ce = getattr(self.engine, "checkpoint_engine", None)
        for obj, name in ((ce, "save"), (ce, "makedirs"), (self.engine, "_copy_recovery_script")):
            fn = getattr(obj, name, None) if obj is not None else None
            if fn is None:
                continue
            self._patched.append((obj, name, vars(obj).get(name)))
            setattr(obj, name, self._guard(fn))
        return self

    def _guard(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.fault is not None:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - gathered by save() after the call
                self.fault = _Fault.of(e, self.rank, self.tag_dir, self.need)
                return None

        return call

    def __exit__(self, *exc: object) -> None:
        for obj, name, own in reversed(self._patched):
            if own is None:
                delattr(obj, name)  # the class's method again
            else:
                setattr(obj, name, own)


def _to_bytes(obj: Any) -> bytes:
    import io

    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _prune(root: Path, keep: int) -> None:
    tags = sorted((step, p) for p in root.glob("step-*")
                  if (step := step_of(p.name)) is not None and (p / COMPLETE).exists())
    for _, old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    current = _read_latest(root)
    for staged in root.glob(".step-*.new"):  # debris of interrupted replacements
        if staged.name != current:
            shutil.rmtree(staged, ignore_errors=True)


def latest(root: str) -> str | None:
    p = Path(root) / "latest"
    if not p.exists():
        return None
    tag = p.read_text().strip()
    m = _STAGED.fullmatch(tag)
    if m and not (Path(root) / tag).exists() and (Path(root) / m[1] / COMPLETE).exists():
        tag = m[1]  # save() stopped between moving a staged copy to its tag and `latest`
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


# The ZeRO 1/2 flat layout a checkpoint's optimizer state is cut in: 1 = DeepSpeed's
# default (no padding between parameters, partitions in multiples of 2 elements); 2 =
# dissect_dist/engine.py's (parameters padded to 16 bytes, partitions in multiples of 8).
# A checkpoint of another layout is loaded per parameter, through the universal format.
LAYOUT = 2


def saved_layout(root: str, tag: str) -> int:
    return int(json.loads((Path(root) / tag / "run.json").read_text()).get("param_layout", 1))


UNIVERSAL = "universal"  # the tag's optimizer state re-cut for any world size


def per_parameter_reason(root: str, tag: str, zero_stage: int) -> str:
    """Why the engine state of `tag` must be loaded per parameter (through the universal
    format) into this world's ZeRO 1/2 engine, or "" when it loads as saved: ZeRO 1/2 cut
    the optimizer state by flat position, which only matches a checkpoint of the same world
    size and flat layout."""
    if zero_stage < 1:
        return ""
    if saved_world_size(root, tag) != dist.get_world_size():
        return "for another world size"
    if saved_layout(root, tag) != LAYOUT:
        return "written before parameters were aligned (checkpoint.LAYOUT)"
    return ""


def engine_config(ds_config: dict[str, Any], reason: str) -> dict[str, Any]:
    """The deepspeed config of an engine that will load a checkpoint for `reason`
    (per_parameter_reason): DeepSpeed reads the universal format only when told at
    initialize."""
    if not reason:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}),
                                        "load_universal": True}}


def load_engine(engine: Any, root: str, tag: str, reason: str) -> None:
    """Collective. Load the engine state of `tag`: as saved, or per parameter through the
    universal format when `reason` (per_parameter_reason) says why."""
    if reason:
        engine.load_checkpoint(universal_dir(root, tag, reason), tag=UNIVERSAL)
    else:
        engine.load_checkpoint(root, tag=tag)


def universal_dir(root: str, tag: str, why: str = "for another world size") -> str:
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
        print(f"[train] {tag}: converting the ZeRO optimizer state {why} "
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
            atomic_write(out / "DONE", b"ok\n")
    failed = [e for e in _gather(err) if e]
    if failed:
        raise RuntimeError(failed[0])
    return str(out)
