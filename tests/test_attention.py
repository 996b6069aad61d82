"""model.attention=sdpa computes what open_clip's stock attention computes (features and
gradients, fp32), keeps its state-dict keys and text-mask semantics, and exports a model
stock open_clip loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dissect_dist import model as modellib
from dissect_dist.attention import SdpaAttention, use_sdpa
from dissect_dist.config import ConfigError, load_config

SHIPPED = sorted(p.stem for p in modellib.CONFIG_DIR.glob("*.json"))
CAPTIONS = ["a photo of a sneaker", "trouser", "", "a pale grey pullover with long sleeves "
            "lying flat on a white table, seen from above"]


def _pair(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor,
                                              torch.Tensor]:
    """(stock model, the same weights with SDPA attention, images, texts)."""
    torch.manual_seed(seed)
    stock, _, _, tok = modellib.create(name, attention="stock")
    sdpa = copy.deepcopy(stock)
    use_sdpa(sdpa)
    size = stock.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(CAPTIONS), 3, *size, generator=g)
    return stock, sdpa, images, tok(CAPTIONS)


def _features(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6 * max(1.0, float(a.abs().max())),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", SHIPPED)
def test_sdpa_features_and_gradients_equal_stock_for_every_shipped_config(name: str) -> None:
    stock, sdpa, images, texts = _pair(name)
    for m in (stock, sdpa):
        m.train()
    outs = []
    for m in (stock, sdpa):
        fi, ft = _features(m, images, texts)
        (fi @ ft.T * 10).logsumexp(0).sum().backward()  # a loss touching every parameter
        outs.append((fi.detach(), ft.detach(), {k: p.grad for k, p in m.named_parameters()}))
    (si, st, sg), (di, dt, dg) = outs
    _close(di, si, f"{name} image features")
    _close(dt, st, f"{name} text features")
    assert sg.keys() == dg.keys()
    missing = [k for k, g in sg.items() if g is not None and dg[k] is None]
    assert not missing, f"{name}: no gradient through SDPA for {missing}"
    for k, g in sg.items():
        if g is not None:
            _close(dg[k], g, f"{name} grad {k}")


@pytest.mark.parametrize("name", SHIPPED)
def test_sdpa_equals_stock_in_the_no_grad_eval_forward(name: str) -> None:
    """The scoring pass and evaluation: stock takes MHA's inference fast path here."""
    stock, sdpa, images, texts = _pair(name, seed=1)
    with torch.no_grad():
        si, st = _features(stock.eval(), images, texts)
        di, dt = _features(sdpa.eval(), images, texts)
    _close(di, si, f"{name} image features")
    _close(dt, st, f"{name} text features")


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_sdpa_forward_equals_stock_on_open_clip_models(name: str) -> None:
    """RN50's vision tower is a ModifiedResNet whose attention pool stays stock; its text
    tower is a transformer and runs SDPA."""
    stock, sdpa, images, texts = _pair(name)
    images, texts = images[:2], texts[:2]
    swapped = use_sdpa(copy.deepcopy(stock))
    assert swapped["text"] == 12 and swapped["text_causal"]
    assert swapped["vision"] == (12 if name == "ViT-B-32" else 0)
    with torch.no_grad():
        si, st = _features(stock.eval(), images, texts)
        di, dt = _features(sdpa.eval(), images, texts)
    _close(di, si, f"{name} image features")
    _close(dt, st, f"{name} text features")


def test_sdpa_keeps_the_parameters_and_state_dict_keys() -> None:
    stock, sdpa, _, _ = _pair("tiny-vit-28")
    assert list(stock.state_dict()) == list(sdpa.state_dict())
    assert sum(isinstance(m, SdpaAttention) for m in sdpa.modules()) == 3 + 2
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in sdpa.modules())
    assert sdpa.attn_mask is None  # causality lives in the text blocks now
    assert all(m.causal for m in sdpa.transformer.modules() if isinstance(m, SdpaAttention))
    assert not any(m.causal for m in sdpa.visual.modules() if isinstance(m, SdpaAttention))


def test_sdpa_text_tower_is_causal_and_pools_at_the_end_of_text_token() -> None:
    """A token after a caption's end-of-text token must not change its features (causal
    mask), and tokens before it must (the pooled feature is the EOT position's)."""
    _, sdpa, _, texts = _pair("tiny-vit-28")
    sdpa.eval()
    eot = texts.argmax(dim=-1)  # open_clip pools at argmax (EOT is the largest id)
    after, before = texts.clone(), texts.clone()
    rows = torch.arange(len(texts))
    ok = eot + 1 < texts.shape[1]
    after[rows[ok], eot[ok] + 1] = 500  # what padding would hold, if it were not 0
    before[:, 1] = 500
    with torch.no_grad():
        base, a, b = (sdpa.encode_text(t, normalize=True) for t in (texts, after, before))
    torch.testing.assert_close(a, base, rtol=0, atol=1e-6)
    assert (b - base).abs().amax(-1).min() > 1e-3


