"""Attention in open_clip's transformer towers through one
`F.scaled_dot_product_attention` call per block.

open_clip 3.3.0's `ResidualAttentionBlock` calls `nn.MultiheadAttention`, and its text
tower passes a float causal mask (-inf above the diagonal). In a no-grad forward in eval
mode (the scoring pass, evaluation) torch then takes MHA's inference fast path, which with
a mask runs an unfused kernel that materialises the b x heads x T x T scores
(pytorch/pytorch#166166); training goes through SDPA with the mask materialised. Here
every such block runs SDPA with `is_causal=True` in the text tower (no mask tensor, so the
fused kernels apply) and no mask in the vision tower, in training, scoring and evaluation
alike.

The swap keeps the parameters themselves (`in_proj_weight`, `in_proj_bias`,
`out_proj.weight`, `out_proj.bias`: the same tensors, under the same state-dict keys), so
checkpoints and the exported model load in stock open_clip and stock checkpoints load
here. Left as they are: towers without `ResidualAttentionBlock`s (ModifiedResNet's
attention pool, which calls `F.multi_head_attention_forward` without a mask; timm and
Hugging Face towers) and open_clip's `CustomResidualAttentionBlock`, which already calls
SDPA. A text tower whose mask is more than the plain causal one (CoCa's class token,
a padding mask) is refused, naming `model.attention=stock`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SdpaAttention(nn.Module):
    """Multi-head self-attention over `nn.MultiheadAttention`'s parameters, in one SDPA
    call. Called as open_clip's blocks call MHA: `attn(x, x, x, need_weights=False,
    attn_mask=None)[0]`; x is (b, T, d) when batch_first, else (T, b, d)."""

    def __init__(self, mha: nn.MultiheadAttention, *, causal: bool) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("SdpaAttention covers MHA with one packed in_proj, no bias_k/"
                             "bias_v and no add_zero_attn (open_clip's blocks); this one "
                             "differs: keep it stock (model.attention=stock)")
        self.in_proj_weight = mha.in_proj_weight  # (3d, d): the same Parameter, not a copy
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.num_heads = mha.num_heads
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self.causal = causal

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, None]:
        if need_weights or attn_mask is not None or key is not query or value is not query:
            raise ValueError(
                "SdpaAttention is self-attention without an explicit mask (causality is "
                "its own flag); this call passed "
                + ("need_weights=True" if need_weights else
                   "an attn_mask" if attn_mask is not None else "a different key/value")
                + ": build the model with model.attention=stock")
        x = query if self.batch_first else query.transpose(0, 1)
        b, t, d = x.shape
        h = self.num_heads
        # (b, T, 3d) -> 3 x (b, h, T, d/h)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias) \
            .view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        o = self.out_proj(o.transpose(1, 2).reshape(b, t, d))
        return (o if self.batch_first else o.transpose(0, 1)), None


def _causal_mask_kind(mask: torch.Tensor | None) -> bool:
    """True for open_clip's causal mask (T, T) of 0 on and below the diagonal and -inf
    above, False for None (a bidirectional tower); anything else raises."""
    if mask is None:
        return False
    t = mask.shape[-1]
    want = torch.full((t, t), float("-inf"), dtype=mask.dtype, device=mask.device).triu(1)
    if mask.shape != (t, t) or not torch.equal(mask, want):
        raise ValueError(
            f"the text tower's attention mask (shape {tuple(mask.shape)}) is not the plain "
            "causal mask SDPA's is_causal reproduces: set model.attention=stock")
    return True


def _swap_blocks(transformer: nn.Module, causal: bool) -> int:
    from open_clip.transformer import ResidualAttentionBlock

    n = 0
    blocks = transformer.resblocks
    assert isinstance(blocks, nn.ModuleList)
    for block in blocks:
        if isinstance(block, ResidualAttentionBlock) and \
                isinstance(block.attn, nn.MultiheadAttention):
            if hasattr(block, "ln_1_kv"):
                raise ValueError("a cross-attention block (CoCa's multimodal decoder) cannot "
                                 "run as SdpaAttention: set model.attention=stock")
            block.attn = SdpaAttention(block.attn, causal=causal)
            n += 1
    return n


def use_sdpa(model: nn.Module) -> dict[str, Any]:
    """Swap, in place, the MHA of every `ResidualAttentionBlock` of `model`'s vision and
    text towers for `SdpaAttention` (causal in the text tower as open_clip's mask was).
    Returns what was swapped: {"vision": blocks, "text": blocks, "text_causal": bool}."""
    from open_clip.transformer import TextTransformer, Transformer

    if getattr(model, "text_decoder", None) is not None:
        raise ValueError("CoCa's multimodal decoder passes its own masks: set "
                         "model.attention=stock")
    done: dict[str, Any] = {"vision": 0, "text": 0, "text_causal": False}
    vis = getattr(getattr(model, "visual", None), "transformer", None)
    if isinstance(vis, Transformer):
        done["vision"] = _swap_blocks(vis, causal=False)
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):  # CustomTextCLIP
        if text.cls_emb is not None or text.use_pad_mask:
            raise ValueError("this text tower masks its class token or padding on top of "
                             "the causal mask, which is_causal cannot express: set "
                             "model.attention=stock")
        causal = _causal_mask_kind(text.attn_mask)
        done["text"] = _swap_blocks(text.transformer, causal)
        text.attn_mask = None  # the blocks apply causality themselves
        done["text_causal"] = causal
    elif isinstance(tf := getattr(model, "transformer", None), Transformer):  # CLIP
        causal = _causal_mask_kind(getattr(model, "attn_mask", None))
        done["text"] = _swap_blocks(tf, causal)
        setattr(model, "attn_mask", None)  # noqa: B010 - a buffer, not an attribute mypy knows
        done["text_causal"] = causal
    return done
