"""open_clip models: creation (open_clip names, plus the tiny configs shipped in
dissect_dist/model_configs for CPU runs), the scoring forward, and export."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

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


def create(name: str, pretrained: str | None = None) -> tuple[torch.nn.Module, Any, Any, Any]:
    """(model, train preprocess, eval preprocess, tokenizer)."""
    import open_clip

    check_name(name)
    model, pre_train, pre_eval = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, output_dict=True)
    # DeepSpeed 0.19.x cannot initialize an engine holding a 0-dim parameter
    # ("self.dim() cannot be 0 to view Float as Byte"): keep logit_scale 1-element.
    # open_clip's forward and our loss broadcast it the same way.
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
    return model, pre_train, pre_eval, open_clip.get_tokenizer(name)


def encode(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features (b, d)."""
    m = getattr(model, "module", model)
    return m.encode_image(images, normalize=True), m.encode_text(texts, normalize=True)


def encode_kept(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor,
                keep: torch.Tensor, dummy: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the kept rows, with gradient. A rank that keeps no row still runs
    the forward on one dummy row and returns its features sliced to zero rows, so its
    backward reaches every parameter (with zero gradient) and the engine's gradient
    all-reduce matches the other ranks' (open_clip models cannot forward 0 rows)."""
    if bool(keep.any()):  # CPU-GPU sync point: the forward's shape depends on it
        return encode(model, images[keep], texts[keep])
    img, txt = encode(model, dummy[0], dummy[1])
    return img[:0], txt[:0]


def clipscore(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """CLIPScore as the reference code computes it: max(100 * cos, 0), (b,) fp32."""
    return (100.0 * (img.float() * txt.float()).sum(-1)).clamp(min=0.0)


def clamp_logit_scale(model: torch.nn.Module) -> None:
    m = getattr(model, "module", model)
    with torch.no_grad():
        m.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def export_open_clip(model: torch.nn.Module, path: str) -> None:
    """A state dict open_clip.create_model(name, pretrained=path) loads (0-dim
    logit_scale restored)."""
    m = getattr(model, "module", model)
    sd = {k: v.detach().cpu() for k, v in m.state_dict().items()}
    sd["logit_scale"] = sd["logit_scale"].reshape(())
    torch.save(sd, path)