def test_exported_sdpa_model_loads_in_stock_open_clip(tmp_path) -> None:
    import open_clip

    stock, sdpa, images, texts = _pair("tiny-vit-28", seed=2)
    path = str(tmp_path / "model.pt")
    modellib.export_open_clip(sdpa, path)
    loaded = open_clip.create_model("tiny-vit-28", pretrained=path)
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in loaded.modules())
    with torch.no_grad():
        li, lt = _features(loaded.eval(), images, texts)
        di, dt = _features(sdpa.eval(), images, texts)
    _close(li, di, "image features")
    _close(lt, dt, "text features")


def test_a_text_mask_is_causal_can_express_is_refused_by_name() -> None:
    """CoCa-style towers (class token, padding mask) must not silently lose their mask."""
    from open_clip.transformer import TextTransformer

    class Custom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = TextTransformer(context_length=8, vocab_size=50, width=16, heads=2,
                                        layers=1, output_dim=8, embed_cls=True)

    with pytest.raises(ValueError, match="model.attention=stock"):
        use_sdpa(Custom())
    m, _, _, _ = modellib.create("tiny-vit-28", attention="stock")
    m.attn_mask = torch.zeros(32, 32)  # bidirectional as a float mask: not the causal one
    with pytest.raises(ValueError, match="not the plain causal mask"):
        use_sdpa(m)


def test_mha_fastpath_is_a_stock_attention_setting(tmp_path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({}))
    base = [f"data.train_manifest={manifest}"]
    with pytest.raises(ConfigError, match="model.mha_fastpath.*model.attention=stock"):
        load_config(None, [*base, "model.mha_fastpath=enabled"])
    cfg = load_config(None, [*base, "model.attention=stock", "model.mha_fastpath=enabled"])
    assert cfg.model.attention == "stock"
    assert load_config(None, base).model.attention == "sdpa"


def test_compiled_scoring_equals_eager_and_training_forwards_do_not_recompile_it() -> None:
    """selection.compile_scoring: the scoring pass is its own compiled function; the
    training forward's changing row count runs eagerly and adds no graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net, _, _, tok = modellib.create("tiny-vit-32")
    images = torch.randn(6, 3, 32, 32)
    texts = tok(["a sandal", "a bag", "an ankle boot", "", "a coat", "a dress"])
    eager = modellib.Scorer(mode="eval", autocast_dtype=None)(net, images, texts)
    scorer = modellib.Scorer(mode="eval", autocast_dtype=None, compiled=True)
    before = counters["stats"]["unique_graphs"]
    compiled = scorer(net, images, texts)
    after_first = counters["stats"]["unique_graphs"]
    assert after_first == before + 1
    for got, want in zip(compiled, eager):
        _close(got, want, "compiled scoring features")
    assert net.training  # the scorer leaves the model in train mode
    for rows in (2, 5, 3):  # the training forward: a different kept count every step
        keep = torch.zeros(6, dtype=torch.bool)
        keep[:rows] = True
        fi, ft = modellib.encode_kept(net, images, texts, keep, (images[:1], texts[:1]))
        (fi * ft).sum().backward()
        scorer(net, images, texts)
    assert counters["stats"]["unique_graphs"] == after_first


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a value
    (item/bool), nonzero, and indexing or selecting by a boolean mask."""

    SYNCING = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name.split("::")[-1]
        masks = [a for a in (args[1] if name == "index" and len(args) > 1 else [])
                 if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        if name in self.SYNCING or masks:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [0, 1, 4])
def test_encode_kept_reads_the_device_once(rows):
    """The training forward's shape depends on how many rows are kept: one host read
    (the kept rows' indices), whatever the count, the dummy-row path included."""
    torch.manual_seed(0)
    net, _, _, tok = modellib.create("tiny-vit-28")
    images, texts = torch.randn(6, 3, 28, 28), tok(CAPTIONS + ["a", "b"])
    keep = torch.zeros(6, dtype=torch.bool)
    keep[:rows] = True
    mode = _HostReads()
    with mode:
        fi, ft = modellib.encode_kept(net, images, texts, keep, (images[:1], texts[:1]))
    assert mode.reads == ["nonzero"], mode.reads
    assert fi.shape[0] == ft.shape[0] == rows
    if rows:  # the same features as the kept rows forwarded alone
        want = modellib.encode(net, images[:rows], texts[:rows])
        torch.testing.assert_close(fi, want[0])
        torch.testing.assert_close(ft, want[1])
