"""open_clip models: creation (open_clip names, plus the tiny configs shipped in
dissect_dist/model_configs for CPU runs), the scoring forward, and export."""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip clamps exp(logit_scale) at 100
_registered = False


def _register_tiny_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def model_names() -> list[str]:
    """Every name `create` accepts: open_clip's models plus dissect_dist/model_configs."""
    import open_clip

    _register_tiny_configs()
    return list(open_clip.list_models())


def check_name(name: str) -> None:
    """ValueError naming the close matches when `create` would not know `name` (also
    run by the config check, before any process group starts)."""
    names = model_names()
    if name in names:
        return
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[n] for n in difflib.get_close_matches(name.lower(), list(by_lower), n=5)]
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    raise ValueError(
        f"{name!r} is neither an open_clip model nor a config in dissect_dist/model_configs "
        f"({hint}); all names: python -c 'from dissect_dist.model import model_names; "
        "print(model_names())'")


def create(name: str, pretrained: str | None = None,
           attention: Literal["sdpa", "stock"] = "sdpa"
           ) -> tuple[torch.nn.Module, Any, Any, Any]:
    """(model, train preprocess, eval preprocess, tokenizer). attention=sdpa runs the
    towers' attention through F.scaled_dot_product_attention (dissect_dist/attention.py;
    same parameters and state-dict keys), stock keeps open_clip's nn.MultiheadAttention."""
    import open_clip

    from dissect_dist.attention import use_sdpa

    check_name(name)
    model, pre_train, pre_eval = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, output_dict=True)
    # DeepSpeed 0.19.x cannot initialize an engine holding a 0-dim parameter
    # ("self.dim() cannot be 0 to view Float as Byte"): keep logit_scale 1-element.
    # open_clip's forward and our loss broadcast it the same way.
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
    if attention == "sdpa":
        use_sdpa(model)
    elif attention != "stock":
        raise ValueError(f"attention={attention!r}: use sdpa or stock")
    return model, pre_train, pre_eval, open_clip.get_tokenizer(name)


def unwrap(model: Any) -> Any:
    """The module a DeepSpeed engine wraps, or `model` itself when it wraps none."""
    return getattr(model, "module", model)


def encode(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features (b, d)."""
    m = unwrap(model)
    return m.encode_image(images, normalize=True), m.encode_text(texts, normalize=True)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """torch.autocast to `dtype` on `device`, or nothing when dtype is None."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def _score_encode(m: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """encode() on the bare module: the function the compiled scoring pass compiles (its
    own code object, so its compiled graphs are never shared with other callers)."""
    clip: Any = m  # open_clip's CLIP / CustomTextCLIP
    return clip.encode_image(images, normalize=True), clip.encode_text(texts, normalize=True)


class ScoringPatchDropout(torch.nn.Module):
    """Drops a random `prob` share of the image patch tokens (the class token stays),
    always, not only in training mode: the vision tower's cheap scoring pass (Li et al.
    2023, FLIP, train with it; here only scoring does). Each row keeps
    max(1, int(tokens x (1 - prob))) patches, drawn from `generator` (CPU), so the
    selection is reproducible from its seed."""

    def __init__(self, prob: float, generator: torch.Generator) -> None:
        super().__init__()
        if not 0.0 < prob < 1.0:
            raise ValueError(f"patch dropout {prob}: need 0 < p < 1")
        self.prob, self.generator = prob, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        b, n = patches.shape[:2]
        keep = max(1, int(n * (1 - self.prob)))
        idx = torch.rand(b, n, generator=self.generator).topk(keep, dim=-1).indices
        idx = idx.to(x.device)
        rows = torch.arange(b, device=x.device)[:, None]
        return torch.cat([cls, patches[rows, idx]], dim=1)


@contextlib.contextmanager
def scoring_patch_dropout(model: Any, dropout: ScoringPatchDropout | None) -> Iterator[None]:
    """The vision tower with `dropout` in place of its patch dropout (None: unchanged)."""
    m = unwrap(model)
    if dropout is None:
        yield
        return
    visual = m.visual
    if not hasattr(visual, "patch_dropout"):
        raise ValueError(f"selection.score_patch_dropout: {type(visual).__name__} has no patch "
                         "tokens to drop (a ViT model is needed); set it to 0")
    old = visual.patch_dropout
    visual.patch_dropout = dropout
    try:
        yield
    finally:
        visual.patch_dropout = old


def _vit_geometry(name: str) -> tuple[int, int] | None:
    """(image size, patch size) of a ViT model config; None for other towers."""
    import open_clip

    _register_tiny_configs()
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    if "patch_size" not in vision or "timm_model_name" in vision \
            or not isinstance(vision.get("layers", 0), int):
        return None
    size = vision.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    return int(size), int(vision["patch_size"])


def check_scoring_resolution(name: str, size: int) -> None:
    """ValueError naming the valid values unless `size` pixels a side is a lower scoring
    resolution model `name` can run at: a ViT, a multiple of its patch size, below its
    image size (run by the config check before any process group starts)."""
    geometry = _vit_geometry(name)
    if geometry is None:
        raise ValueError(f"{size}: {name} is not a ViT model (its position embeddings are "
                         "what a lower resolution interpolates); set 0")
    full, patch = geometry
    valid = list(range(patch, full, patch))
    if size not in valid:
        raise ValueError(f"{size}: {name} takes {full} px images in {patch} px patches; use "
                         f"a multiple of {patch} below {full}: {valid}, or 0 (off)")


def interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """A ViT's position embeddings (1 + g*g, width; the class token's first) for a
    grid x grid patch grid: the patch part resized bicubically (antialiased), the class
    token's kept."""
    n = math.isqrt(pos.shape[0] - 1)
    if n * n + 1 != pos.shape[0]:
        raise ValueError(f"position embeddings of shape {tuple(pos.shape)}: not 1 + a square")
    patches = pos[1:].float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic",
                                              align_corners=False, antialias=True)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)
                      .to(pos.dtype)])


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """A normalised image batch (b, 3, H, W) at size x size (bilinear, antialiased: the
    same as resizing before normalising, which is affine per channel)."""
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out.to(images.dtype)


