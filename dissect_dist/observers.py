"""What watches the training step: each side concern of the loop receives the step's
record and keeps its own cadence and state.

    StepRecord        what `Trainer.train_step` returns: ids, scores, keep mask, key,
                      loss, phase timings (tensors stay on the device)
    Observer          on_step / on_epoch_end / state_dict / load_state_dict / close
    StepTimer         the step's phase clock; time_<phase>_ms per log window
    NoiseDiagnostics  the noise ledger's metrics: kept precision, key AUROC and
                      histograms, mean CLIPScore of clean and noisy pairs, and the δ that
                      dissect_momentum would compute on a run that keeps everything
    TrainLog          the `train` rows of metrics.jsonl and the progress bar
    Evaluator         held-out evaluation on its cadence; the final one reuses the last
    SampleRecorder    train.record_samples: samples-rank{r}.jsonl
    StepProfiler      train.profile_at: a torch.profiler trace of a few steps

Nothing here converts a tensor to host memory per step: buffers stay on the device
and are read once per log window (or epoch), where a host sync is paid anyway.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

from dissect_dist import compute
from dissect_dist import model as modellib
from dissect_dist.config import DataConfig
from dissect_dist.evaluate import EvalSet, retrieval_on, zeroshot_counts
from dissect_dist.liveness import Where
from dissect_dist.metrics import MetricSink, auroc, key_histogram
from dissect_dist.selection import DissectMomentum, Ranking, ScoredBatch
from store import Collective, ScoreStore


@dataclasses.dataclass(slots=True)
class StepRecord:
    """One training step, as the observers see it. Shapes: b = this rank's batch rows."""

    step: int  # the step's number from 1 (metrics.jsonl's "step"; steps done so far)
    epoch: int  # the loader's epoch
    last: bool  # the run stops after this step
    host_ids: torch.Tensor  # (b,) int64 sample ids as loaded (host memory)
    ids: torch.Tensor  # (b,) int64, on the device
    curr: torch.Tensor | None  # (b,) CLIPScore, when the step scored (strategy or diagnostic)
    keep: torch.Tensor  # (b,) bool, the rows trained on
    key: torch.Tensor | None  # (b,) the ranking key; None: random or keep-all
    loss: torch.Tensor  # () the loss over every rank's kept rows, detached
    times: dict[str, float]  # seconds per phase of the step
    samples_seen: int  # global samples loaded by the run so far (see optim.Progress)
    lr: float  # learning rate of the next step (the schedule has stepped)
    logit_scale: torch.Tensor  # (1,) the model's log logit scale (read when logged)
    canary: np.ndarray | None = None  # (b,) bool host: rows made canaries (selection.canaries)


@dataclasses.dataclass(frozen=True, slots=True)
class Every:
    """A cadence in steps: due at every n-th step (never when n <= 0) and, with at_last,
    at the run's last step."""

    n: int
    at_last: bool = False

    def due(self, step: int, last: bool = False) -> bool:
        return (self.n > 0 and step % self.n == 0) or (self.at_last and last)


