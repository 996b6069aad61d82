"""The compute ledger: one pair's FLOPs counted once and multiplied is what the real
scoring pass and the real training step execute, as FlopCounterMode counts them over
the whole step; the ledger's windows and totals; counting leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dissect_dist import compute
from dissect_dist import model as modellib
from dissect_dist.loss import clip_loss_counted, per_sample_loss


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, pre, tok = modellib.create("tiny-vit-28", None)
    image, text = modellib.blank_row(pre, tok, torch.device("cpu"), torch.float32)
    return model, image, text


def _batch(image: torch.Tensor, text: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    return (torch.randn((b, *image.shape[1:]), generator=g),
            torch.randint(1, 500, (b, text.shape[1]), generator=g))


def test_one_pair_counted_once_is_what_a_real_step_executes(tiny):
    model, image, text = tiny
    row = compute.count_row_cost(model, image, text)
    assert row.dim == 64 and 2.5 * row.score < row.train < 3.5 * row.score
    images, texts = _batch(image, text, 12)
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[0, 3, 4, 9, 11]] = True
    scale = model.logit_scale
    # the scoring pass and the per-sample loss of the loss-based selectors
    with FlopCounterMode(display=False) as fc:
        fi, ft = modellib.score_features(model, images, texts, mode="eval", autocast_dtype=None)
        per_sample_loss(fi, ft, scale.detach(), 1)
    # the training forward of the kept rows, the loss and the backward
    with FlopCounterMode(display=False) as ft_count:
        img, txt = modellib.encode_kept(model, images, texts, keep, (image, text))
        loss, kept, loaded = clip_loss_counted(img, txt, scale, 1, loaded=12)
        loss.backward()
    model.zero_grad(set_to_none=True)
    assert (kept, loaded) == ([5], [12])
    cost = compute.step_cost(row, loaded, kept, scored=True, per_sample_loss=True)
    assert cost.flops_score == fc.get_total_flops()
    assert cost.flops_train == ft_count.get_total_flops()
    assert (cost.loaded, cost.scored, cost.trained) == (12, 12, 5)
    # a strategy without scoring pays none; a rank with no kept row forwards a blank one
    none = compute.step_cost(row, [12, 12], [0, 3], scored=False, per_sample_loss=False)
    assert none.flops_score == 0 and none.scored == 0
    assert none.flops_train == 4 * row.train + 6 * 2 * 9 * row.dim


def test_counting_leaves_weights_gradients_mode_and_random_state_alone(tiny):
    model, image, text = tiny
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    compute.count_row_cost(model, image, text)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    with pytest.raises(ValueError, match="one row"):
        compute.count_row_cost(model, *_batch(image, text, 2))


def test_the_ledger_sums_windows_and_keeps_totals_across_a_checkpoint():
    row = compute.RowCost(score=10, train=30, dim=2)
    led = compute.Ledger()
    c = compute.step_cost(row, [4, 4], [2, 1], scored=True, per_sample_loss=False)
    led.add(c, 0.5)
    led.add(c, 0.25)
    w = led.take_window()
    assert (w["pairs_loaded"], w["pairs_scored"], w["rows_trained"]) == (16, 16, 6)
    assert w["flops_score"] == 2 * 80 and w["flops_train"] == 2 * (3 * 30 + 6 * 2 * 9 * 2)
    assert w["wall_s"] == 0.75 and w["flops_total"] == w["flops_score"] + w["flops_train"]
    led.add(c, 1.0)
    w2 = led.take_window()
    assert w2["pairs_loaded"] == 8 and w2["pairs_loaded_total"] == 24
    resumed = compute.Ledger()
    resumed.load_state_dict(led.state_dict())
    assert resumed.flops == led.flops and resumed.total == led.total


def test_the_cheap_scoring_pass_drops_patches_reproducibly_and_is_counted(tiny):
    """selection.score_patch_dropout: the scoring pass keeps the class token and
    int(n x (1 - p)) patches per row, drawn from the seed and step; its FLOPs are what
    FlopCounterMode counts over the real pass, fewer than the full pass's."""
    model, image, text = tiny
    images, texts = _batch(image, text, 6)
    row = compute.count_row_cost(model, image, text, score_patch_dropout=0.5)
    full = compute.count_row_cost(model, image, text)
    assert row.train == full.train and row.score < full.score
    scorer = modellib.Scorer(mode="eval", autocast_dtype=None, patch_dropout=0.5, seed=3)
    plain = modellib.Scorer(mode="eval", autocast_dtype=None)
    scorer.reseed(7)
    with FlopCounterMode(display=False) as fc:
        a = scorer(model, images, texts)
    assert fc.get_total_flops() == 6 * row.score
    scorer.reseed(7)
    b = scorer(model, images, texts)
    scorer.reseed(8)
    c = scorer(model, images, texts)
    d = plain(model, images, texts)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])  # the step's draw
    assert not torch.equal(a[0], d[0]) and torch.equal(a[1], d[1])  # images only
    assert isinstance(model.visual.patch_dropout, torch.nn.Identity)  # put back
    seen = []
    hook = model.visual.transformer.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape))
    scorer(model, images[:1], texts[:1])
    hook.remove()
    n = (image.shape[-1] // model.visual.patch_size[0]) ** 2
    assert seen[0][1] == 1 + int(n * 0.5)


def test_the_lower_resolution_scoring_pass_is_the_resized_model_and_is_counted(tiny):
    """selection.score_resolution: the scoring pass sees the images resized and the
    position embeddings interpolated to the smaller grid (as a copy of the model with
    those embeddings would), only images change, the trained parameter is put back
    untouched, and its FLOPs are what FlopCounterMode counts over the real pass."""
    import copy

    model, image, text = tiny
    images, texts = _batch(image, text, 6)
    full = compute.count_row_cost(model, image, text)
    row = compute.count_row_cost(model, image, text, score_resolution=14)
    assert row.train == full.train and row.score < 0.7 * full.score  # 4 patches, not 16
    pos = model.visual.positional_embedding
    before = pos.detach().clone()
    scorer = modellib.Scorer(mode="eval", autocast_dtype=None, resolution=14)
    with FlopCounterMode(display=False) as fc:
        img, txt = scorer(model, images, texts)
    assert fc.get_total_flops() == 6 * row.score
    assert model.visual.positional_embedding is pos and torch.equal(pos.detach(), before)
    small = copy.deepcopy(model)
    small.visual.positional_embedding = torch.nn.Parameter(
        modellib.interpolate_pos_embed(before, 2))
    small.eval()
    with torch.no_grad():
        want_img, want_txt = modellib.encode(
            small, torch.nn.functional.interpolate(images, size=(14, 14), mode="bilinear",
                                                   antialias=True), texts)
    assert torch.allclose(img, want_img, atol=1e-6) and torch.equal(txt, want_txt)
    plain = modellib.Scorer(mode="eval", autocast_dtype=None)(model, images, texts)
    assert not torch.allclose(img, plain[0], atol=1e-3) and torch.equal(txt, plain[1])
    seen = []
    hook = model.visual.transformer.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape))
    scorer(model, images[:1], texts[:1])
    hook.remove()
    assert seen[0][1] == 1 + 2 * 2  # class token + a 2 x 2 grid
    # the same grid interpolates to itself
    assert torch.allclose(modellib.interpolate_pos_embed(before, 4), before, atol=1e-6)


