"""torch.compile(fullgraph=True) of training steps through robustft.clip's functional forwards.

Issue 13: a CLIPood step (image_features + margin_metric_softmax + backward) and a Lipsum-FT step
(image_features + frozen_copy_features + energy_gap on bank rows) compile into one graph and do
not recompile over 20 steps of the same shapes (dynamo counters, cheap "eager" backend).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from clip_models import tiny_resnet_clip, tiny_vit_clip
from torch._dynamo.utils import counters

from robustft import clip, losses, tree


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    visual, _ = tree.partition(dict(model.named_parameters()), clip.visual_names(model))
    return {k: v.detach().clone().requires_grad_() for k, v in visual.items()}


def _run(step: Callable[..., torch.Tensor], params: dict[str, torch.Tensor], n: int = 20) -> None:
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        images = torch.randn(4, 3, 32, 32, generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        for p in params.values():
            p.grad = None
        loss = compiled(params, images, labels, torch.tensor(i))
        loss.backward()
        got = {k: p.grad.clone() for k, p in params.items()}
        for p in params.values():
            p.grad = None
        expected = step(params, images, labels, torch.tensor(i))
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for k, p in params.items():
            # eager runs the frozen forward on nn.MultiheadAttention's inference fast path, the
            # traced graph does not: ~1e-7 feature differences, amplified by Lipsum's s^2 = 1e4
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(got[k], p.grad, rtol=1e-3, atol=1e-4 * scale)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("make", [tiny_vit_clip, tiny_resnet_clip])
def test_clipood_step_compiles_once(make: Callable[[], torch.nn.Module]) -> None:
    model = make().train()
    head = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    distances = losses.text_distances(head)
    scale = clip.logit_scale(model).detach()

    def step(params, images, labels, key):  # type: ignore[no-untyped-def]
        f = clip.image_features(model, params, images, normalize=False)
        return losses.margin_metric_softmax(
            f, head, labels, margin=0.3, logit_scale=scale, text_distances=distances
        )

    _run(step, _trained(model))


def test_lipsum_step_compiles_once() -> None:
    model = tiny_vit_clip().train()
    theta0 = tree.clone(dict(model.named_parameters()), detach=True)
    teacher, _ = tree.partition(theta0, clip.visual_names(model))
    bank = clip.RandomTextBank.from_model(model, 64, generator=torch.Generator().manual_seed(0))
    head = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)

    def step(params, images, labels, key):  # type: ignore[no-untyped-def]
        f = clip.image_features(model, params, images, normalize=False)
        f0 = clip.frozen_copy_features(model, images, params=teacher, normalize=False)
        ce = torch.nn.functional.cross_entropy(
            100.0 * torch.nn.functional.normalize(f, dim=-1) @ head.T, labels
        )
        texts = bank.sample(8, key=key)
        return ce + losses.energy_gap(f, reference_features=f0, text_features=texts)

    _run(step, _trained(model))
    assert model.training and model.visual.training  # eval mode of the teacher was restored


def test_text_features_compile_once() -> None:
    model = tiny_vit_clip()
    params = {"ln_final.weight": model.ln_final.weight.detach().clone().requires_grad_()}

    def step(params, tokens):  # type: ignore[no-untyped-def]
        return clip.text_features(model, params, tokens).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for i in range(5):
        tokens = clip.random_text_tokens(3, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(compiled(params, tokens), step(params, tokens))
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
