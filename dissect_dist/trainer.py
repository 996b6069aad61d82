"""The DISSect training loop.

One step (`Trainer.train_step`):
  1. score:   no-grad forward of the whole local batch -> curr = max(100 cos, 0)
  2. history: the strategy exchanges (ids, curr) with the score store -> hist
  3. rank:    keys all-gathered, identical global top-k on every rank
  4. train:   forward/backward on the kept rows; loss over the kept rows of ALL ranks
  5. step:    engine.step(); logging, evaluation and checkpoints on their own cadence
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dissect_dist import checkpoint
from dissect_dist import model as modellib
from dissect_dist.config import RunConfig
from dissect_dist.data import Manifest, WebDatasetLoader
from dissect_dist.data.decode import ImagePlan
from dissect_dist.evaluate import EvalSet, retrieval_on, zeroshot_counts
from dissect_dist.loss import clip_loss, per_sample_loss, scale_for_mean_reduce
from dissect_dist.metrics import MetricSink, auroc, key_histogram
from dissect_dist.optim import Progress, build_optimizer, build_schedule
from dissect_dist.selection import ScoredBatch, Selector, build_strategy
from store import Momentum, ScoreStore, TorchDistributed


class Trainer:
    def __init__(self, cfg: RunConfig, deepspeed_config: dict[str, Any] | None = None,
                 resume: str | None = None) -> None:
        import deepspeed

        self.cfg = cfg
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
        self.model, pre_train, self.pre_eval, self.tokenizer = modellib.create(
            cfg.model.name, cfg.model.pretrained)
        # Reduced-size JPEG decoding, uint8 batches normalised on the device (data/decode.py).
        pre_train, self.pre_eval = ImagePlan.from_transform(pre_train), \
            ImagePlan.from_transform(self.pre_eval)
        self.manifest = Manifest.load(cfg.data.train_manifest)
        self.loader = WebDatasetLoader(
            self.manifest, rank=self.rank, world_size=self.world,
            batch_size=cfg.data.batch_size, seed=cfg.train.seed, preprocess=pre_train,
            tokenizer=self.tokenizer, num_workers=cfg.data.workers,
            shuffle_window=cfg.data.shuffle_window, pin_memory=self.device.type == "cuda",
            token_cache=str(self.run_dir / "tokens"))
        # How far the run has got, in samples (see dissect_dist/optim.py): a resume with
        # another world size ends after the same epochs, on the same learning-rate curve.
        self.progress = Progress(samples_seen=0, ref_batch=self.world * cfg.data.batch_size)
        self.comm = TorchDistributed()
        self.store = ScoreStore(self.manifest.total, self.comm, device=self.device,
                                seed=cfg.train.seed)
        self.selector = self._selector()
        # A resume with another world size under ZeRO 1/2 loads the optimizer state through
        # DeepSpeed's universal checkpoint format (see checkpoint.universal_dir).
        self._resume_tag = checkpoint.resolve(self.ckpt_root, resume) if resume else None
        ds_cfg = dict(deepspeed_config or cfg.deepspeed_config())
        self._universal = self._resume_tag is not None and \
            checkpoint.saved_world_size(self.ckpt_root, self._resume_tag) != self.world and \
            int(ds_cfg.get("zero_optimization", {}).get("stage", 0)) >= 1
        if self._universal:
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        opt = build_optimizer(self.model, cfg.optim)
        sched = build_schedule(opt, cfg.optim, self.progress, lambda: self.progress.total_ref_steps(
            cfg.train, self.manifest.total))
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=opt, lr_scheduler=sched,
            config=ds_cfg)
        # Input dtype: the weights' (bf16 under DeepSpeed bf16); amp_bf16 keeps fp32 weights
        # and autocasts the forward instead.
        self.dtype = torch.bfloat16 if cfg.model.precision == "bf16" else torch.float32
        self.autocast_dtype = torch.bfloat16 if cfg.model.precision == "amp_bf16" else None
        if cfg.selection.score_mode == "reference" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as the reference code sets it
        self.noisy = self._ledger()
        self.sink = MetricSink(str(self.run_dir), self.rank)
        self.step = 0
        self.trained_total = 0  # kept rows trained on, all ranks, whole run
        # One blank (image, empty caption) row: what a rank with no kept row (or no
        # decodable sample at all) forwards so that it still joins every collective.
        self._dummy = modellib.blank_row(self.pre_eval, self.tokenizer, self.device, self.dtype)
        self._epoch_keys: list[tuple[np.ndarray, np.ndarray]] = []
        # The memorisation diagnostic of a run that keeps everything also tracks the δ that
        # dissect_momentum's rule would compute on this model (a shadow store; it steers
        # nothing and restarts on resume): does δ separate noisy pairs under full training?
        self._shadow: ScoreStore | None = None
        self._shadow_keys: list[tuple[np.ndarray, np.ndarray]] = []
        if cfg.train.diagnose_scores and self.noisy is not None and \
                not self.selector.strategy.needs_scores:
            self._shadow = ScoreStore(self.manifest.total, self.comm, device=self.device,
                                      seed=cfg.train.seed)
        self._shadow_rule = Momentum(beta=cfg.selection.beta)
        # (sum, count) of CLIPScores of clean and of noisy pairs this epoch, on device
        self._score_sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._samples_file = None
        self._bar: Any = None  # the progress bar while train() runs
        self._zs_set: EvalSet | None = None
        self._ret_set: EvalSet | None = None
        self._last_eval: tuple[int, dict[str, Any]] | None = None  # (step, results)
        if resume:
            self._resume()
        if cfg.train.record_samples:
            self._open_sample_record()

    # ------------------------------------------------------------------ setup
    def _selector(self) -> Selector:
        s = self.cfg.selection
        strategy = build_strategy(s.strategy, store=self.store, beta=s.beta,
                                  first_sight=s.first_sight, warmup_epochs=s.warmup_epochs,
                                  warmup_train=s.warmup_train)
        return Selector(strategy, s.ratio, s.scope, self.rank, self.world, self.cfg.train.seed,
                        max_rows=self.cfg.data.batch_size)

    def _ledger(self) -> np.ndarray | None:
        if not self.cfg.data.noise_ledger:
            return None
        noisy = np.zeros(self.manifest.total, dtype=bool)
        noisy[np.load(self.cfg.data.noise_ledger)] = True
        return noisy

    # ------------------------------------------------------------------ the step
    def _sync(self) -> None:
        if self.cfg.train.time_breakdown and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, batch: Any) -> dict[str, Any]:
        t = {"start": time.perf_counter()}
        # Counted before engine.step(), whose scheduler step then sets the next step's lr.
        self.progress.samples_seen += self.world * self.cfg.data.batch_size
        # Page-locked on CUDA (the loader pins), so the copies run asynchronously.
        ids = batch.ids.to(self.device, non_blocking=True)
        b = ids.shape[0]
        images = batch.images_on(self.device, self.dtype) if b else batch.images
        texts = batch.texts.to(self.device, non_blocking=True) if b else batch.texts
        strat = self.selector.strategy
        curr = loss_i = None
        if strat.needs_scores or self.cfg.train.diagnose_scores:
            mode = self.cfg.selection.score_mode
            # An empty batch still yields (0, d) features: the per-sample loss gathers
            # (k, d) from every rank.
            fi, ft = modellib.score_features(self.engine, *((images, texts) if b else self._dummy),
                                             mode=mode, autocast_dtype=self.autocast_dtype)
            fi, ft = (fi, ft) if b else (fi[:0], ft[:0])
            curr = modellib.clipscore(fi, ft, cosine=mode == "reference")
            if strat.needs_loss:
                loss_i = per_sample_loss(fi.float(), ft.float(), self._logit_scale().float(),
                                         self.world)
        self._sync()
        t["score"] = time.perf_counter()
        if self.cfg.train.time_breakdown and self.world > 1:
            # Ranks reach the selection at different moments (their data workers share the
            # cores); without this barrier that skew would be booked as exchange time.
            dist.barrier()
        t["wait"] = time.perf_counter()
        # The batch's rows of the noise ledger, looked up once per step (evaluation only).
        noisy_np = self.noisy[batch.ids.numpy()] if self.noisy is not None else None
        if noisy_np is not None and curr is not None and b:
            noisy_b = torch.from_numpy(noisy_np).to(self.device)
            c = curr.double()
            self._score_sums += torch.stack([c[~noisy_b].sum(), (~noisy_b).sum().double(),
                                             c[noisy_b].sum(), noisy_b.sum().double()])
        if self._shadow is not None and curr is not None:
            hist = self._shadow.exchange(ids, curr, self._shadow_rule)
            shadow_delta = torch.where(torch.isnan(hist), curr, hist) - curr
            if b:
                self._shadow_keys.append((shadow_delta.float().cpu().numpy(), noisy_np))
        if not strat.needs_scores:
            curr = None  # scored for the diagnostic only: the strategy sees what it asked for
        sel = self.selector.select(ScoredBatch(ids, curr, loss_i, self.loader.epoch))
        keep = sel.keep
        self._sync()
        t["select"] = time.perf_counter()
        with modellib.autocast(self.device, self.autocast_dtype):
            img, txt = modellib.encode_kept(self.engine, images, texts, keep, self._dummy)
        loss = clip_loss(img, txt, self._logit_scale(), self.world)
        self.engine.backward(scale_for_mean_reduce(loss, self.world))
        self._sync()
        t["fwd_bwd"] = time.perf_counter()
        self.engine.step()
        modellib.clamp_logit_scale(self.engine)
        self._sync()
        t["optim"] = time.perf_counter()
        phases = ["start", "score", "wait", "select", "fwd_bwd", "optim"]
        # Tensors, not Python numbers: converted once per log window, not every step.
        out = {"loss": loss.detach(), "b": b, "kept": keep.sum(),
               "time": {k: t[k] - t[p] for p, k in zip(phases, phases[1:])}}
        if noisy_np is not None:
            kept_np = keep.cpu().numpy()
            out["kept_clean"] = int((~noisy_np[kept_np]).sum())
            if sel.key is not None:
                self._epoch_keys.append((sel.key.float().cpu().numpy(), noisy_np))
        if self._samples_file is not None:
            self._samples_file.write(json.dumps({
                "step": self.step, "epoch": self.loader.epoch, "ids": batch.ids.tolist(),
                "keep": keep.cpu().tolist(),
                "key": None if sel.key is None else sel.key.float().cpu().tolist()}) + "\n")
        return out

    def _logit_scale(self) -> torch.Tensor:
        return self.engine.module.logit_scale

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        from tqdm import tqdm

        bar = self._bar = tqdm(total=self.step + self._steps_left(), initial=self.step,
                               disable=self.rank != 0, dynamic_ncols=True,
                               desc=self.cfg.selection.strategy)
        window: list[dict[str, Any]] = []
        t_last = time.perf_counter()
        while not self._done():
            epoch = self.loader.epoch if self.loader.cursor < len(self.loader) \
                else self.loader.epoch + 1
            for batch in self.loader:
                window.append(self.train_step(batch))
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.train.log_every == 0 or self._done():
                    t_now = time.perf_counter()
                    self._log_window(window, t_now - t_last, bar)
                    window, t_last = [], t_now
                if self.cfg.train.eval_every > 0 and self.step % self.cfg.train.eval_every == 0:
                    self.evaluate()
                if self.cfg.train.checkpoint_every and \
                        self.step % self.cfg.train.checkpoint_every == 0:
                    self.save()
                if self._done():
                    break
            if self.loader.cursor >= len(self.loader):
                self._end_of_epoch(epoch)
        bar.close()
        # The last step was evaluated already when eval_every divides the run's length.
        done = self._last_eval
        final = done[1] if done is not None and done[0] == self.step else self.evaluate()
        self.save()
        if self.rank == 0:  # the trained model, loadable by open_clip.create_model(name, path)
            modellib.export_open_clip(self.engine.module, str(self.run_dir / "open_clip_model.pt"))
        return final

    def _epochs_done(self) -> int:
        return self.loader.epoch + int(self.loader.cursor >= len(self.loader))

    def _done(self) -> bool:
        """train.max_steps reference steps' worth of samples, or train.epochs epochs."""
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

    def _log_window(self, window: list[dict[str, Any]], seconds: float, bar: Any) -> None:
        kept_t = torch.stack([w["kept"] for w in window]).sum().double()
        sums = torch.stack([
            torch.tensor(float(sum(w["b"] for w in window)), dtype=torch.float64,
                         device=self.device),  # NCCL reduces device tensors only
            kept_t.to(self.device),
            torch.tensor(float(sum(w.get("kept_clean", 0) for w in window)),
                         dtype=torch.float64, device=self.device)])
        dist.all_reduce(sums)
        seen, kept, clean = sums.tolist()
        self.trained_total += int(kept)
        vals: dict[str, Any] = {
            "trained_total": self.trained_total, "samples_seen": self.progress.samples_seen,
            "epoch": self.loader.epoch, "loss": float(window[-1]["loss"]),
            "kept_fraction": kept / max(seen, 1), "samples_per_s": seen / max(seconds, 1e-9),
            "trained_per_s": kept / max(seconds, 1e-9),
            "lr": self.engine.get_lr()[0], "logit_scale": float(self._logit_scale().detach().exp()),
        }
        if self.noisy is not None:
            vals["kept_precision"] = clean / max(kept, 1)
        if self.device.type == "cuda":
            vals["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for k in window[-1]["time"]:
            vals[f"time_{k}_ms"] = 1e3 * float(np.mean([w["time"][k] for w in window]))
        self.sink.log(self.step, "train", vals)
        bar.set_postfix(samples_s=f"{vals['samples_per_s']:.0f}",
                        kept=f"{vals['kept_fraction']:.2f}", loss=f"{vals['loss']:.3f}")

    def _end_of_epoch(self, epoch: int) -> None:
        if self.noisy is None and self.cfg.train.eval_every != -1:
            return  # nothing to log: the rows below need the ledger, or are evaluations
        parts = self.comm.all_gather_object(self._epoch_keys)
        self._epoch_keys = []
        sums = self._score_sums.clone()
        dist.all_reduce(sums)
        self._score_sums.zero_()
        vals: dict[str, Any] = {"epoch": epoch}
        k, noisy = _concat(parts)
        if k.size:
            vals["key_auroc_clean_vs_noisy"] = auroc(k, ~noisy)
            vals["key_hist"] = key_histogram(k, noisy)
        if self._shadow is not None:
            k, noisy = _concat(self.comm.all_gather_object(self._shadow_keys))
            self._shadow_keys = []
            if k.size:
                vals["shadow_delta_auroc_clean_vs_noisy"] = auroc(k, ~noisy)
        s_clean, n_clean, s_noisy, n_noisy = sums.tolist()
        if n_clean + n_noisy > 0:
            vals["mean_score_clean"] = s_clean / max(n_clean, 1)
            vals["mean_score_noisy"] = s_noisy / max(n_noisy, 1)
        if self.cfg.train.eval_every == -1:  # evaluate at every epoch end
            vals.update(self.evaluate(log=False))
        self.sink.log(self.step, "epoch", vals)

    def evaluate(self, log: bool = True) -> dict[str, Any]:
        """Zero-shot accuracy (the test split shared by all ranks) and retrieval (rank 0);
        the held-out sets are decoded once per run and kept in memory when small."""
        res: dict[str, Any] = {}
        t0 = time.perf_counter()
        self.engine.eval()
        with modellib.autocast(self.device, self.autocast_dtype):
            if self.cfg.data.zeroshot_dir:
                root = self.cfg.data.zeroshot_dir
                if self._zs_set is None:
                    self._zs_set = EvalSet(str(Path(root) / "test" / "manifest.json"),
                                           self.pre_eval, rank=self.rank, world=self.world)
                correct, total = zeroshot_counts(self.engine, self.tokenizer, self._zs_set, root,
                                                 self.device)
                counts = torch.tensor([correct, total], dtype=torch.float64, device=self.device)
                dist.all_reduce(counts)
                res["zeroshot_acc"] = float(counts[0] / counts[1].clamp(min=1))
            if self.cfg.data.retrieval_manifest and self.rank == 0:
                if self._ret_set is None:
                    self._ret_set = EvalSet(self.cfg.data.retrieval_manifest, self.pre_eval)
                res.update(retrieval_on(self.engine, self.tokenizer, self._ret_set, self.device))
        self.engine.train()
        if self.rank != 0:
            res = {}
        elif res:
            res["eval_s"] = time.perf_counter() - t0  # rank 0's, retrieval included
            if log:
                self.sink.log(self.step, "eval", res)
        dist.barrier()
        if log:  # an unlogged (per-epoch) evaluation is not reused as the logged final one
            self._last_eval = (self.step, res)
        return res

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "selector": self.selector.state_dict(),
                "torch_rng": torch.get_rng_state(), "step": self.step,
                "progress": self.progress.state_dict(),
                "trained_total": self.trained_total,
                "epoch_keys": self._epoch_keys, "score_sums": self._score_sums.cpu()}

    def save(self) -> None:
        checkpoint.save(self.ckpt_root, self.step, self.engine, self.store, self._rank_state(),
                        {"config": self.cfg.to_dict()}, self.cfg.train.keep_checkpoints)

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
        if st["saved_world_size"] == self.world:
            self._epoch_keys = st["epoch_keys"]
            self._score_sums = st["score_sums"].to(self.device)
        self.step = st["step"]
        if "progress" in st:
            self.progress.load_state_dict(st["progress"])
        else:  # written before progress was counted in samples (never resized then)
            self.progress.samples_seen = self.step * st["saved_world_size"] * \
                self.cfg.data.batch_size
            self.progress.ref_batch = st["saved_world_size"] * self.cfg.data.batch_size
        self.trained_total = st.get("trained_total", 0)
        if self._universal:
            self.engine.load_checkpoint(checkpoint.universal_dir(self.ckpt_root, tag),
                                        tag=checkpoint.UNIVERSAL)
        else:
            self.engine.load_checkpoint(self.ckpt_root, tag=tag)
        self.store = ScoreStore.load(f"{self.ckpt_root}/{tag}/scores", self.comm,
                                     n=self.manifest.total, device=self.device)
        if hasattr(self.selector.strategy, "store"):  # store-backed strategies
            self.selector.strategy.store = self.store
        if self.rank == 0:
            print(f"[train] resumed from {tag} (step {self.step}, epoch {self.loader.epoch}, "
                  f"batch {self.loader.cursor})")

    def _open_sample_record(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f"samples-rank{self.rank}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if json.loads(ln)["step"] < self.step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self._samples_file = open(path, "a", buffering=1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # ends the bar's line where train() raised
        self.sink.close()
        if self._samples_file is not None:
            self._samples_file.close()


def _concat(parts: list[list[tuple[np.ndarray, np.ndarray]]]) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (keys, noisy) pairs of an epoch, concatenated (empty if none)."""
    rows = [x for p in parts for x in p]
    if not rows:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate([k for k, _ in rows]), np.concatenate([n for _, n in rows])
