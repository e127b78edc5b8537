"""CLIP-LoRA's module surgery, transcribed plainly from the paper's description of its code.

Zanella and Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024
(code: https://github.com/MaxZanella/CLIP-LoRA, ``loralib/layers.py``). CLIP-LoRA does not reuse
PyTorch's fused attention: it replaces every ``nn.MultiheadAttention`` of the chosen towers by a
module with four explicit ``Linear`` layers (query, key, value, output), copies the fused
``in_proj_weight`` rows ``[0:d]``, ``[d:2d]``, ``[2d:3d]`` (and the bias) into the first three and
``out_proj`` into the fourth, and makes the chosen ones LoRA linears:

    y = W x + b + s * (dropout(x) @ A.T) @ B.T,   s = alpha / sqrt(r),

``A`` kaiming-uniform (a = sqrt(5)), ``B`` zero. With no dropout the branch is merged into the
weight, ``F.linear(x, W + s * B @ A, b)``: one matmul per projection. The attention itself is
``F.scaled_dot_product_attention`` with the heads split as ``nn.MultiheadAttention`` splits them.

This is the baseline robustft.peft's ``attach_`` (no surgery, factors on the fused weight) is
tested equal to and timed against; written for this repo, not copied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOWERS = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
"""Where each open_clip ``CLIP`` tower keeps its residual blocks."""

PROJECTIONS = ("q", "k", "v", "o")
_MODULE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank branch, CLIP-LoRA's ``LinearLoRA``."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, *, r: int, alpha: float, dropout: float
    ):
        super().__init__()
        out_features, in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / math.sqrt(r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.dropout is None:
            merged = self.weight + self.scaling * (self.lora_B @ self.lora_A)
            return F.linear(x, merged, self.bias)
        low = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T
        return F.linear(x, self.weight, self.bias) + self.scaling * low


def _plain(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


class LoRAAttention(nn.Module):
    """``nn.MultiheadAttention`` rewritten with explicit q/k/v/output layers (self-attention)."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    proj: nn.Module

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        *,
        projections: Sequence[str],
        r: int,
        alpha: float,
        dropout: float,
    ):
        super().__init__()
        d = mha.embed_dim
        self.embed_dim, self.num_heads = d, mha.num_heads
        self.batch_first = mha.batch_first
        self.attn_dropout = mha.dropout
        w, b = mha.in_proj_weight, mha.in_proj_bias
        pieces = {
            "q": (w[0:d], b[0:d] if b is not None else None),
            "k": (w[d : 2 * d], b[d : 2 * d] if b is not None else None),
            "v": (w[2 * d : 3 * d], b[2 * d : 3 * d] if b is not None else None),
            "o": (mha.out_proj.weight, mha.out_proj.bias),
        }
        for p in PROJECTIONS:
            weight, bias = pieces[p]
            layer: nn.Module
            if p in projections:
                layer = LoRALinear(weight, bias, r=r, alpha=alpha, dropout=dropout)
            else:
                layer = _plain(weight, bias)
            setattr(self, _MODULE[p], layer)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        if self.batch_first:  # work in [length, batch, embed], as nn.MultiheadAttention does
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, n, e = query.shape
        source = key.shape[0]
        h = self.num_heads
        hd = e // h
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        # heads: [L, N, E] -> [L, N*h, hd] -> [N*h, L, hd] -> [N, h, L, hd]
        q = q.reshape(length, n * h, hd).transpose(0, 1).reshape(n, h, length, hd)
        k = k.reshape(source, n * h, hd).transpose(0, 1).reshape(n, h, source, hd)
        v = v.reshape(source, n * h, hd).transpose(0, 1).reshape(n, h, source, hd)
        mask = None
        if attn_mask is not None:  # open_clip's text tower: a float additive [L, S] causal mask
            mask = attn_mask.to(q.dtype)
            if mask.dim() == 3:
                mask = mask.reshape(n, h, length, source)
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(length * n, e)
        out = self.proj(out).reshape(length, n, e)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def clip_lora_(
    model: nn.Module,
    *,
    towers: Sequence[str] = ("visual", "text"),
    projections: Sequence[str] = ("q", "k", "v"),
    r: int = 2,
    alpha: float = 1.0,
    dropout: float = 0.25,
) -> list[str]:
    """Replace the attention of every residual block of ``towers`` (in place); freeze the rest.

    Returns the names of the replaced modules (``'<blocks>.<i>.attn'``), in order. Afterwards only
    the ``lora_A`` / ``lora_B`` parameters require gradients (CLIP-LoRA marks only the LoRA
    parameters trainable).
    """
    model.requires_grad_(False)
    replaced = []
    for tower in towers:
        blocks = model.get_submodule(TOWERS[tower])
        assert isinstance(blocks, nn.ModuleList)
        for i, block in enumerate(blocks):
            mha = block.attn
            assert isinstance(mha, nn.MultiheadAttention)
            block.attn = LoRAAttention(
                mha, projections=projections, r=r, alpha=alpha, dropout=dropout
            )
            replaced.append(f"{TOWERS[tower]}.{i}.attn")
    return replaced


def _lora_key(key: str) -> tuple[str, str, str]:
    """``(attention module, projection, 'A' or 'B')`` of a robustft factor key."""
    if ".attn.in_proj_weight_lora_" in key:
        module, _, rest = key.partition(".attn.in_proj_weight_lora_")
        part, _, block = rest.partition("_")  # "A_q" -> ("A", "q")
        return f"{module}.attn", block, part
    module, _, part = key.partition(".attn.out_proj.weight_lora_")
    return f"{module}.attn", "o", part


def lora_layer(model: nn.Module, key: str) -> tuple[LoRALinear, str]:
    """The transcription's LoRA layer holding robustft's factor ``key``, and the attribute name
    (``'lora_A'`` or ``'lora_B'``)."""
    attn, projection, part = _lora_key(key)
    layer = model.get_submodule(f"{attn}.{_MODULE[projection]}")
    assert isinstance(layer, LoRALinear), f"{key}: {attn}.{_MODULE[projection]} has no LoRA"
    return layer, f"lora_{part}"


@torch.no_grad()
def load_factors_(model: nn.Module, factors: Mapping[str, Tensor]) -> None:
    """Copy a robustft factor tree into the transcription's LoRA layers (same weights on both).

    ``'<blocks>.<i>.attn.in_proj_weight_lora_A_q'`` goes to ``<blocks>.<i>.attn.q_proj.lora_A``,
    ``'<blocks>.<i>.attn.out_proj.weight_lora_B'`` to ``<blocks>.<i>.attn.proj.lora_B``; every LoRA
    layer must receive both of its factors.
    """
    filled = set()
    for key, value in factors.items():
        layer, attr = lora_layer(model, key)
        getattr(layer, attr).copy_(value)
        filled.add((id(layer), attr))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert filled == {(id(m), a) for m in layers for a in ("lora_A", "lora_B")}


def factors_of(model: nn.Module, keys: Sequence[str]) -> dict[str, Tensor]:
    """The transcription's factor parameters under robustft's keys (to compare values or grads)."""
    out = {}
    for key in keys:
        layer, attr = lora_layer(model, key)
        out[key] = getattr(layer, attr)
    return out
