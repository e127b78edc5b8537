"""robustft.clip benchmarks.

1. Lipsum-FT's per-step text side from a RandomTextBank vs fresh encoding (below).
2. Compiled (``torch.compile(fullgraph=True)``, inductor) CLIPood and Lipsum-FT steps through
   ``clip.image_features`` vs the same steps in eager mode (informational: the compile promise is
   pinned by tests/test_clip_compile.py; here the time is reported).
3. A UEO step at C = 1000 classes with ``encode_text_with_context(chunk_size=100)`` (checkpointed)
   vs the plain encoder: peak memory ratio asserted <= 0.25, time ratio reported. Scale: a tiny
   text tower (width 32, 2 layers, context 77) so the run fits a shared CPU; activation memory is
   linear in C and in depth, so the ratio carries to ViT-B-16 (12 layers, width 512).

Lipsum-FT bank vs fresh texts:

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
        texts = bank.sample(80, generator=g_bank)
        return losses.energy_gap(f, reference_features=f0, text_features=texts)

    def baseline() -> torch.Tensor:
        tokens = clip.random_text_tokens(80, generator=g_fresh)
        with torch.no_grad():
            texts = model.encode_text(tokens)
        return losses.energy_gap(f, reference_features=f0, text_features=texts)

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


def _tiny_clip(text_layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=1, width=32, patch_size=8, image_size=32, head_width=16
        ),
        text_cfg=open_clip.CLIPTextCfg(
            context_length=77, vocab_size=49408, width=32, heads=2, layers=text_layers
        ),
    )


@pytest.mark.parametrize("method", ["clipood", "lipsum"])
def test_compiled_step_vs_eager(
    method: str, compare: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    smoke = bool(request.config.getoption("benchmark_disable"))
    model = _tiny_clip().train()
    trained = {
        k: v.detach().clone().requires_grad_()
        for k, v in model.named_parameters()
        if k.startswith("visual.")
    }
    teacher = {k: v.detach().clone() for k, v in trained.items()}
    head = F.normalize(torch.randn(10, 16), dim=-1)
    distances = losses.text_distances(head)
    bank = clip.RandomTextBank(F.normalize(torch.randn(1000, 16), dim=-1), torch.zeros(1, 1))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    key = torch.tensor(0)

    def step(params: dict[str, torch.Tensor], key: torch.Tensor) -> torch.Tensor:
        f = clip.image_features(model, params, images, normalize=False)
        if method == "clipood":
            return losses.margin_metric_softmax(
                f, head, labels, margin=0.3, logit_scale=100.0, text_distances=distances
            )
        f0 = clip.frozen_copy_features(model, images, params=teacher, normalize=False)
        ce = F.cross_entropy(100.0 * F.normalize(f, dim=-1) @ head.T, labels)
        texts = bank.sample(80, key=key)
        return ce + losses.energy_gap(f, reference_features=f0, text_features=texts)

    compiled = torch.compile(step, fullgraph=True, backend="eager" if smoke else "inductor")

    def kernel() -> None:
        compiled(trained, key).backward()

    def baseline() -> None:
        step(trained, key).backward()

    compare(
        f"compiled {method} step (image_features)",
        kernel,
        f"eager {method} step",
        baseline,
        target=None,
        rounds=9,
        warmup=2,
    )


def test_ueo_step_chunked_context_encoder(
    compare: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    from _memory import peak_alloc_bytes

    smoke = bool(request.config.getoption("benchmark_disable"))
    classes, chunk = (64, 8) if smoke else (1000, 100)
    model = _tiny_clip(text_layers=2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = open_clip.get_tokenizer("ViT-B-32")
    names = [f"class number {i}" for i in range(classes)]
    context = clip.init_context(model, tok)
    images = torch.randn(16, 3, 32, 32)
    confidence = torch.rand(16) * 0.9 + 0.05
    with torch.no_grad():
        feats = clip.image_features(model, None, images)

    def ueo_step(chunk_size: int | None) -> None:
        text = clip.encode_text_with_context(model, context, names, tok, chunk_size=chunk_size)
        loss = losses.ueo(100.0 * feats @ text.T, confidence)
        loss.backward()
        context.grad = None

    ueo_step(None)  # warm the prompt-token cache
    plain = peak_alloc_bytes(lambda: ueo_step(None))
    bounded = peak_alloc_bytes(lambda: ueo_step(chunk))
    ratio = bounded / plain
    print(
        f"\nUEO step at C={classes}: peak memory plain {plain / 2**20:.1f} MiB, "
        f"chunk_size={chunk} {bounded / 2**20:.1f} MiB, ratio {ratio:.3f} (target <= 0.25)"
    )
    assert ratio <= 0.25, f"chunked UEO encoder peak memory {ratio:.3f}x plain, target <= 0.25"
    compare(
        f"UEO step C={classes} chunk_size={chunk}",
        lambda: ueo_step(chunk),
        "UEO step, plain encoder",
        lambda: ueo_step(None),
        target=None,
        rounds=3 if not smoke else 1,
        warmup=1,
    )
