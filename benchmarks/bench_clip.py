"""robustft.clip benchmark: Lipsum-FT's per-step text side from a RandomTextBank vs fresh encoding.

The official Lipsum-FT code draws M = 80 fresh random texts every step and runs the (frozen) text
tower on them before the energy gap. With the tower frozen, robustft pre-encodes a bank once and
each step only samples M rows: the kernel is ``bank.sample(80) + losses.energy_gap`` on B image
features, the baseline ``random_text_tokens(80) + encode_text (no_grad) + losses.energy_gap``.

Real run: a ViT-B-16-shaped text tower (width 512, 8 heads, 12 layers, context 77, vocabulary
49,408, embed dim 512; random weights, CPU), B = 256 image features, a bank of 10,000 rows (the
paper's energy-gap bank size; sampling cost depends only on the bank's shape, so its rows are
random unit vectors instead of 10,000 encoded texts, which would take minutes to build here).
Smoke run (``--benchmark-disable``): a one-layer width-32 tower and a bank built with
``RandomTextBank.from_model``. Target: ratio <= 0.05.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F

from robustft import clip, losses


def _model(width: int, heads: int, layers: int, embed_dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=1, width=32, patch_size=8, image_size=32, head_width=16
        ),
        text_cfg=open_clip.CLIPTextCfg(
            context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers
        ),
    ).eval()


def test_lipsum_text_side_bank_vs_fresh_encoding(
    compare: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    smoke = bool(request.config.getoption("benchmark_disable"))
    if smoke:
        model, batch, dim = _model(32, 2, 1, 32), 8, 32
        bank = clip.RandomTextBank.from_model(model, 96, generator=torch.Generator().manual_seed(0))
    else:
        model, batch, dim = _model(512, 8, 12, 512), 256, 512
        n_bank = 10_000
        bank = clip.RandomTextBank(
            F.normalize(torch.randn(n_bank, dim), dim=-1),
            clip.random_text_tokens(n_bank, generator=torch.Generator().manual_seed(0)),
        )
    f, f0 = torch.randn(batch, dim), torch.randn(batch, dim)
    g_bank, g_fresh = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)

    def kernel() -> torch.Tensor:
        return losses.energy_gap(f, f0, bank.sample(80, generator=g_bank))

    def baseline() -> torch.Tensor:
        tokens = clip.random_text_tokens(80, generator=g_fresh)
        with torch.no_grad():
            texts = model.encode_text(tokens)
        return losses.energy_gap(f, f0, texts)

    assert torch.isfinite(kernel()) and torch.isfinite(baseline())
    compare(
        "clip.RandomTextBank.sample(80)+energy_gap",
        kernel,
        "encode 80 fresh texts+energy_gap",
        baseline,
        target=0.05,
        rounds=5,
        warmup=1,
    )
