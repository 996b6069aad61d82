"""The live score store: one fp16 tensor per rank holding the historical score of
every sample id the rank owns, NaN = never scored, and the per-step exchange.

Memory is 2 bytes per owned sample (the tensor) and nothing per sample beyond that:
no Python objects, no index structures. Traffic per exchange is O(local batch) per
rank: ids and scores travel to their owners and the old scores travel back.

Writes are rounded to fp16 as the update rule asks: round-to-nearest, or stochastic
rounding whose random numbers are a hash of (seed, exchange counter, sample id)
(store/rounding.py), so they need no per-sample state and no generator to partition.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from store.collective import Collective, SingleProcess
from store.layout import DEFAULT_CHUNK, DEFAULT_SHARD, Layout
from store.persist import CommitRecord, SnapshotError, SnapshotLocation, merge_crcs
from store.rounding import to_fp16_nearest, to_fp16_stochastic, uniform
from store.rules import UpdateRule

STORE_DTYPE = torch.float16


class StoreInputError(ValueError):
    """A rank passed ids outside [0, N) or non-finite scores to an exchange."""


class ScoreStore:
    """Per-sample historical scores, partitioned across ranks by id range.

    Every public method that takes a `Collective` is collective: all ranks must call
    it, in the same order, even a rank whose batch is empty.

    `seed` and the exchange counter (`exchanges`, the number of exchanges this store's
    history has run, the same on every rank) pick the stochastic rounding's random
    numbers; both are saved with a snapshot and restored by `load`.
    """

    def __init__(
        self,
        n: int,
        collective: Collective | None = None,
        *,
        device: torch.device | str = "cpu",
        chunk_target: int = DEFAULT_CHUNK,
        shard_target: int = DEFAULT_SHARD,
        seed: int = 0,
    ) -> None:
        self.comm: Collective = collective if collective is not None else SingleProcess()
        self.layout = Layout.build(
            n, self.comm.world_size, chunk_target=chunk_target, shard_target=shard_target
        )
        self.lo, self.hi = self.layout.range_of(self.comm.rank)
        self.device = torch.device(device)
        self.seed = seed
        self.exchanges = 0
        # The commit record this store was loaded from (None for a fresh store).
        self.loaded_record: CommitRecord | None = None
        # (hi - lo,) fp16; NaN = never scored. The only per-sample memory there is.
        self.values = torch.full(
            (self.hi - self.lo,), float("nan"), dtype=STORE_DTYPE, device=self.device
        )

    @property
    def n(self) -> int:
        return self.layout.n

    # ------------------------------------------------------------------ exchange
    def exchange(
        self, ids: torch.Tensor, curr: torch.Tensor, rule: UpdateRule
    ) -> torch.Tensor:
        """Collective. Returns hist (b,) fp32 on curr's device: the score each id had
        before this call (NaN if never scored), and applies `rule` at the owners.

        ids: (b,) int64 in [0, N); curr: (b,) finite floats; b may be 0 on any rank.

        Duplicate ids in one global batch: every occurrence receives the pre-call
        value, and the update is applied once, as if only the last occurrence in
        global order (rank, then position in that rank's batch) were in the batch.

        The exchange counter advances by one on every rank (a refused exchange, which
        raises on every rank, does not count).
        """
        w = self.layout.world_size
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        curr = curr.reshape(-1).to(device=self.device, dtype=torch.float32)
        if ids.shape != curr.shape:
            raise StoreInputError(
                f"exchange got {ids.numel()} ids but {curr.numel()} scores: pass one score per id"
            )
        bad_id = (ids < 0) | (ids >= self.n)
        bad_score = ~torch.isfinite(curr)
        owner = torch.where(bad_id, 0, ids // self.layout.per_rank)
        order = torch.argsort(owner, stable=True)  # keeps batch order within each owner
        send_counts = torch.bincount(owner, minlength=w)
        flags = torch.stack([bad_id.sum(), bad_score.sum()])
        header = torch.cat([send_counts[:, None], flags.expand(w, 2)], dim=1)  # (W, 3)
        got = self.comm.all_to_all(header, [1] * w, [1] * w)  # (W, 3): row j from rank j
        # CPU-GPU sync point: uneven all_to_all needs the split sizes on the host.
        send_splits = send_counts.tolist()
        got_host = got.tolist()
        self._raise_on_bad_input(got_host, ids, curr, bad_id, bad_score)
        recv_splits = [row[0] for row in got_host]
        counter = self.exchanges
        self.exchanges += 1

        # ids < 2**53 travel exactly as float64, so one message carries both columns.
        payload = torch.stack([ids[order].double(), curr[order].double()], dim=1)
        recv = self.comm.all_to_all(payload, send_splits, recv_splits)  # (R, 2)
        old = self._read_and_update(recv[:, 0].long() - self.lo, recv[:, 1].float(), rule,
                                    counter)

        back = self.comm.all_to_all(old, recv_splits, send_splits)  # (b,)
        hist = torch.empty_like(back)
        hist[order] = back
        return hist

    def _read_and_update(
        self, local: torch.Tensor, curr: torch.Tensor, rule: UpdateRule, counter: int
    ) -> torch.Tensor:
        """Old values (R,) fp32 for the received rows; applies `rule` once per distinct
        id, with the last occurrence's score (rows arrive in global (rank, position)
        order). Reads and writes go through the sorted distinct ids: ascending
        addresses are kinder to caches and TLB than the batch's random order."""
        if local.numel() == 0:
            return curr.new_empty((0,))
        uniq, inverse = torch.unique(local, sorted=True, return_inverse=True)  # (U,), (R,)
        old_u = self.values[uniq].float()
        new = rule.apply(old_u, self._last_score(inverse, curr, uniq.numel()))
        if new is not None:
            if rule.rounding == "stochastic":
                u = uniform(self.seed, counter, uniq + self.lo)  # keyed by global id
                self.values[uniq] = to_fp16_stochastic(new, u)
            else:
                self.values[uniq] = to_fp16_nearest(new)
        return old_u[inverse]

    @staticmethod
    def _last_score(inverse: torch.Tensor, curr: torch.Tensor, u: int) -> torch.Tensor:
        pos = torch.arange(inverse.numel(), device=inverse.device)
        last = torch.full((u,), -1, dtype=pos.dtype, device=pos.device)
        last.scatter_reduce_(0, inverse, pos, reduce="amax")
        return curr[last]

    def _raise_on_bad_input(
        self,
        got: list[list[int]],
        ids: torch.Tensor,
        curr: torch.Tensor,
        bad_id: torch.Tensor,
        bad_score: torch.Tensor,
    ) -> None:
        bad_ranks = [(r, row[1], row[2]) for r, row in enumerate(got) if row[1] or row[2]]
        if not bad_ranks:
            return
        mine = [b for b in bad_ranks if b[0] == self.comm.rank]
        if mine and mine[0][1]:
            first = int(ids[bad_id][0])
            raise StoreInputError(
                f"score store exchange: sample id {first} is outside [0, N={self.n}) "
                f"({mine[0][1]} bad ids in this rank's batch); the manifest or data "
                "loader produced ids the store was not sized for: build the store with "
                "the manifest's total sample count"
            )
        if mine:
            i = int(torch.nonzero(bad_score)[0])
            raise StoreInputError(
                f"score store exchange: score {float(curr[i])} for sample id {int(ids[i])} "
                "is not finite; the scoring pass diverged (check the loss/logit scale)"
            )
        raise StoreInputError(
            "score store exchange aborted: ranks "
            f"{[b[0] for b in bad_ranks]} passed out-of-range ids or non-finite scores "
            "(see their error)"
        )

    # ------------------------------------------------------------------ views
    def local_numpy(self) -> np.ndarray:
        """This rank's values (hi - lo,) as a float16 numpy array (a copy on GPU)."""
        return self.values.detach().cpu().numpy()

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        where: str | SnapshotLocation,
        step: int,
        *,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        """Collective. Every rank writes its own whole shards, then rank 0 commits.
        On any rank's failure nothing is committed and every rank raises.
        `where`: a SnapshotLocation, or a URL / local path (no fsspec options)."""
        loc = SnapshotLocation.of(where)
        err = None
        if self.comm.rank == 0:
            try:
                loc.prepare(step, self.layout, overwrite=overwrite)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                err = f"{type(e).__name__}: {e}"
        err = self.comm.broadcast_object(err, src=0)
        if err is not None:
            raise SnapshotError(f"score store save to {loc.url} failed on rank 0: {err}")
        crcs: dict[int, int] = {}
        err = None
        try:
            crcs = loc.write(step, self.lo, self.local_numpy(), self.layout)
        except Exception as e:  # noqa: BLE001
            err = f"rank {self.comm.rank}: {type(e).__name__}: {e}"
        parts = self.comm.all_gather_object((crcs, err))
        errors = [e for _, e in parts if e is not None]
        if not errors and self.comm.rank == 0:
            try:
                loc.commit(step, self.layout, merge_crcs([c for c, _ in parts]), extra=extra,
                           seed=self.seed, exchanges=self.exchanges)
            except Exception as e:  # noqa: BLE001
                errors.append(f"rank 0 commit: {type(e).__name__}: {e}")
        errors = self.comm.broadcast_object(errors, src=0)
        if errors:
            raise SnapshotError(
                f"score store save to {loc.url} step {step} not committed: " + "; ".join(errors)
            )

    @classmethod
    def load(
        cls,
        where: str | SnapshotLocation,
        collective: Collective | None = None,
        *,
        n: int | None = None,
        step: int | None = None,
        device: torch.device | str = "cpu",
        chunk_target: int = DEFAULT_CHUNK,
        shard_target: int = DEFAULT_SHARD,
    ) -> ScoreStore:
        """Collective. Load a committed snapshot (the newest, or `step`) into a store
        for the current world, whatever world size saved it. `n`, when given, must
        match the snapshot's N. The seed and exchange counter come from the snapshot
        (0 and 0 for one written before they were recorded), so exchanges after a load
        round exactly as they would have in the store that was saved."""
        loc = SnapshotLocation.of(where)
        comm = collective if collective is not None else SingleProcess()
        found: CommitRecord | str | None = None
        if comm.rank == 0:  # one listing, so all ranks load the same step
            try:
                found = loc.read_commit(step, n=n)
            except SnapshotError as e:
                found = str(e)
        found = comm.broadcast_object(found, src=0)
        if not isinstance(found, CommitRecord):
            raise SnapshotError(str(found))
        record = found
        store = cls(record.n, comm, device=device, chunk_target=chunk_target,
                    shard_target=shard_target, seed=record.seed)
        store.exchanges = record.exchanges
        err = None
        try:
            for off, block in loc.read(record, store.lo, store.hi):
                store.values[off:off + block.shape[0]].copy_(torch.from_numpy(block))
        except SnapshotError as e:
            err = str(e)
        errors = [e for e in comm.all_gather_object(err) if e is not None]
        if errors:
            raise SnapshotError(errors[0])
        store.loaded_record = record
        return store