@contextlib.contextmanager
def scoring_resolution(model: Any, size: int) -> Iterator[None]:
    """The vision tower with its position embeddings interpolated for size x size images
    (0: unchanged); the trained parameter is put back on exit, untouched."""
    if not size:
        yield
        return
    visual = unwrap(model).visual
    pos = getattr(visual, "positional_embedding", None)
    conv = getattr(visual, "conv1", None)
    if pos is None or conv is None:
        raise ValueError(f"selection.score_resolution: {type(visual).__name__} has no patch "
                         "grid to interpolate (a ViT model is needed); set it to 0")
    with torch.no_grad():
        smaller = interpolate_pos_embed(pos.detach(), size // conv.kernel_size[0])
    visual.positional_embedding = torch.nn.Parameter(smaller, requires_grad=False)
    try:
        yield
    finally:
        visual.positional_embedding = pos


class Scorer:
    """The no-grad scoring pass: L2-normalised features (b, d); the model is left in
    train mode. mode=eval: eval mode, under the training autocast. mode=reference: train
    mode (as the reference code: BatchNorm normalises with this batch's statistics and
    updates its running statistics, dropout is active), outside autocast.

    compiled=True runs the towers through torch.compile (inductor, static shapes, one
    graph or an error: fullgraph). The compiled function is this scorer's own, not the
    module's forward: the training forward (a different row count every step) stays
    eager and never recompiles it. Each distinct batch shape (the per-rank batch, a
    short last batch, the one-row blank batch of an empty rank) compiles once; the first
    call pays the compile (see benchmarks/README.md, scoring_forward.py). More than
    `torch._dynamo.config.recompile_limit` shapes raise instead of falling back to eager."""

    def __init__(self, *, mode: Literal["eval", "reference"],
                 autocast_dtype: torch.dtype | None, compiled: bool = False,
                 device: torch.device | None = None, patch_dropout: float = 0.0,
                 resolution: int = 0, seed: int = 0) -> None:
        self.mode, self.autocast_dtype = mode, autocast_dtype
        self.seed = seed
        self.resolution = resolution  # > 0: score at this many pixels a side
        # patch_dropout > 0: the cheap scoring pass (ScoringPatchDropout); reseed() per step
        self.dropout = ScoringPatchDropout(patch_dropout, torch.Generator().manual_seed(seed)) \
            if patch_dropout > 0 else None
        if compiled:
            check_compile_toolchain(device or torch.device("cpu"))
            from torch._dynamo import config as dynamo_config

            dynamo_config.fail_on_recompile_limit_hit = True  # no silent fall back to eager
            self._encode = torch.compile(_score_encode, fullgraph=True, dynamic=False)
        else:
            self._encode = _score_encode

    def __call__(self, model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        m = unwrap(model)
        model.train(self.mode == "reference")
        ctx = autocast(images.device, self.autocast_dtype if self.mode == "eval" else None)
        try:
            with torch.no_grad(), ctx, scoring_patch_dropout(m, self.dropout), \
                    scoring_resolution(m, self.resolution):
                if self.resolution:
                    images = resize_images(images, self.resolution)
                return self._encode(m, images, texts)
        finally:
            model.train()

    def reseed(self, step: int) -> None:
        """The patch draws of `step` (a function of the seed and the step only, so a
        resumed run draws what the uninterrupted one did)."""
        if self.dropout is not None:
            self.dropout.generator.manual_seed(self.seed * 1_000_003 + step)


def check_compile_toolchain(device: torch.device) -> None:
    """RuntimeError naming selection.compile_scoring when torch.compile's inductor cannot
    build kernels for `device`: on CPU it needs a C++ compiler (inductor's cpp.cxx, or
    g++/c++ on PATH); on CUDA, Triton."""
    import shutil

    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RuntimeError("selection.compile_scoring=true needs Triton on CUDA (pip "
                               "install triton), or set selection.compile_scoring=false") from e
        return
    import torch._inductor.config as ic

    cxx = [c for c in (ic.cpp.cxx if isinstance(ic.cpp.cxx, tuple) else (ic.cpp.cxx,)) if c]
    if not any(shutil.which(c) for c in [*cxx, "g++", "c++", "clang++"]):
        raise RuntimeError(
            "selection.compile_scoring=true: torch.compile builds C++ kernels on CPU and no "
            f"C++ compiler was found (looked for {[*cxx, 'g++', 'c++', 'clang++']} on PATH): "
            "install one (apt-get install g++) or set selection.compile_scoring=false")


def score_features(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, *,
                   mode: Literal["eval", "reference"], autocast_dtype: torch.dtype | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager scoring pass once (see Scorer)."""
    return Scorer(mode=mode, autocast_dtype=autocast_dtype)(model, images, texts)


def encode_kept(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor,
                keep: torch.Tensor, dummy: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the kept rows, with gradient. A rank that keeps no row still runs
    the forward on one dummy row and returns its features sliced to zero rows, so its
    backward reaches every parameter (with zero gradient) and the engine's gradient
    all-reduce matches the other ranks' (open_clip models cannot forward 0 rows)."""
    rows = keep.nonzero().squeeze(1)  # the one host sync: the forward's shape depends on it
    if rows.numel():
        return forward_features(model, images.index_select(0, rows),
                                texts.index_select(0, rows))
    img, txt = forward_features(model, dummy[0], dummy[1])
    return img[:0], txt[:0]


def forward_features(model: Any, images: torch.Tensor, texts: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features through `model`'s own forward: for a DeepSpeed engine,
    engine.forward, so that its per-step bookkeeping (the ZeRO optimizer's backward flags,
    the backward prologue its output hooks run) happens as DeepSpeed expects."""
    out = model(images, texts)  # open_clip, output_dict=True (see create)
    return out["image_features"], out["text_features"]


def blank_row(preprocess: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 3, H, W) black image through `preprocess` and an empty caption's tokens."""
    from PIL import Image

    image = preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(device=device, dtype=dtype)
    return image, tokenizer([""]).to(device)


def clipscore(img: torch.Tensor, txt: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """CLIPScore as the reference code computes it: max(100 * cos, 0), (b,) fp32, from
    L2-normalised features (their dot product), or with cosine=True through
    F.cosine_similarity as the reference does (equal up to rounding)."""
    if cosine:
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
    else:
        cos = (img.float() * txt.float()).sum(-1)
    return (100.0 * cos).clamp(min=0.0)


def master_copies(engine: Any, param: torch.nn.Parameter) -> list[torch.Tensor]:
    """The fp32 tensors the optimizer updates for `param` (this rank's share).

    With bf16 or ZeRO 1/2, DeepSpeed's optimizer steps an fp32 master copy and copies it
    over the module parameter after every step, so a bound on the module parameter alone
    is overwritten at the next step. Covered: ZeRO 1/2 (any precision; the rank's fragment
    of the flat fp32 partition, empty on ranks that do not own any of `param`), bf16 with
    ZeRO 0 (DeepSpeed's unfused bf16 optimizer: one fp32 clone per parameter) and plain
    fp32 without ZeRO (the parameter itself). Anything else raises, naming the optimizer,
    rather than silently bounding a copy the optimizer never reads."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:  # ZeRO 1/2: this rank's slice of the fp32 partition
        return [mapping.get_hp_fragment()]
    if hasattr(param, "_hp_mapping"):
        return []  # ZeRO 1/2, and this rank owns no element of param
    opt = getattr(engine, "optimizer", None)
    lp_groups, hp_groups = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if lp_groups is not None and hp_groups is not None:  # bf16, ZeRO 0 (unfused)
        for lp, hp in zip(lp_groups, hp_groups):
            for i, p in enumerate(lp):
                if p is param:
                    return [hp[i]]
        raise RuntimeError(f"{type(opt).__name__} holds no fp32 copy of the parameter")
    if param.dtype == torch.float32 and isinstance(opt, torch.optim.Optimizer) and any(
            p is param for g in opt.param_groups for p in g["params"]):
        return [param]  # fp32, ZeRO 0: the optimizer steps the module parameter itself
    raise RuntimeError(
        f"cannot find the optimizer's copy of a {tuple(param.shape)} parameter in "
        f"{type(opt).__name__}: "
        "supported are fp32 or bf16 with train.zero_stage 0, 1 or 2")


def clamp_logit_scale(engine: Any) -> None:
    """Bound exp(logit_scale) at 100 where the optimizer holds it (open_clip's and the
    reference's clamp, which act on the module parameter of an fp32 model): on the fp32
    master copy, and on the module parameter the forward reads. Local to each rank."""
    m = unwrap(engine)
    with torch.no_grad():
        for t in master_copies(engine, m.logit_scale):
            t.clamp_(0, LOGIT_SCALE_MAX)
        m.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def export_open_clip(model: torch.nn.Module, path: str) -> None:
    """A state dict open_clip.create_model(name, pretrained=path) loads (0-dim
    logit_scale restored)."""
    m = unwrap(model)
    sd = {k: v.detach().cpu() for k, v in m.state_dict().items()}
    sd["logit_scale"] = sd["logit_scale"].reshape(())
    torch.save(sd, path)