def test_a_scoring_resolution_the_model_cannot_run_at_names_the_valid_ones():
    import subprocess
    import sys

    # in a fresh interpreter too, before anything has registered the project's configs
    subprocess.run([sys.executable, "-c", "from dissect_dist.model import "
                    "check_scoring_resolution as c; c('tiny-vit-28', 21)"], check=True,
                   timeout=120)
    modellib.check_scoring_resolution("tiny-vit-28", 21)
    with pytest.raises(ValueError, match=r"multiple of 7 below 28: \[7, 14, 21\]"):
        modellib.check_scoring_resolution("tiny-vit-28", 20)
    with pytest.raises(ValueError, match="not a ViT"):
        modellib.check_scoring_resolution("tiny-rn-64", 32)
    with pytest.raises(ValueError, match=r"multiple of 32 below 224"):
        modellib.check_scoring_resolution("ViT-B-32", 224)


def test_the_lower_resolution_scoring_pass_in_bf16_keeps_the_parameter(tiny):
    """The bf16 engine's module (parameters in bf16, images in bf16): the pass runs in
    bf16, its output matches the fp32 pass to bf16 precision, and the bf16 position
    embeddings are put back untouched."""
    import copy

    model, image, text = tiny
    images, texts = _batch(image, text, 4)
    half = copy.deepcopy(model).to(torch.bfloat16)
    pos = half.visual.positional_embedding
    before = pos.detach().clone()
    scorer = modellib.Scorer(mode="eval", autocast_dtype=None, resolution=14)
    img, _ = scorer(half, images.to(torch.bfloat16), texts)
    want, _ = scorer(model, images, texts)
    assert img.dtype == torch.bfloat16
    assert half.visual.positional_embedding is pos and torch.equal(pos.detach(), before)
    assert torch.allclose(img.float(), want, atol=0.05)
