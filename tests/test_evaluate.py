"""Evaluation and export behave as their users read them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

from dissect_dist.evaluate import EvalSet, retrieval_on
from dissect_dist.metrics import auroc
from tests.datagen import make_dataset

PRE = T.Compose([T.Resize(8), T.ToTensor()])


class _Stub(torch.nn.Module):
    """Image i and caption i get the same feature, unless `shuffle` breaks the pairing."""

    def __init__(self, shuffle: bool) -> None:
        super().__init__()
        self.shuffle = shuffle

    def encode_image(self, images, normalize=True):
        return F.normalize(images.flatten(1)[:, :48] - 0.5, dim=-1)

    def encode_text(self, tokens, normalize=True):
        feats = self._last
        return feats[torch.randperm(len(feats))] if self.shuffle else feats


def _tok_for(stub):
    def tok(captions):
        return torch.zeros(len(captions), 1, dtype=torch.long)  # the stub ignores tokens
    return tok


def test_retrieval_recall_is_one_for_matched_pairs_and_near_chance_otherwise(tmp_path: Path):
    m = make_dataset(tmp_path, [40, 40])
    for shuffle, lo, hi in ((False, 1.0, 1.0), (True, 0.0, 0.2)):
        stub = _Stub(shuffle)
        orig = stub.encode_image

        def enc_img(images, normalize=True, _o=orig, _s=stub):
            f = _o(images)
            _s._last = f
            return f

        stub.encode_image = enc_img
        evalset = EvalSet(str(tmp_path / "manifest.json"), PRE, 16, 0)
        res = retrieval_on(stub, _tok_for(stub), evalset, torch.device("cpu"))
        assert lo <= res["i2t_R@1"] <= hi
        assert res["i2t_R@1"] <= res["i2t_R@5"] <= res["i2t_R@10"] <= 1.0
    assert m.total == 80


def test_auroc_matches_its_definition():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5  # ties count half


def test_exported_model_loads_in_open_clip(tmp_path: Path):
    import open_clip

    from dissect_dist.model import create, export_open_clip

    model, *_ = create("tiny-vit-28")
    with torch.no_grad():
        model.logit_scale.fill_(1.234)
    export_open_clip(model, str(tmp_path / "m.pt"))
    back = open_clip.create_model("tiny-vit-28", pretrained=str(tmp_path / "m.pt"))
    assert back.logit_scale.dim() == 0
    assert float(back.logit_scale.detach()) == pytest.approx(1.234)
    for k, v in back.state_dict().items():
        assert torch.equal(v, model.state_dict()[k].reshape(v.shape)), k


def test_eval_set_shares_cover_the_set_once_and_are_decoded_once(tmp_path: Path, monkeypatch):
    import dissect_dist.evaluate as ev

    make_dataset(tmp_path, [23, 30, 7], bad={4: "undecodable_image", 40: "missing_caption"})
    path = str(tmp_path / "manifest.json")
    whole = [c for _, caps, _ in ev.iter_eval(ev.Manifest.load(path), PRE, 8) for c in caps]
    assert len(whole) == 58 and "caption 4" not in whole and "caption 40" not in whole
    decoded = []
    real = ev.decode_sample
    monkeypatch.setattr(ev, "decode_sample", lambda got, pre: decoded.append(1) or real(got, pre))
    shares = [ev.EvalSet(path, PRE, batch_size=8, rank=r, world=3) for r in range(3)]
    first = [[caps for _, caps, _ in s] for s in shares]
    assert len(decoded) == 60  # every sample decoded once, by exactly one rank
    again = [[caps for _, caps, _ in s] for s in shares]
    assert again == first and len(decoded) == 60  # served from memory the second time
    # batch j of the set belongs to rank j % 3: interleaving the shares gives the set back
    merged = [c for j in range(8) for c in first[j % 3][j // 3]]
    assert merged == whole
    tiny = ev.EvalSet(path, PRE, batch_size=8, cache_bytes=100)  # too big to keep: streams
    list(tiny)
    list(tiny)
    assert len(decoded) == 60 + 2 * 60
