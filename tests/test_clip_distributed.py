"""robustft.clip under DistributedDataParallel (gloo, 2 CPU ranks).

A functional call on ``ddp.module`` would silently skip DDP's gradient hooks (issue 10). Passing the
DDP wrapper routes the method through DDP's forward, so gradients are synchronised exactly as with
``ddp(x)``; a trained call on ``ddp.module`` raises.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _dist import run_distributed

from robustft import clip, tree


def _images(rank: int) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(100 + rank))


def _ddp_body(rank: int, world_size: int) -> dict[str, list[float]]:
    from clip_models import tiny_vit_clip, tokenizer
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_vit_clip()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    ddp = DistributedDataParallel(model)
    target = torch.randn(16, generator=torch.Generator().manual_seed(7))

    # the wrapper: routed through DDP's forward, gradients averaged over the ranks
    feats = clip.image_features(ddp, None, _images(rank))
    (feats @ target).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # the trained .module: refused loudly instead of silently unsynchronised gradients
    with pytest.raises(ValueError, match=r"image_features: model must not be the .module of a"):
        clip.image_features(model, None, _images(rank))
    with pytest.raises(
        ValueError, match=r"replicate it with robustft\.distributed\.replicate\(params\)$"
    ):
        clip.image_features(model, None, _images(rank))
    tok = tokenizer()
    ctx = clip.init_context(model, tok)
    with pytest.raises(ValueError, match=r"encode_text_with_context: model must not be the"):
        model.ln_final.weight.requires_grad_(True)
        clip.encode_text_with_context(model, ctx, ["cat"], tok)
    model.ln_final.weight.requires_grad_(False)
    # ... but fine without gradient, or when params replace every trained tensor
    with torch.no_grad():
        clip.image_features(model, None, _images(rank))
    trained, _ = tree.partition(dict(model.named_parameters()), clip.visual_names(model))
    own = {k: v.detach().clone().requires_grad_() for k, v in trained.items()}
    clip.image_features(model, own, _images(rank))
    # the teacher and heads unwrap the wrapper (no gradient, nothing to synchronise)
    f0 = clip.frozen_copy_features(ddp, _images(rank))
    with torch.no_grad():
        torch.testing.assert_close(f0, model.encode_image(_images(rank), normalize=True))
    head = clip.zero_shot_head(ddp, tok, ["cat", "dog"], ["a {}."])
    torch.testing.assert_close(head, clip.zero_shot_head(model, tok, ["cat", "dog"], ["a {}."]))
    text = clip.text_features(ddp, None, tok(["a cat"]))
    assert text.shape == (1, 16)
    return {n: g.flatten().tolist() for n, g in grads.items()}  # plain data through the queue


def test_ddp_wrapper_synchronises_and_module_call_raises() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from clip_models import tiny_vit_clip

    results = run_distributed(_ddp_body, world_size=2)
    # single process on the concatenated global batch: the gradient DDP must reproduce
    model = copy.deepcopy(tiny_vit_clip())
    target = torch.randn(16, generator=torch.Generator().manual_seed(7))
    images = torch.cat([_images(0), _images(1)])
    (model.encode_image(images, normalize=True) @ target).mean().backward()
    for grads in results:
        assert set(grads) == {n for n, _ in model.named_parameters() if n.startswith("visual.")}
        for name, g in grads.items():
            expected = model.get_parameter(name).grad
            torch.testing.assert_close(torch.tensor(g), expected.flatten(), rtol=1e-4, atol=1e-6)