class Observer:
    """Receives every step's record. The default hooks do nothing."""

    def on_step(self, rec: StepRecord) -> None:
        return None

    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        """Collective. Values for the epoch's row of metrics.jsonl; None: no row from
        this observer (an epoch row is written when some observer gives values)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps; called while one is written."""
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class StepTimer(Observer):
    """Wall-clock time of each phase of the step (`time_<phase>_ms`, mean over the log
    window). With breakdown (train.time_breakdown) each mark waits for the device on
    CUDA, and ranks meet in a barrier before the selection, so that rank skew is booked
    as `wait`, not as exchange time. With annotate (while the step is profiled), each
    phase is also a `torch.profiler.record_function` range named PHASE_PREFIX + phase, in
    the order of PHASES, so that a trace can be cut by phase
    (benchmarks/profile_summary.py)."""

    PHASES = ("input", "score", "wait", "select", "fwd_bwd", "optim")
    PHASE_PREFIX = "dissect_dist.phase."

    def __init__(self, breakdown: bool, device: torch.device, world: int,
                 annotate: bool = False, where: Where | None = None) -> None:
        self.breakdown, self.device, self.world = breakdown, device, world
        self.annotate = annotate
        self.where = where  # told each phase as it begins (the heartbeat publishes it)
        self._t: dict[str, float] = {}
        self._window: list[dict[str, float]] = []
        self._range: Any = None

    def start(self) -> None:
        self._t = {"start": time.perf_counter()}
        self._annotate_next(None)

    def mark(self, phase: str) -> None:
        """The end of `phase` (which began at the previous mark)."""
        if self.breakdown and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t[phase] = time.perf_counter()
        self._annotate_next(phase)

    def wait_for_ranks(self) -> None:
        """Ranks reach the selection at different moments (their data workers share the
        cores); under breakdown the barrier's time is the `wait` phase."""
        if self.breakdown and self.world > 1:
            dist.barrier()
        self._t["wait"] = time.perf_counter()
        self._annotate_next("wait")

    def _annotate_next(self, ended: str | None) -> None:
        """Close the profiler range of the phase that ended, open the next one's."""
        i = 0 if ended is None else self.PHASES.index(ended) + 1
        if self.where is not None and i < len(self.PHASES):
            self.where.enter(self.PHASES[i])
        if not self.annotate:
            return
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if i < len(self.PHASES):
            from torch.profiler import record_function

            self._range = record_function(self.PHASE_PREFIX + self.PHASES[i])
            self._range.__enter__()

    def phases(self) -> dict[str, float]:
        names = list(self._t)
        return {k: self._t[k] - self._t[p] for p, k in zip(names, names[1:])}

    def on_step(self, rec: StepRecord) -> None:
        self._window.append(rec.times)

    def window_ms(self) -> dict[str, float]:
        """Mean milliseconds per phase since the last call."""
        w, self._window = self._window, []
        return {f"time_{k}_ms": 1e3 * float(np.mean([x[k] for x in w])) for k in w[-1]}


