"""All-gather of rows whose count differs between ranks: the selection's ranking keys and
the loss's kept features. torch's all_gather needs equal shapes, so each rank's rows are
padded to a common length and every rank's row count travels in a small header."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_rows(x: torch.Tensor, world_size: int, *, max_rows: int | None = None,
                flag: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[int], list[int]]:
    """Every rank's rows of x, concatenated in rank order, with each rank's row count and
    each rank's `flag` (a 0-d integer tensor, e.g. a count of bad values; 0 when not
    given), all read with one host sync.

    x: (n_r, ...), n_r may differ between ranks. This rank's rows in the result are x
    itself (cast to the gathered dtype), so they keep their gradient; the other ranks'
    rows carry none.

    Without max_rows: two all_gathers, the (count, flag) header, then the rows padded to
    the largest count. With max_rows (1-D x, at most max_rows rows): one all_gather of
    [count, flag, x, padding] in float32, which holds counts below 2**24 exactly."""
    n = x.shape[0]
    if world_size == 1:
        return x, [n], [0 if flag is None else int(flag)]  # CPU-GPU sync point if flag
    flag = torch.zeros((), dtype=torch.int64, device=x.device) if flag is None else flag
    if max_rows is not None:
        if x.ndim != 1:
            raise ValueError(f"gather_rows(max_rows=...) takes 1-D rows, got shape "
                             f"{tuple(x.shape)}: leave max_rows out for rows of features")
        if n > max_rows:
            raise ValueError(f"{n} rows on rank {dist.get_rank()} exceed max_rows={max_rows} "
                             "(the per-rank batch size)")
        buf = torch.zeros(max_rows + 2, dtype=torch.float32, device=x.device)
        buf[0] = n
        buf[1] = flag
        buf[2:n + 2] = x.float()
        bufs = [torch.empty_like(buf) for _ in range(world_size)]
        dist.all_gather(bufs, buf)
        head = torch.stack([b[:2] for b in bufs]).long().tolist()  # CPU-GPU sync point
        rows = [bufs[r][2:head[r][0] + 2] for r in range(world_size)]
    else:
        h = torch.stack([torch.tensor(n, device=x.device), flag.to(torch.int64)])
        hs = [torch.zeros_like(h) for _ in range(world_size)]
        dist.all_gather(hs, h)
        head = torch.stack(hs).tolist()  # CPU-GPU sync point
        padded = x.new_zeros((max(h[0] for h in head), *x.shape[1:]))
        padded[:n] = x.detach()
        bufs = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(bufs, padded)
        rows = [bufs[r][: head[r][0]] for r in range(world_size)]
    rank = dist.get_rank()
    rows[rank] = x.to(rows[rank].dtype)
    counts, flags = [int(h[0]) for h in head], [int(h[1]) for h in head]
    return torch.cat(rows), counts, flags
