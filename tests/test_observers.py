"""The step's observers in one process: the noise-ledger diagnostics (kept precision, key
AUROC and histograms, mean clean/noisy scores, and the shadow δ, which is what
dissect_momentum computes over a store of its own), their checkpointed state (also as
checkpoints written before the observers kept it), no host read of a device tensor on
a step that is not a flush, and the per-rank sample record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dissect_dist.metrics import MetricSink, auroc, key_histogram
from dissect_dist.observers import (
    Every,
    NoiseDiagnostics,
    SampleRecorder,
    StepRecord,
    StepTimer,
    TrainLog,
)
from dissect_dist.selection import DissectMomentum, ScoredBatch, Selector
from dissect_dist.trainer import observer_states
from store import ScoreStore, SingleProcess

N = 16
NOISY = np.zeros(N, dtype=bool)
NOISY[[1, 4, 6, 9, 11, 12, 15]] = True


def _rec(step: int, ids, keep=None, key=None, curr=None, epoch: int = 0, last: bool = False,
         device: str = "cpu") -> StepRecord:
    host_ids = torch.as_tensor(ids, dtype=torch.int64)
    b = host_ids.shape[0]
    dev = torch.device(device)
    keep = torch.ones(b, dtype=torch.bool) if keep is None else torch.as_tensor(keep)

    def on(x):
        return None if x is None else torch.as_tensor(x, dtype=torch.float32).to(dev)

    return StepRecord(step=step, epoch=epoch, last=last, host_ids=host_ids,
                      ids=host_ids.to(dev), curr=on(curr), keep=keep.to(dev), key=on(key),
                      loss=torch.zeros((), device=dev), times={"score": 0.1, "optim": 0.2},
                      samples_seen=step * b, lr=0.1, logit_scale=torch.zeros(1, device=dev))


def _noise(shadow: str | None = None, flush: int = 1) -> NoiseDiagnostics:
    sh = None
    if shadow is not None:
        sh = (DissectMomentum(0.9, shadow), ScoreStore(N, SingleProcess(), seed=3))
    return NoiseDiagnostics(NOISY, torch.device("cpu"), SingleProcess(), Every(flush), sh)


# Two epochs over all 16 samples in two steps each; integer scores (exact in fp16).
RNG = np.random.default_rng(0)
SCORES = RNG.integers(5, 90, size=(2, N)).astype(np.float32)
STEPS = [(0, np.arange(8)), (0, np.arange(8, 16)), (1, np.arange(8)), (1, np.arange(8, 16))]


@pytest.mark.parametrize("first_sight", ["curr", "zero"])
def test_shadow_delta_is_dissect_momentum_over_its_own_store(first_sight):
    """The full run's shadow δ AUROC per epoch equals that of the keys a dissect_momentum
    Selector computes over a store from the same scores, and by hand: epoch 0 is first
    sight (δ = 0, or -curr with first_sight=zero), epoch 1 is δ = c0 - c1."""
    noise = _noise(shadow=first_sight)
    ref = Selector(DissectMomentum(0.9, first_sight), 0.5, "global", 0, 1, seed=0,
                   store=ScoreStore(N, SingleProcess(), seed=3))
    got, want = [], []
    for epoch in (0, 1):
        ref_keys = []
        for i, (e, ids) in enumerate(STEPS):
            if e != epoch:
                continue
            c = SCORES[epoch][ids]
            noise.on_step(_rec(i + 1, ids, curr=c, epoch=epoch))
            sel = ref.select(ScoredBatch(torch.as_tensor(ids), torch.as_tensor(c), None, epoch))
            ref_keys.append(sel.key.numpy())
        got.append(noise.on_epoch_end(epoch)["shadow_delta_auroc_clean_vs_noisy"])
        want.append(auroc(np.concatenate(ref_keys), ~NOISY))
    assert got == want
    first = np.zeros(N) if first_sight == "curr" else -SCORES[0]
    assert got == [auroc(first, ~NOISY), auroc(SCORES[0] - SCORES[1], ~NOISY)]
    assert got[1] != 0.5  # the scores do separate the pairs: the check has teeth


def test_ledger_metrics_of_a_window_and_an_epoch():
    noise = _noise(flush=2)
    keep_a = np.array([1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    keep_b = np.array([0, 1, 1, 1, 0, 0, 0, 1], dtype=bool)
    key_a, key_b = SCORES[0][:8] - 40, SCORES[1][8:] - 40
    noise.on_step(_rec(1, np.arange(8), keep_a, key_a, curr=SCORES[0][:8]))
    noise.on_step(_rec(2, np.arange(8, 16), keep_b, key_b, curr=SCORES[1][8:]))
    kept_clean = (keep_a & ~NOISY[:8]).sum() + (keep_b & ~NOISY[8:]).sum()
    assert int(noise.take_window_clean()) == kept_clean
    assert int(noise.take_window_clean()) == 0  # a new window
    assert int(noise.take_window_noisy()) == NOISY.sum()  # the 16 rows seen
    assert int(noise.take_window_noisy()) == 0
    vals = noise.on_epoch_end(0)
    keys = np.concatenate([key_a, key_b]).astype(np.float32)
    assert vals["key_auroc_clean_vs_noisy"] == auroc(keys, ~NOISY)
    assert vals["key_hist"] == key_histogram(keys, NOISY)
    scores = np.concatenate([SCORES[0][:8], SCORES[1][8:]]).astype(np.float64)
    assert vals["mean_score_clean"] == pytest.approx(scores[~NOISY].mean(), rel=1e-12)
    assert vals["mean_score_noisy"] == pytest.approx(scores[NOISY].mean(), rel=1e-12)
    assert "shadow_delta_auroc_clean_vs_noisy" not in vals  # no shadow asked for
    assert noise.on_epoch_end(1) == {}  # the next epoch starts empty


def _epoch_with_state_round_trip(state_of) -> dict:
    """Epoch 0's row when the diagnostics are checkpointed after its first step and
    restored into a fresh observer (state_of maps the state to what is loaded)."""
    a = _noise(flush=5)
    ids = np.arange(8)
    a.on_step(_rec(1, ids, key=SCORES[0][:8], curr=SCORES[0][:8]))
    b = _noise(flush=5)
    b.load_state_dict(state_of(a.state_dict()))
    b.on_step(_rec(2, ids + 8, key=SCORES[0][8:], curr=SCORES[0][8:]))
    return b.on_epoch_end(0)


def _uninterrupted() -> dict:
    a = _noise(flush=5)
    a.on_step(_rec(1, np.arange(8), key=SCORES[0][:8], curr=SCORES[0][:8]))
    a.on_step(_rec(2, np.arange(8, 16), key=SCORES[0][8:], curr=SCORES[0][8:]))
    return a.on_epoch_end(0)


def test_a_resumed_epoch_reports_what_the_uninterrupted_one_does():
    want = _uninterrupted()
    assert set(want) == {"key_auroc_clean_vs_noisy", "key_hist", "mean_score_clean",
                         "mean_score_noisy"}
    assert _epoch_with_state_round_trip(lambda sd: sd) == want


def test_a_checkpoint_written_before_the_observers_kept_state_resumes():
    """Rank states without a version held trained_total, epoch_keys (a (keys, noisy)
    pair per step) and score_sums at the top level."""
    def as_old(sd: dict) -> dict:
        old = {"loader": {}, "selector": {}, "step": 1, "trained_total": 7,
               "epoch_keys": sd["epoch_keys"], "score_sums": sd["score_sums"],
               "saved_world_size": 1}
        states = observer_states(old)
        assert states["log"] == {"trained_total": 7}
        return states["noise"]

    assert _epoch_with_state_round_trip(as_old) == _uninterrupted()
    log = TrainLog(MetricSink("unused", rank=1), Every(1), torch.device("cpu"), 1,
                   StepTimer(False, torch.device("cpu"), 1), None)
    log.load_state_dict(observer_states({"trained_total": 7, "epoch_keys": [],
                                         "score_sums": torch.zeros(4),
                                         "saved_world_size": 2})["log"])
    assert log.trained_total == 7
    new = {"version": 2, "observers": {"log": {"trained_total": 3}}}
    assert observer_states(new) == {"log": {"trained_total": 3}}


def test_a_checkpoint_of_another_world_size_drops_the_epoch_so_far():
    got = _epoch_with_state_round_trip(lambda sd: {**sd, "world_size": 2})
    b = _noise()
    b.on_step(_rec(2, np.arange(8, 16), key=SCORES[0][8:], curr=SCORES[0][8:]))
    assert got == b.on_epoch_end(0)


def test_steps_between_flushes_read_no_device_tensor_on_the_host(tmp_path: Path):
    """A CUDA-free proxy for "no host sync per step": on the meta device a tensor has no
    values, so any read of one on the host (.cpu(), .item(), .tolist(), bool()) raises.
    The diagnostics, the train log, the timer and the sample record take 5 steps there
    without a flush; the flush is where the reads are."""
    meta = torch.device("meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.zeros(2, device=meta).cpu()  # the proxy has teeth
    noise = NoiseDiagnostics(NOISY, meta, SingleProcess(), Every(100))
    timer = StepTimer(False, meta, 1)
    log = TrainLog(MetricSink(str(tmp_path), rank=1), Every(100), meta, 1, timer, noise)
    rec_obs = SampleRecorder(tmp_path, 0, 0, Every(100))
    for step in range(1, 6):
        rec = _rec(step, np.arange(8) + step, key=SCORES[0][:8], curr=SCORES[0][:8],
                   device="meta")
        for o in (noise, timer, log, rec_obs):
            o.on_step(rec)
    with pytest.raises((NotImplementedError, RuntimeError)):
        noise.on_epoch_end(0)  # the epoch's end reads them
    rec_obs._pending.clear()  # (its lines would read the meta tensors too)
    rec_obs.close()


def test_sample_record_is_on_disk_at_a_checkpoint_and_a_resume_rewrites_later_steps(
        tmp_path: Path):
    rec = SampleRecorder(tmp_path, 1, 0, Every(10))
    for step in range(1, 6):
        rec.on_step(_rec(step, [step, step + 1], keep=[True, False],
                         key=None if step % 2 else [0.5, -1.0],
                         curr=None if step % 2 else [21.5, 30.0], epoch=step // 3))
    path = tmp_path / "samples-rank1.jsonl"
    assert path.read_text() == ""  # not yet on the flush cadence
    rec.state_dict()  # a checkpoint is written: every step so far is on disk
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # counted from 0
    assert rows[1] == {"step": 1, "epoch": 0, "ids": [2, 3], "keep": [True, False],
                       "key": [0.5, -1.0], "curr": [21.5, 30.0]}
    assert rows[0]["key"] is None and rows[0]["curr"] is None  # a step that did not score
    rec.close()
    again = SampleRecorder(tmp_path, 1, 3, Every(10))  # resumed at step 3
    again.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steps_between_flushes_make_no_synchronizing_cuda_call(tmp_path: Path):
    """The same on a GPU, by CUDA's own account: torch.cuda.set_sync_debug_mode("error")
    raises on any synchronizing call, and the old per-step conversion is one."""
    dev = "cuda:0"
    noise = NoiseDiagnostics(NOISY, torch.device(dev), SingleProcess(), Every(100))
    timer = StepTimer(False, torch.device(dev), 1)
    log = TrainLog(MetricSink(str(tmp_path), rank=1), Every(100), torch.device(dev), 1, timer,
                   noise)
    rec_obs = SampleRecorder(tmp_path, 0, 0, Every(100))
    recs = [_rec(s, np.arange(8) + s, keep=np.arange(8) % 3 == 0, key=SCORES[0][:8],
                 curr=SCORES[0][:8], device=dev) for s in range(1, 6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rec in recs:
            for o in (noise, timer, log, rec_obs):
                o.on_step(rec)
        with pytest.raises(RuntimeError, match="synchronizing"):
            recs[0].keep.cpu()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rec_obs.close()
    assert len((tmp_path / "samples-rank0.jsonl").read_text().splitlines()) == 5