class NoiseDiagnostics(Observer):
    """The noise ledger's metrics (data.noise_ledger: the ids whose caption is wrong).

    Per log window: the clean rows among the kept ones (TrainLog's kept_precision) and
    the noisy rows among those seen (its dropped_noisy_recall: the share of the noisy
    pairs seen that the selection dropped). Per
    epoch: AUROC of the ranking key for clean vs noisy pairs and its histograms, and
    the mean CLIPScore of clean and of noisy pairs (steps that scored). With a shadow
    (train.diagnose_scores on a strategy that does not score): the δ of
    `DissectMomentum` over its own score store, which steers nothing and restarts on
    resume: does δ separate the noisy pairs under full training?

    Buffers stay on the device and move to host memory once per `flush` cadence."""

    def __init__(self, noisy: np.ndarray, device: torch.device, comm: Collective,
                 flush: Every, shadow: tuple[DissectMomentum, ScoreStore] | None = None
                 ) -> None:
        self.noisy, self.device, self.comm, self.flush = noisy, device, comm, flush
        self.world = comm.world_size
        self.shadow = shadow
        # The shadow ranks nothing: its Ranking only carries the store.
        self._shadow_ranking = Ranking("global", self.world, shadow[1] if shadow else None)
        self._window_clean = torch.zeros((), dtype=torch.int64, device=device)
        self._window_noisy = torch.zeros((), dtype=torch.int64, device=device)
        # Since the last flush, on the device: (key, noisy) and (δ, noisy) per step,
        # (curr, noisy) per step that scored.
        self._keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._shadow_keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        # This epoch, in host memory: (keys, noisy) chunks; (sum, count) of clean scores,
        # then of noisy scores.
        self._epoch_keys: list[tuple[np.ndarray, np.ndarray]] = []
        self._epoch_shadow: list[tuple[np.ndarray, np.ndarray]] = []
        self._score_sums = torch.zeros(4, dtype=torch.float64)

    def on_step(self, rec: StepRecord) -> None:
        # The ledger is looked up on the host (ids as loaded); the copy waits for nothing.
        noisy = torch.from_numpy(self.noisy[rec.host_ids.numpy()]).to(
            self.device, non_blocking=True)
        self._window_clean += (rec.keep & ~noisy).sum()
        self._window_noisy += noisy.sum()
        if rec.key is not None:
            self._keys.append((rec.key.float(), noisy))
        if rec.curr is not None and rec.ids.shape[0]:
            self._scores.append((rec.curr, noisy))
        if self.shadow is not None and rec.curr is not None:  # collective: every rank
            delta = self.shadow[0].keys(ScoredBatch(rec.ids, rec.curr, None, rec.epoch),
                                        self._shadow_ranking)
            assert isinstance(delta, torch.Tensor)
            if rec.ids.shape[0]:
                self._shadow_keys.append((delta.float(), noisy))
        if self.flush.due(rec.step, rec.last):
            self._to_host()

    def take_window_clean(self) -> torch.Tensor:
        """() int64 on the device: kept rows with a clean caption since the last call."""
        n, self._window_clean = self._window_clean, torch.zeros_like(self._window_clean)
        return n

    def take_window_noisy(self) -> torch.Tensor:
        """() int64 on the device: rows seen with a noisy caption since the last call."""
        n, self._window_noisy = self._window_noisy, torch.zeros_like(self._window_noisy)
        return n

    def _to_host(self) -> None:
        for pending, epoch in ((self._keys, self._epoch_keys),
                               (self._shadow_keys, self._epoch_shadow)):
            if pending:
                epoch.append((torch.cat([k for k, _ in pending]).cpu().numpy(),
                              torch.cat([n for _, n in pending]).cpu().numpy()))
                pending.clear()
        # Summed step by step, in step order, as the running sums always were.
        for c, noisy in self._scores:
            c, noisy = c.cpu().double(), noisy.cpu()
            self._score_sums += torch.stack([c[~noisy].sum(), (~noisy).sum().double(),
                                             c[noisy].sum(), noisy.sum().double()])
        self._scores.clear()

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        self._to_host()
        vals: dict[str, Any] = {}
        k, noisy = _concat(self.comm.all_gather_object(self._epoch_keys))
        self._epoch_keys = []
        if k.size:
            vals["key_auroc_clean_vs_noisy"] = auroc(k, ~noisy)
            vals["key_hist"] = key_histogram(k, noisy)
        if self.shadow is not None:
            k, noisy = _concat(self.comm.all_gather_object(self._epoch_shadow))
            self._epoch_shadow = []
            if k.size:
                vals["shadow_delta_auroc_clean_vs_noisy"] = auroc(k, ~noisy)
        sums = self._score_sums.to(self.device, copy=True)
        if self.world > 1:
            dist.all_reduce(sums)
        self._score_sums.zero_()
        s_clean, n_clean, s_noisy, n_noisy = sums.tolist()
        if n_clean + n_noisy > 0:
            vals["mean_score_clean"] = s_clean / max(n_clean, 1)
            vals["mean_score_noisy"] = s_noisy / max(n_noisy, 1)
        return vals

    def state_dict(self) -> dict[str, Any]:
        """The epoch so far (its keys and score sums); the shadow's are not kept."""
        self._to_host()
        return {"world_size": self.world, "epoch_keys": self._epoch_keys,
                "score_sums": self._score_sums.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """A checkpoint of another world size holds another split of the epoch's samples
        (or rank 0's only): its epoch so far is dropped, the next epochs are whole."""
        if sd["world_size"] != self.world:
            return
        self._epoch_keys = list(sd["epoch_keys"])
        self._score_sums = sd["score_sums"].to("cpu", torch.float64)


def _concat(parts: list[list[tuple[np.ndarray, np.ndarray]]]) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (keys, noisy) chunks, rank by rank, concatenated (empty if none)."""
    rows = [x for p in parts for x in p]
    if not rows:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate([k for k, _ in rows]), np.concatenate([n for _, n in rows])


class CanaryDiagnostics(Observer):
    """Selection health from canaries (dissect_dist/canaries.py): per log window the
    canaries among the rows seen and among the rows kept (TrainLog's canary_share and
    canary_kept_share), per epoch the AUROC of the ranking key for the other rows against
    the canaries (key_auroc_rest_vs_canary; steps with a key). Window counts stay on the
    device; the epoch's keys move to host memory once per `flush` cadence."""

    def __init__(self, device: torch.device, comm: Collective, flush: Every) -> None:
        self.device, self.comm, self.flush = device, comm, flush
        self.world = comm.world_size
        self._window = torch.zeros(2, dtype=torch.int64, device=device)  # seen, kept
        # This epoch: canaries seen and kept, rows seen and kept (this rank's).
        self._epoch = torch.zeros(4, dtype=torch.int64, device=device)
        self._keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._epoch_keys: list[tuple[np.ndarray, np.ndarray]] = []

    def on_step(self, rec: StepRecord) -> None:
        assert rec.canary is not None
        canary = torch.from_numpy(rec.canary).to(self.device, non_blocking=True)
        counts = torch.stack([canary.sum(), (canary & rec.keep).sum()])
        self._window += counts
        self._epoch += torch.cat([counts, torch.stack([
            torch.tensor(rec.keep.shape[0], device=self.device), rec.keep.sum()])])
        if rec.key is not None:
            self._keys.append((rec.key.float(), canary))
        if self.flush.due(rec.step, rec.last):
            self._to_host()

    def take_window(self) -> torch.Tensor:
        """(2,) int64 on the device: canaries seen and kept since the last call."""
        n, self._window = self._window, torch.zeros_like(self._window)
        return n

    def _to_host(self) -> None:
        if self._keys:
            self._epoch_keys.append((torch.cat([k for k, _ in self._keys]).cpu().numpy(),
                                     torch.cat([c for _, c in self._keys]).cpu().numpy()))
            self._keys.clear()

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        self._to_host()
        k, canary = _concat(self.comm.all_gather_object(self._epoch_keys))
        self._epoch_keys = []
        counts = self._epoch.double()
        if self.world > 1:
            dist.all_reduce(counts)
        self._epoch.zero_()
        c_seen, c_kept, seen, kept = counts.tolist()
        vals: dict[str, Any] = {"canary_share": c_seen / max(seen, 1),
                                "canary_kept_share": c_kept / max(kept, 1)}
        if k.size and canary.any() and not canary.all():
            vals["key_auroc_rest_vs_canary"] = auroc(k, ~canary)
        return vals

    def state_dict(self) -> dict[str, Any]:
        self._to_host()
        return {"world_size": self.world, "epoch_keys": self._epoch_keys,
                "epoch_counts": self._epoch.cpu()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """As NoiseDiagnostics: another world size's partial epoch is dropped."""
        if sd["world_size"] == self.world:
            self._epoch_keys = list(sd["epoch_keys"])
            if "epoch_counts" in sd:
                self._epoch = sd["epoch_counts"].to(self.device)


class TrainLog(Observer):
    """The `train` rows of metrics.jsonl (on its cadence: train.log_every and the last
    step) and the progress bar. Counts are summed on the device over the window and
    all-reduced once per row; trained_total (kept rows of all ranks, whole run) is
    checkpointed, and so is the compute ledger's run totals (pairs loaded and scored,
    rows trained, FLOPs, wall seconds: compute.py), whose window sums and totals each row
    carries."""

    def __init__(self, sink: MetricSink, cadence: Every, device: torch.device, rank: int,
                 timer: StepTimer, noise: NoiseDiagnostics | None,
                 canary: CanaryDiagnostics | None = None,
                 ledger: compute.Ledger | None = None) -> None:
        self.sink, self.cadence, self.device, self.rank = sink, cadence, device, rank
        self.timer, self.noise, self.canary = timer, noise, canary
        self.ledger = ledger if ledger is not None else compute.Ledger()
        self.trained_total = 0
        self.bar: Any = None
        self._seen = 0
        self._kept = torch.zeros((), dtype=torch.int64, device=device)
        self._t_last = time.perf_counter()

    def start(self, total: int, initial: int, desc: str) -> None:
        """The progress bar (rank 0) and the clock of the first window."""
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=self.rank != 0,
                        dynamic_ncols=True, desc=desc)
        self._t_last = time.perf_counter()

    def on_step(self, rec: StepRecord) -> None:
        self._seen += rec.ids.shape[0]
        self._kept += rec.keep.sum()
        if self.bar is not None:
            self.bar.update(1)
        if self.cadence.due(rec.step, rec.last):
            self._write(rec)

    def _write(self, rec: StepRecord) -> None:
        t_now = time.perf_counter()
        seconds, self._t_last = t_now - self._t_last, t_now
        clean = self.noise.take_window_clean() if self.noise is not None else None
        noisy = self.noise.take_window_noisy() if self.noise is not None else None
        canaries = self.canary.take_window() if self.canary is not None else None
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = torch.stack([  # NCCL reduces device tensors only
            torch.tensor(float(self._seen), dtype=torch.float64, device=self.device),
            self._kept.double(), clean.double() if clean is not None else zero,
            noisy.double() if noisy is not None else zero,
            *(canaries.double() if canaries is not None else (zero, zero))])
        dist.all_reduce(sums)
        self._seen, self._kept = 0, torch.zeros_like(self._kept)
        # CPU-GPU sync, once a window
        seen, kept, n_clean, n_noisy, c_seen, c_kept = sums.tolist()
        self.trained_total += int(kept)
        vals: dict[str, Any] = {
            "trained_total": self.trained_total, "samples_seen": rec.samples_seen,
            "epoch": rec.epoch, "loss": float(rec.loss),
            "kept_fraction": kept / max(seen, 1), "samples_per_s": seen / max(seconds, 1e-9),
            "trained_per_s": kept / max(seconds, 1e-9),
            "lr": rec.lr, "logit_scale": float(rec.logit_scale.exp()),
        }
        if self.noise is not None:
            vals["kept_precision"] = n_clean / max(kept, 1)
            # of the noisy pairs seen, the share not trained on (random: 1 - r)
            vals["dropped_noisy_recall"] = (n_noisy - (kept - n_clean)) / n_noisy \
                if n_noisy else float("nan")
        if self.canary is not None:
            vals["canary_share"] = c_seen / max(seen, 1)
            vals["canary_kept_share"] = c_kept / max(kept, 1)
        if self.device.type == "cuda":
            vals["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        vals.update(self.timer.window_ms())
        vals.update(self.ledger.take_window())
        self.sink.log(rec.step, "train", vals)
        if self.bar is not None:
            extra = ({"canary_kept": f"{vals['canary_kept_share']:.4f}/"
                                      f"{vals['canary_share']:.4f}"}
                     if self.canary is not None else {})
            self.bar.set_postfix(samples_s=f"{vals['samples_per_s']:.0f}",
                                 kept=f"{vals['kept_fraction']:.2f}", loss=f"{vals['loss']:.3f}",
                                 **extra)

    def state_dict(self) -> dict[str, Any]:
        return {"trained_total": self.trained_total, "compute": self.ledger.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.trained_total = int(sd.get("trained_total", 0))
        self.ledger.load_state_dict(sd.get("compute", {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # ends the bar's line (also where train() raised)


class Evaluator(Observer):
    """Zero-shot accuracy (the test split shared by all ranks) and retrieval (rank 0)
    every train.eval_every steps (0: only at the end; -1: in each epoch's row); the
    held-out sets are decoded once per run and kept in memory when small."""

    def __init__(self, engine: Any, tokenizer: Any, preprocess: Any, data: DataConfig,
                 every: int, sink: MetricSink, rank: int, world: int, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
        self.engine, self.tokenizer, self.preprocess = engine, tokenizer, preprocess
        self.data = data
        self.per_epoch, self.cadence = every == -1, Every(every)
        self.sink, self.rank, self.world, self.device = sink, rank, world, device
        self.autocast_dtype = autocast_dtype
        self._zs_set: EvalSet | None = None
        self._ret_set: EvalSet | None = None
        self._last: tuple[int, dict[str, Any]] | None = None  # (step, results) last logged

    def on_step(self, rec: StepRecord) -> None:
        if self.cadence.due(rec.step):
            self.evaluate(rec.step)

    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        return self.evaluate(None) if self.per_epoch else None

    def final(self, step: int) -> dict[str, Any]:
        """The evaluation logged at `step`: the last one when eval_every divides the
        run's length, else a new one."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        return self.evaluate(step)

    def evaluate(self, step: int | None) -> dict[str, Any]:
        """Collective. Results on rank 0 ({} elsewhere), logged as an `eval` row at
        `step` unless None (an unlogged evaluation is not reused as the final one)."""
        res: dict[str, Any] = {}
        t0 = time.perf_counter()
        self.engine.eval()
        with modellib.autocast(self.device, self.autocast_dtype):
            if self.data.zeroshot_dir:
                root = self.data.zeroshot_dir
                if self._zs_set is None:
                    self._zs_set = EvalSet(str(Path(root) / "test" / "manifest.json"),
                                           self.preprocess, rank=self.rank, world=self.world)
                correct, total = zeroshot_counts(self.engine, self.tokenizer, self._zs_set,
                                                 root, self.device)
                counts = torch.tensor([correct, total], dtype=torch.float64, device=self.device)
                dist.all_reduce(counts)
                res["zeroshot_acc"] = float(counts[0] / counts[1].clamp(min=1))
            if self.data.retrieval_manifest and self.rank == 0:
                if self._ret_set is None:
                    self._ret_set = EvalSet(self.data.retrieval_manifest, self.preprocess)
                res.update(retrieval_on(self.engine, self.tokenizer, self._ret_set, self.device))
        self.engine.train()
        if self.rank != 0:
            res = {}
        elif res:
            res["eval_s"] = time.perf_counter() - t0  # rank 0's, retrieval included
            if step is not None:
                self.sink.log(step, "eval", res)
        dist.barrier()
        if step is not None:
            self._last = (step, res)
        return res


class SampleRecorder(Observer):
    """train.record_samples: each step's ids, keep mask, ranking key and CLIPScore (when
    the step scored), one JSON line
    per step in samples-rank{r}.jsonl, steps counted from 0 (audits, tests). Lines are
    written on the flush cadence and whenever a checkpoint is written, so a checkpoint's
    steps are always on disk; opening drops the lines of steps >= `step` (a resumed run
    writes them again)."""

    def __init__(self, run_dir: Path, rank: int, step: int, flush: Every) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / f"samples-rank{rank}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if json.loads(ln)["step"] < step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.flush = flush
        self._f: TextIO = open(path, "a")
        self._pending: list[StepRecord] = []

    def on_step(self, rec: StepRecord) -> None:
        self._pending.append(rec)
        if self.flush.due(rec.step, rec.last):
            self._write()

    def _write(self) -> None:
        for r in self._pending:
            self._f.write(json.dumps({
                "step": r.step - 1, "epoch": r.epoch, "ids": r.host_ids.tolist(),
                "keep": r.keep.cpu().tolist(),
                "key": None if r.key is None else r.key.float().cpu().tolist(),
                "curr": None if r.curr is None else r.curr.float().cpu().tolist()}) + "\n")
        self._pending.clear()
        self._f.flush()

    def state_dict(self) -> dict[str, Any]:
        self._write()
        return {}

    def close(self) -> None:
        self._write()
        self._f.close()


class StepProfiler(Observer):
    """torch.profiler over `steps` consecutive steps of this launch, from its step `at`
    (>= 2: the step before is the profiler's warm-up), every rank. Writes
    RUN/profile/rank{r}.trace.json (Chrome trace: chrome://tracing or Perfetto) and
    rank{r}.txt (operators by self time on the device, or on the CPU without one), for
    comparing the trainer's step kernel by kernel with the same work alone
    (benchmarks/scoring_forward.py)."""

    def __init__(self, out: Path, rank: int, device: torch.device, at: int, steps: int) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out, self.rank, self.device = out, rank, device
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof: Any = profile(activities=activities, record_shapes=True,
                                  schedule=schedule(wait=at - 2, warmup=1, active=steps,
                                                    repeat=1),
                                  on_trace_ready=self._write)
        self._prof.start()
        self._open = True

    def _write(self, prof: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / f"rank{self.rank}.trace.json"))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.out / f"rank{self.rank}.txt").write_text(
            prof.key_averages().table(sort_by=key, row_limit=50) + "\n")

    def on_step(self, rec: StepRecord) -> None:
        if self._open:
            self._prof.step()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._prof.stop()
