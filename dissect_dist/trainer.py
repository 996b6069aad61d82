"""The DISSect training loop.

One step (`Trainer.train_step`):
  1. score:   no-grad forward of the whole local batch -> curr = max(100 cos, 0)
  2. history: the strategy exchanges (ids, curr) with the score store -> hist
  3. rank:    keys all-gathered, identical global top-k on every rank
  4. train:   forward/backward on the kept rows; loss over the kept rows of ALL ranks
  5. step:    engine.step(); logging, evaluation and checkpoints on their own cadence
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dissect_dist import canaries, checkpoint, compute
from dissect_dist import engine as enginelib
from dissect_dist import model as modellib
from dissect_dist.config import RunConfig
from dissect_dist.data import Manifest, WebDatasetLoader
from dissect_dist.data.decode import ImagePlan
from dissect_dist.liveness import Where
from dissect_dist.loss import clip_loss_counted, per_sample_loss, scale_for_mean_reduce
from dissect_dist.metrics import MetricSink
from dissect_dist.observers import (
    CanaryDiagnostics,
    Evaluator,
    Every,
    NoiseDiagnostics,
    Observer,
    SampleRecorder,
    StepProfiler,
    StepRecord,
    StepTimer,
    TrainLog,
)
from dissect_dist.optim import Progress, build_optimizer, build_schedule
from dissect_dist.selection import DissectMomentum, ScoredBatch, Selector, build_strategy
from store import ScoreStore, TorchDistributed


class Trainer:
    def __init__(self, cfg: RunConfig, deepspeed_config: dict[str, Any] | None = None,
                 resume: str | None = None, where: Where | None = None) -> None:
        import deepspeed

        self.cfg = cfg
        # Where the loop is (step, phase): the heartbeat publishes it, so that a rank that
        # stops making progress is named with its place (dissect_dist/liveness.py).
        self.where = where if where is not None else Where()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        fast = cfg.model.mha_fastpath  # process-wide; see ModelConfig.mha_fastpath
        torch.backends.mha.set_fastpath_enabled(
            fast == "enabled" or (fast == "auto" and self.device.type != "cuda"))
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = str(self.run_dir / "checkpoints")
        self.model, pre_train, pre_eval, tokenizer = modellib.create(
            cfg.model.name, cfg.model.pretrained, attention=cfg.model.attention)
        # FLOPs of one pair through this model, counted once (compute.py); every step's
        # cost is this times its rows.
        self.row_cost = compute.count_row_cost(
            self.model, *modellib.blank_row(pre_eval, tokenizer, torch.device("cpu"),
                                            torch.float32),
            score_patch_dropout=cfg.selection.score_patch_dropout,
            score_resolution=cfg.selection.score_resolution)
        self.ledger = compute.Ledger()
        # Reduced-size JPEG decoding, uint8 batches normalised on the device (data/decode.py).
        pre_train, pre_eval = (ImagePlan.from_transform(t, resampling=cfg.data.resampling)
                               for t in (pre_train, pre_eval))
        self.manifest = Manifest.load(cfg.data.train_manifest)
        self.loader = WebDatasetLoader(
            self.manifest, rank=self.rank, world_size=self.world,
            batch_size=cfg.data.batch_size, seed=cfg.train.seed, preprocess=pre_train,
            tokenizer=tokenizer, num_workers=cfg.data.workers,
            shuffle_window=cfg.data.shuffle_window, pin_memory=self.device.type == "cuda",
            token_cache=str(self.run_dir / "tokens"), decode=cfg.data.decode,
            worker_timeout_s=cfg.data.worker_timeout_s)
        # How far the run has got, in samples (see dissect_dist/optim.py): a resume with
        # another world size ends after the same epochs, on the same learning-rate curve.
        self.progress = Progress(samples_seen=0, ref_batch=self.world * cfg.data.batch_size)
        self.comm = TorchDistributed()
        s = cfg.selection
        self.selector = Selector(
            build_strategy(s.strategy, beta=s.beta, first_sight=s.first_sight,
                           warmup_epochs=s.warmup_epochs, warmup_train=s.warmup_train,
                           ratio=s.ratio,
                           noisy=torch.from_numpy(self._noisy()) if s.strategy == "oracle"
                           and cfg.data.noise_ledger else None),
            s.ratio, s.scope, self.rank, self.world, cfg.train.seed,
            max_rows=cfg.data.batch_size, store=self._new_store(),
            reference=self._reference_store())
        # A resume with another world size, or of a checkpoint cut in another flat layout
        # (checkpoint.LAYOUT), under ZeRO 1/2 loads the optimizer state per parameter
        # through DeepSpeed's universal checkpoint format (see checkpoint.universal_dir).
        self._resume_tag = checkpoint.resolve(self.ckpt_root, resume) if resume else None
        ds_cfg = dict(deepspeed_config or cfg.deepspeed_config())
        self._universal = "" if self._resume_tag is None else checkpoint.per_parameter_reason(
            self.ckpt_root, self._resume_tag,
            int(ds_cfg.get("zero_optimization", {}).get("stage", 0)))
        ds_cfg = checkpoint.engine_config(ds_cfg, self._universal)
        opt = build_optimizer(self.model, cfg.optim)
        sched = build_schedule(opt, cfg.optim, self.progress, lambda: self.progress.total_ref_steps(
            cfg.train, self.manifest.total))
        self.engine = enginelib.initialize(self.model, opt, sched, ds_cfg)
        # Input dtype: the weights' (bf16 under DeepSpeed bf16); amp_bf16 keeps fp32 weights
        # and autocasts the forward instead.
        self.dtype = torch.bfloat16 if cfg.model.precision == "bf16" else torch.float32
        self.autocast_dtype = torch.bfloat16 if cfg.model.precision == "amp_bf16" else None
        if cfg.selection.score_mode == "reference" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as the reference code sets it
        self._score = modellib.Scorer(mode=cfg.selection.score_mode,
                                      autocast_dtype=self.autocast_dtype,
                                      compiled=cfg.selection.compile_scoring, device=self.device,
                                      patch_dropout=cfg.selection.score_patch_dropout,
                                      resolution=cfg.selection.score_resolution,
                                      seed=cfg.train.seed)
        self.step = 0
        # One blank (image, empty caption) row: what a rank with no kept row (or no
        # decodable sample at all) forwards so that it still joins every collective.
        self._dummy = modellib.blank_row(pre_eval, tokenizer, self.device, self.dtype)
        # The side concerns of the loop, each on its own cadence; the order is the order
        # they see each step (a train row before an eval row, as metrics.jsonl reads).
        self.sink = MetricSink(str(self.run_dir), self.rank)
        self.timer = StepTimer(cfg.train.time_breakdown, self.device, self.world,
                               annotate=cfg.train.profile_at > 0, where=self.where)
        noise = self._noise_diagnostics()
        canary = CanaryDiagnostics(self.device, self.comm, Every(cfg.train.log_every,
                                                                 at_last=True)) \
            if cfg.selection.canaries > 0 else None
        self.log = TrainLog(self.sink, Every(cfg.train.log_every, at_last=True), self.device,
                            self.rank, self.timer, noise, canary, self.ledger)
        self.evaluator = Evaluator(self.engine, tokenizer, pre_eval, cfg.data,
                                   cfg.train.eval_every, self.sink, self.rank, self.world,
                                   self.device, self.autocast_dtype)
        self.observers: dict[str, Observer] = {
            **({"noise": noise} if noise is not None else {}),
            **({"canary": canary} if canary is not None else {}),
            "timer": self.timer, "log": self.log, "eval": self.evaluator}
        self._save_every = Every(cfg.train.checkpoint_every)
        if resume:
            self._resume()
        if cfg.train.record_samples:  # after the resume: it drops the lines to rewrite
            self.observers["samples"] = SampleRecorder(
                self.run_dir, self.rank, self.step, Every(cfg.train.log_every, at_last=True))
        if cfg.train.profile_at:  # last: a profiled step ends once every observer saw it
            self.observers["profiler"] = StepProfiler(
                self.run_dir / "profile", self.rank, self.device, cfg.train.profile_at,
                cfg.train.profile_steps)

    # ------------------------------------------------------------------ setup
    def _new_store(self) -> ScoreStore:
        return ScoreStore(self.manifest.total, self.comm, device=self.device,
                          seed=self.cfg.train.seed)

    def _reference_store(self) -> ScoreStore | None:
        """The reference scores (selection.reference) of a strategy that reads them, on a
        fresh start with their cost charged to the ledger (a resume restores the ledger)."""
        s = self.cfg.selection
        if not s.reference or s.strategy not in ("learnability", "reference_filter"):
            return None
        ref = ScoreStore.load(s.reference, self.comm, n=self.manifest.total,
                              device=self.device)
        extra = dict(ref.loaded_record.extra) if ref.loaded_record is not None else {}
        want = self.manifest.fingerprint()
        if extra.get("manifest_fingerprint") != want:
            raise ValueError(
                f"selection.reference={s.reference} scores manifest "
                f"{extra.get('manifest_fingerprint')!r}, this run trains on {want!r} "
                f"({self.cfg.data.train_manifest}): score this manifest with launch/score.py")
        self.ledger.charge_reference(float(extra.get("flops_scoring", 0.0))
                                     + float(extra.get("flops_model", 0.0)))
        return ref

    def _noisy(self) -> np.ndarray:
        """(N,) bool by sample id: the noise ledger's pairs (data.noise_ledger)."""
        assert self.cfg.data.noise_ledger
        noisy = np.zeros(self.manifest.total, dtype=bool)
        noisy[np.load(self.cfg.data.noise_ledger)] = True
        return noisy

    def _noise_diagnostics(self) -> NoiseDiagnostics | None:
        cfg = self.cfg
        if not cfg.data.noise_ledger:
            return None
        noisy = self._noisy()
        # A run that keeps everything also tracks the δ that dissect_momentum would
        # compute on this model: does δ separate noisy pairs under full training?
        shadow = None
        if cfg.train.diagnose_scores and not self.selector.strategy.needs_scores:
            shadow = (DissectMomentum(cfg.selection.beta, cfg.selection.first_sight),
                      self._new_store())
        return NoiseDiagnostics(noisy, self.device, self.comm,
                                Every(cfg.train.log_every, at_last=True), shadow)

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: Any, data_s: float = 0.0) -> StepRecord:
        """One step on `batch`; data_s: the seconds the loop waited for it (the step's
        wall time in the compute ledger includes them)."""
        self.timer.start()
        # Counted before engine.step(), whose scheduler step then sets the next step's lr.
        self.progress.samples_seen += self.world * self.cfg.data.batch_size
        # Page-locked on CUDA (the loader pins), so the copies run asynchronously. The
        # images first: decoding on the device (data.decode) may drop a row it cannot read.
        images = batch.images_on(self.device, self.dtype) if len(batch.ids) else batch.images
        # Canaries after the images: device decoding may have dropped rows.
        canary = canaries.canary_batch(batch, self.cfg.selection.canaries, self.cfg.train.seed)
        ids = batch.ids.to(self.device, non_blocking=True)
        b = ids.shape[0]
        texts = batch.texts.to(self.device, non_blocking=True) if b else batch.texts
        self.timer.mark("input")  # copies to the device, normalisation (+ JPEG decoding)
        strat = self.selector.strategy
        curr = loss_i = None
        if strat.needs_scores or self.cfg.train.diagnose_scores:
            mode = self.cfg.selection.score_mode
            self._score.reseed(self.step)
            # An empty batch still yields (0, d) features: the per-sample loss gathers
            # (k, d) from every rank.
            fi, ft = self._score(self.engine, *((images, texts) if b else self._dummy))
            fi, ft = (fi, ft) if b else (fi[:0], ft[:0])
            curr = modellib.clipscore(fi, ft, cosine=mode == "reference")
            if strat.needs_loss:
                loss_i = per_sample_loss(fi.float(), ft.float(), self._logit_scale().float(),
                                         self.world)
        self.timer.mark("score")
        self.timer.wait_for_ranks()
        # The strategy sees the scores only if it asked for them (else they are the
        # diagnostics' alone).
        sel = self.selector.select(ScoredBatch(ids, curr if strat.needs_scores else None,
                                               loss_i, self.loader.epoch))
        self.timer.mark("select")
        with modellib.autocast(self.device, self.autocast_dtype):
            img, txt = modellib.encode_kept(self.engine, images, texts, sel.keep, self._dummy)
        loss, kept, loaded = clip_loss_counted(img, txt, self._logit_scale(), self.world,
                                               loaded=b)
        self.engine.backward(scale_for_mean_reduce(loss, self.world))
        self.timer.mark("fwd_bwd")
        self.engine.step()
        modellib.clamp_logit_scale(self.engine)
        self.timer.mark("optim")
        self.step += 1
        times = self.timer.phases()
        cost = compute.step_cost(self.row_cost, loaded, kept, scored=strat.needs_scores,
                                 per_sample_loss=strat.needs_loss)
        self.ledger.add(cost, data_s + sum(times.values()))
        return StepRecord(
            step=self.step, epoch=self.loader.epoch, last=self._done(), host_ids=batch.ids,
            ids=ids, curr=curr, keep=sel.keep, key=sel.key, loss=loss.detach(),
            times=times, samples_seen=self.progress.samples_seen,
            lr=self.engine.get_lr()[0], logit_scale=self._logit_scale().detach(),
            canary=canary)

    def _logit_scale(self) -> torch.Tensor:
        scale: torch.Tensor = self.engine.module.logit_scale
        return scale

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        self.log.start(total=self.step + self._steps_left(), initial=self.step,
                       desc=self.cfg.selection.strategy)
        where = self.where
        while not self._done():
            epoch = self.loader.epoch if self.loader.cursor < len(self.loader) \
                else self.loader.epoch + 1
            where.enter("data", self.step)
            t_ask = time.perf_counter()
            for batch in self.loader:
                rec = self.train_step(batch, data_s=time.perf_counter() - t_ask)
                where.enter("observe", self.step)
                for o in self.observers.values():
                    o.on_step(rec)
                if self._save_every.due(self.step):
                    self.save()
                if rec.last:
                    break
                where.enter("data")
                t_ask = time.perf_counter()
            if self.loader.cursor >= len(self.loader):
                where.enter("observe")
                self._end_of_epoch(epoch)
        self.log.close()
        where.enter("observe", self.step)
        final = self.evaluator.final(self.step)
        self.save()
        where.enter("end")
        if self.rank == 0:  # the trained model, loadable by open_clip.create_model(name, path)
            modellib.export_open_clip(self.engine.module, str(self.run_dir / "open_clip_model.pt"))
        return final

    def _epochs_done(self) -> int:
        return self.loader.epoch + int(self.loader.cursor >= len(self.loader))

    def _done(self) -> bool:
        """train.max_flops spent, train.max_steps reference steps' worth of samples, or
        train.epochs epochs, whichever comes first."""
        budget = self.cfg.train.max_flops
        if budget and self.ledger.flops >= budget * (1 - 1e-9):  # to the sums' rounding
            return True
        if self.cfg.train.max_steps:
            return self.progress.ref_steps() >= self.cfg.train.max_steps
        return self._epochs_done() >= self.cfg.train.epochs

    def _steps_left(self) -> int:
        """Steps of this world still to run (the progress bar's total)."""
        if self.cfg.train.max_steps:
            left = self.cfg.train.max_steps * self.progress.ref_batch - self.progress.samples_seen
            return max(0, -(-left // (self.world * self.cfg.data.batch_size)))
        done = self._epochs_done()
        part = self.loader.cursor if self.loader.cursor < len(self.loader) else 0
        return max(0, (self.cfg.train.epochs - done) * len(self.loader) - part)

    def _end_of_epoch(self, epoch: int) -> None:
        """Collective. The epoch's row: what the observers give (none: no row)."""
        parts = [o.on_epoch_end(epoch) for o in self.observers.values()]
        if all(p is None for p in parts):
            return
        vals: dict[str, Any] = {"epoch": epoch}
        for p in parts:
            vals.update(p or {})
        self.sink.log(self.step, "epoch", vals)

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict[str, Any]:
        return {"version": RANK_STATE_VERSION, "loader": self.loader.state_dict(),
                "selector": self.selector.state_dict(), "torch_rng": torch.get_rng_state(),
                "step": self.step, "progress": self.progress.state_dict(),
                "observers": {k: o.state_dict() for k, o in self.observers.items()}}

    def save(self) -> None:
        self.where.enter("checkpoint")
        checkpoint.save(self.ckpt_root, self.step, self.engine, self.selector.store,
                        self._rank_state(), {"config": self.cfg.to_dict()},
                        self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        tag = self._resume_tag
        if tag is None:
            if self.rank == 0:
                print(f"[train] no checkpoint in {self.ckpt_root}: starting from scratch")
            return
        st = checkpoint.load_rank_state(self.ckpt_root, tag, self.rank, self.world)
        if st["saved_world_size"] != self.world and self.cfg.selection.scope == "local":
            raise RuntimeError(
                f"checkpoint {tag} was saved by {st['saved_world_size']} ranks; with "
                "selection.scope=local each rank has its own random stream, which cannot be "
                "re-split: resume with the same world size")
        self.loader.load_state_dict(st["loader"])  # refuses a mid-epoch change of world
        self.selector.load_state_dict(st["selector"])
        torch.set_rng_state(st["torch_rng"])
        saved = observer_states(st)
        for name, o in self.observers.items():
            if name in saved:
                o.load_state_dict(saved[name])
        self.step = st["step"]
        if "progress" in st:
            self.progress.load_state_dict(st["progress"])
        else:  # written before progress was counted in samples (never resized then)
            self.progress.samples_seen = self.step * st["saved_world_size"] * \
                self.cfg.data.batch_size
            self.progress.ref_batch = st["saved_world_size"] * self.cfg.data.batch_size
        checkpoint.load_engine(self.engine, self.ckpt_root, tag, self._universal)
        self.selector.store = ScoreStore.load(f"{self.ckpt_root}/{tag}/scores", self.comm,
                                              n=self.manifest.total, device=self.device)
        if self.rank == 0:
            print(f"[train] resumed from {tag} (step {self.step}, epoch {self.loader.epoch}, "
                  f"batch {self.loader.cursor})")

    def close(self) -> None:
        for o in self.observers.values():
            o.close()
        self.sink.close()
        self.loader.close()


# 2: the observers' state under "observers" (1, unversioned: trained_total, epoch_keys
# and score_sums at the top level).
RANK_STATE_VERSION = 2


def observer_states(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The observers' saved state, by name, from a rank state of any version (as
    checkpoint.load_rank_state returns it, with saved_world_size)."""
    if st.get("version", 1) >= 2:
        states: dict[str, dict[str, Any]] = st["observers"]
        return states
    return {"log": {"trained_total": st.get("trained_total", 0)},
            "noise": {"world_size": st["saved_world_size"], "epoch_keys": st["epoch_keys"],
                      "score_sums": st["score_sums"]}}
