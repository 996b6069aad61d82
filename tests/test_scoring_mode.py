"""The scoring pass's two modes on a BatchNorm model (open_clip's ModifiedResNet, the
RN50 family): `eval` scores each pair on its own (running statistics, model state
untouched); `reference` scores as the reference code does, in train mode, so a pair's
score depends on its batch-mates and the scoring pass moves BatchNorm's running
statistics, and outside autocast, so it runs in fp32 when the weights are fp32."""

from __future__ import annotations

import pytest
import torch

from dissect_dist import model as modellib


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    net, _, _, tok = modellib.create("tiny-rn-64")
    net.train()
    # Running statistics away from their initial values, as after some training.
    with torch.no_grad():
        for _ in range(3):
            net.encode_image(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 64, 64, generator=g)
    texts = tok([f"a photo of thing {i}" for i in range(12)])
    return net, images, texts


def _bn_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k}


def _scores(net, images, texts, mode, autocast_dtype=None):
    fi, ft = modellib.score_features(net, images, texts, mode=mode,
                                     autocast_dtype=autocast_dtype)
    return modellib.clipscore(fi, ft, cosine=mode == "reference")


def test_eval_mode_scores_a_pair_alone_and_leaves_the_model_as_it_was(rn):
    net, images, texts = rn
    before = _bn_state(net)
    whole = _scores(net, images, texts, "eval")
    part = _scores(net, images[:4], texts[:4], "eval")  # other batch-mates
    assert torch.allclose(whole[:4], part, atol=1e-4)
    after = _bn_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training  # back in train mode for the training forward


def test_reference_mode_depends_on_batch_mates_and_moves_running_stats(rn):
    net, images, texts = rn
    before = _bn_state(net)
    whole = _scores(net, images, texts, "reference")
    part = _scores(net, images[:4], texts[:4], "reference")
    assert (whole[:4] - part).abs().max() > 1e-3  # batch statistics differ
    after = _bn_state(net)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert net.training


def test_reference_mode_scores_in_fp32_outside_the_training_autocast(rn):
    net, images, texts = rn
    fp32 = _scores(net, images, texts, "eval", None)
    amp = _scores(net, images, texts, "eval", torch.bfloat16)
    assert (fp32 - amp).abs().max() > 1e-3  # eval mode follows the training autocast
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ref_amp = _scores(net, images, texts, "reference", torch.bfloat16)
    net.load_state_dict(state)
    ref_fp32 = _scores(net, images, texts, "reference", None)
    net.load_state_dict(state)
    assert torch.equal(ref_amp, ref_fp32)  # reference mode ignores the autocast
