"""deepspeed launch/train.py --config launch/configs/<name>.yaml [section.key=value ...]

parse -> init -> build -> train -> close. The config (its values, the files it names and
the model name) is validated before DeepSpeed is imported: a bad one exits with status 2
and one line `config error: section.key: ...` on stderr. The DeepSpeed config is
generated from it unless --deepspeed_config.

Exit status: 0 done; 2 config error; 3 a checkpoint could not be written (every rank
prints why, and how to go on: the previous checkpoint is still `latest`); 4 a collective
failed or waited longer than train.collective_timeout_s (a host or the network between
hosts was lost): one line names the lost ranks and the last committed checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dissect_dist.config import ConfigError, load_config, validate_environment  # noqa: E402


def _release_cpu_comm_workspace() -> None:
    """DeepSpeed 0.19.8's CPU comm op maps a 66 MB /dev/shm segment per rank and never
    unlinks it: every launch leaked 132 MB (2 ranks) of RAM until /dev/shm filled memory.
    Unlink this rank's at exit (the other ranks' mappings stay valid). A run killed with
    SIGKILL still leaves its segments: rm /dev/shm/deepspeed_allreduce_buffer_*."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    rank = os.environ.get("LOCAL_RANK")
    if addr and port and rank is not None:
        name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


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
    ds_cfg = None
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            ds_cfg = json.load(f)

    from datetime import timedelta

    import deepspeed

    deepspeed.init_distributed(dist_backend=None,
                               timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    import torch.distributed as dist

    from dissect_dist.checkpoint import CheckpointError
    from dissect_dist.liveness import Heartbeat, is_comm_failure
    from dissect_dist.trainer import Trainer

    heartbeat = Heartbeat(dist.get_rank(), dist.get_world_size()) \
        if dist.get_world_size() > 1 else None
    try:
        trainer = Trainer(cfg, ds_cfg, resume=args.resume)
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
    except Exception as e:
        if heartbeat is None or not is_comm_failure(e):
            raise
        _lost(heartbeat, e, f"{cfg.train.run_dir}/checkpoints")
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        _release_cpu_comm_workspace()
    if trainer.rank == 0:
        print(json.dumps({"final": final, "step": trainer.step}), flush=True)
    # Left to interpreter teardown, the process group's C++ threads were sometimes
    # destroyed while joinable ("terminate called without an active exception", exit
    # 250 after a complete run: 1 launch in ~10 on CPU ranks).
    dist.destroy_process_group()
    return 0


def _lost(heartbeat: Any, e: BaseException, ckpt_root: str) -> NoReturn:
    """A collective failed: one line from one surviving rank, then exit 4 at once (the
    process group cannot be torn down cleanly with a peer gone)."""
    from dissect_dist import checkpoint

    verdict = heartbeat.diagnose()
    if verdict.report:
        rank = heartbeat.rank
        if verdict.lost is None:
            who = ("rank 0's host is unreachable (the rendezvous store at "
                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})")
        elif verdict.lost:
            who = f"lost rank(s) {', '.join(map(str, verdict.lost))} (no heartbeat)"
        else:
            who = "every rank still has a heartbeat: one is alive but did not join"
        try:
            tag = checkpoint.latest(ckpt_root)
            last = f"{ckpt_root}/{tag}" if tag else "none (a resume starts from scratch)"
        except Exception as err:  # noqa: BLE001 - the line must still be printed
            last = f"unknown ({err})"
        reason = " ".join(str(e).split())[:200]
        sys.stderr.write(f"[rank {rank}] collective failed: {who}; last committed "
                         f"checkpoint: {last}; restart every host with --resume latest "
                         f"(cause: {reason})\n")
        sys.stderr.flush()
    _release_cpu_comm_workspace()
    os._exit(4)


if __name__ == "__main__":
    sys.exit(main())
