"""Tiny open_clip models for the robustft.clip tests (random weights, built offline in ~0.1 s).

Widths and depths are tiny, but the vocabulary (49,408 ids) and context length (77) are the real
ones, so the standard tokenizer works unchanged.
"""

from __future__ import annotations

import open_clip
import torch
from torch import nn

EMBED_DIM = 16
TEXT_WIDTH = 32


def text_cfg(**overrides: object) -> open_clip.CLIPTextCfg:
    cfg = {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2, "layers": 1}
    cfg.update(overrides)
    return open_clip.CLIPTextCfg(**cfg)  # type: ignore[arg-type]


def vit_cfg() -> open_clip.CLIPVisionCfg:
    return open_clip.CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=32, head_width=16)


def resnet_cfg() -> open_clip.CLIPVisionCfg:
    return open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32, head_width=16)


def _randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm affines (open_clip initialises them to 1/0), so tests can tell them apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
    return model


def tiny_vit_clip(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=EMBED_DIM, vision_cfg=vit_cfg(), text_cfg=text_cfg())
    return _randomise_norms(model, seed).eval()


def tiny_resnet_clip(seed: int = 1) -> open_clip.CLIP:
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=EMBED_DIM, vision_cfg=resnet_cfg(), text_cfg=text_cfg())
    return _randomise_norms(model, seed).eval()


def tiny_custom_text_clip(seed: int = 2, **text_overrides: object) -> open_clip.CustomTextCLIP:
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(
        embed_dim=EMBED_DIM, vision_cfg=vit_cfg(), text_cfg=text_cfg(**text_overrides)
    )
    return _randomise_norms(model, seed).eval()


def tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")
