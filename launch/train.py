"""deepspeed launch/train.py --config launch/configs/<name>.yaml [section.key=value ...]

parse -> init -> build -> train -> close. The config (its values, the files it names and
the model name) is validated before DeepSpeed is imported: a bad one exits with status 2
and one line `config error: section.key: ...` on stderr. The DeepSpeed config is
generated from it unless --deepspeed_config.

Exit status: 0 done; 2 config error (or train.run_dir holds checkpoints and no --resume
was given); 3 a checkpoint could not be written (every rank
prints why, and how to go on: the previous checkpoint is still `latest`); 4 a collective
failed or waited longer than train.collective_timeout_s (a host or the network between
hosts was lost, or a rank stopped making progress): one line names the lost ranks, or the
ranks that made no progress with their last step and phase, and the last committed
checkpoint; 5 a data worker produced no batch within data.worker_timeout_s: one line names
the rank, the worker and the shard it was reading. On 4 and 5 every rank of the job ends,
on every host (dissect_dist/liveness.py). `kill -USR1 PID` prints every thread's stack of
a rank without stopping it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dissect_dist.config import ConfigError, load_config, validate_environment  # noqa: E402
from dissect_dist.launching import release_cpu_comm_workspace  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None, help="run config YAML")
    p.add_argument("--resume", default=None, help="'latest', or a checkpoint tag")
    p.add_argument("--deepspeed_config", default=None, help="use this DeepSpeed JSON instead")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        validate_environment(cfg)  # the files it names, the model name
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    latest = os.path.join(cfg.train.run_dir, "checkpoints", "latest")
    if args.resume is None and os.path.exists(latest):  # never start a run over by accident
        with open(latest) as f:
            tag = f.read().strip()
        print(f"config error: train.run_dir: {cfg.train.run_dir} already holds a run (latest "
              f"checkpoint {tag}): continue it with --resume latest, or set another "
              "train.run_dir", file=sys.stderr)
        return 2
    ds_cfg = None
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            ds_cfg = json.load(f)

    import faulthandler
    import signal
    from datetime import timedelta

    import deepspeed

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where is each thread?

    deepspeed.init_distributed(dist_backend=None,
                               timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    import torch.distributed as dist

    from dissect_dist.checkpoint import CheckpointError
    from dissect_dist.data import DataStalled
    from dissect_dist.liveness import Heartbeat, Where, is_comm_failure
    from dissect_dist.trainer import Trainer

    where = Where()
    heartbeat = Heartbeat(dist.get_rank(), dist.get_world_size(), where, on_abort=_end_now) \
        if dist.get_world_size() > 1 else None
    try:
        trainer = Trainer(cfg, ds_cfg, resume=args.resume, where=where)
        try:
            final = trainer.train()
        finally:
            trainer.close()
    except CheckpointError as e:  # raised on every rank at the same point
        dist.barrier()  # every progress bar has ended its line
        sys.stderr.write(f"[rank {dist.get_rank()}] {e}\n")  # one write: lines stay whole
        sys.stderr.flush()
        dist.barrier()  # the launcher kills the other ranks once one exits non-zero
        dist.destroy_process_group()
        return 3
    except DataStalled as e:  # this rank alone: the others wait for it in a collective
        line = f"[rank {dist.get_rank()}] {e}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if heartbeat is not None:
            heartbeat.abort(5, line)  # every other rank's heartbeat ends its process
        _end_now(5)
    except Exception as e:
        if heartbeat is None or not is_comm_failure(e):
            raise
        _lost(heartbeat, e, f"{cfg.train.run_dir}/checkpoints")
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        release_cpu_comm_workspace()
    if trainer.rank == 0:
        print(json.dumps({"final": final, "step": trainer.step}), flush=True)
    # Left to interpreter teardown, the process group's C++ threads were sometimes
    # destroyed while joinable ("terminate called without an active exception", exit
    # 250 after a complete run: 1 launch in ~10 on CPU ranks).
    dist.destroy_process_group()
    return 0


def _lost(heartbeat: Any, e: BaseException, ckpt_root: str) -> NoReturn:
    """A collective failed: one line from one surviving rank, then exit 4 at once (the
    process group cannot be torn down cleanly with a peer gone); the ranks that did not
    come end through the abort record (a stuck one after printing where it is)."""
    from dissect_dist import checkpoint

    verdict = heartbeat.diagnose()
    if verdict.report:
        try:
            tag = checkpoint.latest(ckpt_root)
            last = f"{ckpt_root}/{tag}" if tag else "none (a resume starts from scratch)"
        except Exception as err:  # noqa: BLE001 - the line must still be printed
            last = f"unknown ({err})"
        reason = " ".join(str(e).split())[:200]
        line = (f"[rank {heartbeat.rank}] collective failed: {verdict.who()}; last committed "
                f"checkpoint: {last}; restart every host with --resume latest "
                f"(cause: {reason})")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        heartbeat.abort(4, line, stuck=[s.rank for s in verdict.stuck])
    # A survivor's exit makes its launcher kill the host's other ranks: first give a stuck
    # rank's heartbeat (one beat per interval) the time to see the record and say where
    # it is; it then ends itself.
    time.sleep(2.5 * heartbeat.interval_s)
    _end_now(4)


def _end_now(status: int) -> NoReturn:
    """End this rank at once with `status` (from any thread: its main thread may be
    blocked in a collective or a read that will not return)."""
    sys.stderr.flush()
    release_cpu_comm_workspace()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
