"""The few collectives the score store needs, behind one small protocol.

The store never reads rank or world size from the environment: a `Collective` is
handed to it, so the same code runs in one process (`SingleProcess`) and under any
torch.distributed backend (`TorchDistributed`: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Collective(Protocol):
    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_to_all(
        self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> torch.Tensor:
        """Rows send[sum(send_splits[:j]) : ...] go to rank j; returns the rows
        received from ranks 0..W-1 concatenated in rank order."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def barrier(self) -> None: ...


class SingleProcess:
    """World of one: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_to_all(
        self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> torch.Tensor:
        return send

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        return None


class TorchDistributed:
    """torch.distributed collectives on a process group (default: the world)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributed needs an initialised process group: call "
                "torch.distributed.init_process_group (or deepspeed.init_distributed) first"
            )
        self._dist = dist
        self._group = group
        self._rank = dist.get_rank(group)
        self._world = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def all_to_all(
        self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> torch.Tensor:
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        self._dist.all_to_all_single(
            out, send.contiguous(), output_split_sizes=recv_splits,
            input_split_sizes=send_splits, group=self._group,
        )
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self._world
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src, group=self._group)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)
