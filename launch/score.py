"""deepspeed launch/score.py --config CONFIG --model CKPT --out URL [section.key=value ...]

Score every pair of the config's data.train_manifest once with an open_clip checkpoint
(this project's RUN/open_clip_model.pt or open_clip's, architecture model.name) on every
rank, into a score-store snapshot at URL (a path, or any fsspec URL) that the
`learnability` and `reference_filter` strategies read (selection.reference=URL). A killed
job resumes where it stopped when started again with the same arguments; a snapshot of
another model or manifest at URL is refused. dissect_dist/reference.py says how.

Exit status: 0 done (or URL already holds these scores); 2 a bad config, a missing
checkpoint, or URL holding another model's or manifest's scores (one line on stderr); 4 a
collective failed or waited longer than train.collective_timeout_s."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dissect_dist.config import ConfigError, load_config, validate_environment  # noqa: E402
from dissect_dist.launching import release_cpu_comm_workspace  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (data, model)")
    p.add_argument("--model", required=True, help="the open_clip checkpoint to score with")
    p.add_argument("--out", required=True, help="where the snapshot goes (path or URL)")
    p.add_argument("--model-flops", type=float, default=None,
                   help="FLOPs that trained the model (default: the last flops_total of "
                   "metrics.jsonl beside the checkpoint, else unknown: 0)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        validate_environment(cfg)
        if not os.path.isfile(args.model) and "://" not in args.model:
            raise ConfigError(f"--model {args.model}: no such file; give an open_clip "
                              "checkpoint, e.g. RUN/open_clip_model.pt")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from datetime import timedelta

    import deepspeed

    deepspeed.init_distributed(dist_backend=None,
                               timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    import torch
    import torch.distributed as dist

    from dissect_dist.reference import ReferenceError, score_manifest
    from store import TorchDistributed

    device = torch.device(deepspeed.get_accelerator().current_device_name())
    rank = dist.get_rank()
    try:
        score_manifest(cfg, args.model, args.out, TorchDistributed(), device,
                       flops_model=args.model_flops,
                       log=lambda line: print(line, flush=True) if rank == 0 else None)
    except ReferenceError as e:  # raised on every rank alike
        if rank == 0:
            print(f"score error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if "timed out" in str(e).lower() or "connection" in str(e).lower():
            print(f"[rank {rank}] collective failed: {' '.join(str(e).split())[:200]}",
                  file=sys.stderr, flush=True)
            os._exit(4)
        raise
    finally:
        release_cpu_comm_workspace()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
