"""checkpoint.save on 2 gloo ranks with a stand-in for DeepSpeed's engine that has the
shape of its save_checkpoint (barrier, tag-hash all_reduce, each rank's writes through
checkpoint_engine, barrier): a write that fails on one rank inside that call fails the
checkpoint on every rank without a hang, and a checkpoint rewritten at its own step stays
`latest` until its replacement is complete. The trainer-level runs on a full disk are
in tests/test_trainer.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dissect_dist import checkpoint
from store import ScoreStore, TorchDistributed

pytestmark = pytest.mark.multirank


class StandInCheckpointEngine:
    """The two methods of DeepSpeed's checkpoint engine that save_checkpoint writes through;
    `fail` makes this rank's file writes raise EIO."""

    fail = False

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        if self.fail:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        torch.save(state_dict, path)


class StandInEngine:
    """DeepSpeed 0.19.8's save_checkpoint, reduced to its collectives and its writes: rank 0
    writes the model file, every rank its ZeRO optimizer file."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(8, 8)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.checkpoint_engine = StandInCheckpointEngine()
        self.save_non_zero_checkpoint = dist.get_rank() == 0
        self.save_zero_checkpoint = True

    def zero_optimization(self) -> bool:
        return True

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool) -> bool:
        rank = dist.get_rank()
        if rank == 0:
            self.checkpoint_engine.makedirs(save_dir, exist_ok=True)
        dist.barrier()
        tag_hash = torch.tensor([len(tag)])
        dist.all_reduce(tag_hash)
        path = os.path.join(save_dir, tag)
        self.checkpoint_engine.makedirs(path, exist_ok=True)
        if self.save_non_zero_checkpoint:
            self.checkpoint_engine.save({"module": self.module.state_dict(), **client_state},
                                        os.path.join(path, "model.pt"))
        self.checkpoint_engine.save({"rank": rank}, os.path.join(path, f"optim-{rank}.pt"))
        dist.barrier()
        return True


def rp_checkpoint(ctx: dict[str, Any], root: str, step: int, marker: int,
                  fail_rank: int | None) -> str:
    """checkpoint.save on every rank; "" when written, else the CheckpointError's message."""
    if "ckpt_engine" not in ctx:
        ctx["ckpt_engine"] = StandInEngine()
        ctx["ckpt_store"] = ScoreStore(1000, TorchDistributed())
    engine = ctx["ckpt_engine"]
    engine.checkpoint_engine.fail = fail_rank == dist.get_rank()
    try:
        checkpoint.save(root, step, engine, ctx["ckpt_store"], {"marker": marker},
                        {"config": {}}, keep=2)
    except checkpoint.CheckpointError as e:
        return str(e)
    return ""


def _marker(root: Path, tag: str) -> int:
    return int(torch.load(root / tag / "rank-00001.pt", weights_only=False)["marker"])


def test_a_write_failing_on_one_rank_inside_deepspeeds_save_stops_every_rank(pools, tmp_path):
    pool = pools(2)
    assert pool.run(rp_checkpoint, str(tmp_path), 2, 1, None) == ["", ""]
    errs = pool.run(rp_checkpoint, str(tmp_path), 4, 2, 1)  # rank 1's optimizer file: EIO
    assert errs[0] == errs[1]  # one message, on every rank, and no rank hung
    assert f"checkpoint {tmp_path}/step-000000004 not written: rank 1: OSError: [Errno 5] " \
        "Input/output error" in errs[0]
    assert "latest is still step-000000002 (complete); the partial step-000000004 was " \
        "removed" in errs[0]
    assert "fix the cause, then rerun with --resume latest" in errs[0]
    assert checkpoint.latest(str(tmp_path)) == "step-000000002"
    assert not (tmp_path / "step-000000004").exists()
    # The ranks' collectives stayed in step: the next checkpoint is written.
    assert pool.run(rp_checkpoint, str(tmp_path), 6, 3, None) == ["", ""]
    assert checkpoint.latest(str(tmp_path)) == "step-000000006"


def test_a_checkpoint_rewritten_at_its_step_stays_latest_until_the_new_one_is_complete(
        pools, tmp_path):
    """The end of a run saves again at the step the loop just saved."""
    pool = pools(2)
    assert pool.run(rp_checkpoint, str(tmp_path), 2, 1, None) == ["", ""]
    errs = pool.run(rp_checkpoint, str(tmp_path), 2, 2, 0)  # rank 0's model file: EIO
    assert "latest is still step-000000002 (complete); the partial .step-000000002.new " \
        "was removed" in errs[0]
    assert checkpoint.latest(str(tmp_path)) == "step-000000002"
    assert _marker(tmp_path, "step-000000002") == 1  # the first one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000000002"]
    assert pool.run(rp_checkpoint, str(tmp_path), 2, 3, None) == ["", ""]
    assert checkpoint.latest(str(tmp_path)) == "step-000000002"
    assert _marker(tmp_path, "step-000000002") == 3  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000000002"]


def test_latest_reads_through_a_replacement_stopped_before_its_last_write(tmp_path):
    (tmp_path / "step-000000002").mkdir()
    (tmp_path / "step-000000002" / checkpoint.COMPLETE).write_text("ok\n")
    # The staged copy was moved to its tag; `latest` still names the staged copy.
    (tmp_path / "latest").write_text(".step-000000002.new")
    assert checkpoint.latest(str(tmp_path)) == "step-000000002"


def rp_fill_scores(ctx: dict[str, Any], step: int) -> None:
    """Distinct scores on every rank's range of the checkpoint's store."""
    store = ctx.setdefault("ckpt_store", ScoreStore(1000, TorchDistributed()))
    store.values.copy_(torch.arange(store.lo, store.hi, dtype=torch.float32) % 97 + step)


def test_a_checkpoint_written_with_twelve_digit_snapshot_names_still_resumes(pools, tmp_path):
    """Tags have always had 9 digits; the score snapshot inside a tag once had 12
    (scores/step-000000000002). Such a checkpoint is still latest, its rank state and scores
    load, and the next saves prune it in step order."""
    pool = pools(2)
    pool.run(rp_fill_scores, 2)
    assert pool.run(rp_checkpoint, str(tmp_path), 2, 1, None) == ["", ""]
    tag = tmp_path / "step-000000002"
    (tag / "scores" / "step-000000002").rename(tag / "scores" / "step-000000000002")

    assert checkpoint.resolve(str(tmp_path), "latest") == "step-000000002"
    assert checkpoint.load_rank_state(str(tmp_path), "step-000000002", 1, 2)["marker"] == 1
    scores = ScoreStore.load(str(tag / "scores"), n=1000)
    assert scores.loaded_record.step == 2
    want = torch.arange(1000, dtype=torch.float32) % 97 + 2
    assert torch.equal(scores.values, want.to(torch.float16))
    for step in (4, 6):
        assert pool.run(rp_checkpoint, str(tmp_path), step, step, None) == ["", ""]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step-000000004", "step-000000006"]


def test_pruning_keeps_the_newest_tags_by_step_whatever_their_width(tmp_path):
    for name in ("step-000000005", "step-999999999", "step-1000000000", "step-000000000007"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.COMPLETE).write_text("ok\n")
    checkpoint._prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000000", "step-999999999"]
