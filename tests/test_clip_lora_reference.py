"""robustft.peft.attach_ against CLIP-LoRA's module surgery (tests/reference/clip_lora_ref.py).

Both towers of a tiny open_clip ViT, CLIP-LoRA's settings (r = 2, alpha = 1, s = alpha/sqrt(r),
branch dropout 0.25, q/k/v, optionally the output projection), the same factors on both sides with
a random non-zero B. robustft keeps open_clip's fused ``nn.MultiheadAttention`` and its
``in_proj_weight``; the transcription replaces the module. The dropout draws happen in the same
order on both sides (per block: q, k, v on the ``[length, batch, width]`` inputs, then the output
projection's input), so training-mode outputs are compared under one ``torch.manual_seed``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_vit_clip, tokenizer
from reference.clip_lora_ref import (
    LoRAAttention,
    LoRALinear,
    clip_lora_,
    factors_of,
    load_factors_,
)
from torch import Tensor, nn

from robustft import peft

RANK, ALPHA = 2, 1.0
TEXTS = ["a photo of a cat.", "a photo of a dog.", "a drawing of a tree."]


def _spec(qkv: tuple[str, ...], out: bool, dropout: float) -> peft.Spec:
    targets = ["*attn.in_proj_weight"] + (["*attn.out_proj.weight"] if out else [])
    return peft.lora(
        rank=RANK, alpha=ALPHA, targets=targets, scaling="sqrt_rank", qkv=qkv, dropout=dropout
    )


def _pair(
    qkv: tuple[str, ...], out: bool, dropout: float
) -> tuple[nn.Module, nn.Module, dict[str, Tensor], nn.Module]:
    """``(attached, transcription, factors, base)``: two copies of one model, the same factors."""
    base = tiny_vit_clip()
    spec = _spec(qkv, out, dropout)
    factors = peft.init(
        spec, dict(base.named_parameters()), generator=torch.Generator().manual_seed(1)
    )
    g = torch.Generator().manual_seed(2)
    factors = {
        k: 0.5 * torch.randn(v.shape, generator=g) if "lora_B" in k else v
        for k, v in factors.items()
    }
    attached = peft.attach_(copy.deepcopy(base), spec, factors)
    surgery = copy.deepcopy(base)
    replaced = clip_lora_(
        surgery, projections=qkv + (("o",) if out else ()), r=RANK, alpha=ALPHA, dropout=dropout
    )
    assert len(replaced) == 2  # one block per tower in the tiny model
    load_factors_(surgery, factors)
    return attached, surgery, factors, base


def _inputs() -> tuple[Tensor, Tensor]:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return images, tokenizer()(TEXTS)


def _features(model: Any, images: Tensor, texts: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(seed)
    return model.encode_image(images), model.encode_text(texts)


def _loss(model: nn.Module, images: Tensor, texts: Tensor, seed: int) -> Tensor:
    """CLIP-LoRA's step loss: CE of logit-scaled cosine similarities of images vs class texts."""
    img, txt = _features(model, images, texts, seed)
    logits = 100.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return F.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))


CASES = [
    pytest.param(("q", "k", "v"), False, id="qkv"),
    pytest.param(("q", "k", "v"), True, id="qkvo"),
    pytest.param(("q", "v"), True, id="qvo"),
]


@pytest.mark.parametrize(("qkv", "out"), CASES)
@pytest.mark.parametrize("dropout", [0.25, 0.0])
def test_eval_outputs_equal(qkv: tuple[str, ...], out: bool, dropout: float) -> None:
    attached, surgery, _, base = _pair(qkv, out, dropout)
    images, texts = _inputs()
    a = _features(attached.eval(), images, texts, 0)
    b = _features(surgery.eval(), images, texts, 0)
    plain = _features(base.eval(), images, texts, 0)
    for x, y, z in zip(a, b, plain, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert (x - z).abs().max() > 1e-2  # the factors change the output


@pytest.mark.parametrize(("qkv", "out"), CASES)
def test_train_outputs_equal_under_one_seed(qkv: tuple[str, ...], out: bool) -> None:
    attached, surgery, _, _ = _pair(qkv, out, 0.25)
    images, texts = _inputs()
    a = _features(attached.train(), images, texts, 7)
    b = _features(surgery.train(), images, texts, 7)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # the branch dropout is live: another seed, or eval mode, gives other outputs
    other = _features(attached, images, texts, 8)
    evaluated = _features(attached.eval(), images, texts, 7)
    for x, y, z in zip(a, other, evaluated, strict=True):
        assert (x - y).abs().max() > 1e-3
        assert (x - z).abs().max() > 1e-3


@pytest.mark.parametrize(("qkv", "out"), CASES)
@pytest.mark.parametrize(("dropout", "train"), [(0.25, True), (0.25, False), (0.0, True)])
def test_factor_gradients_equal(
    qkv: tuple[str, ...], out: bool, dropout: float, train: bool
) -> None:
    attached, surgery, factors, _ = _pair(qkv, out, dropout)
    images, texts = _inputs()
    _loss(attached.train(train), images, texts, 11).backward()
    _loss(surgery.train(train), images, texts, 11).backward()
    mine, rest = peft.split(dict(attached.named_parameters()))
    assert sorted(mine) == sorted(factors)
    assert not any(p.requires_grad for p in rest.values())
    theirs = factors_of(surgery, list(mine))
    assert {n for n, p in surgery.named_parameters() if p.requires_grad} == {
        n for n, p in surgery.named_parameters() if n.endswith(("lora_A", "lora_B"))
    }
    for key, p in mine.items():
        assert p.grad is not None and theirs[key].grad is not None, key
        # float32 sums in another order (fused [3d, d] weight vs three [d, d]): atol by scale
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(p.grad, theirs[key].grad, rtol=1e-4, atol=1e-4 * scale)
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in mine.values())


def test_transcription_with_zero_b_is_the_pretrained_model() -> None:
    """The surgery alone (B = 0, as CLIP-LoRA starts) reproduces open_clip's attention."""
    base = tiny_vit_clip()
    surgery = copy.deepcopy(base)
    clip_lora_(surgery, projections=("q", "k", "v", "o"), r=RANK, alpha=ALPHA, dropout=0.25)
    assert isinstance(surgery.get_submodule("visual.transformer.resblocks.0.attn"), LoRAAttention)
    assert isinstance(surgery.get_submodule("transformer.resblocks.0.attn"), LoRAAttention)
    images, texts = _inputs()
    for x, y in zip(
        _features(surgery.train(), images, texts, 0),
        _features(base.eval(), images, texts, 0),
        strict=True,
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_transcription_in_eval_equals_the_folded_weights() -> None:
    """Independent of attach_: the surgery's eval output is the model with W + s B A folded in."""
    _, surgery, factors, base = _pair(("q", "k", "v"), True, 0.25)
    spec = _spec(("q", "k", "v"), True, 0.25)
    folded = copy.deepcopy(base)
    folded.load_state_dict(peft.fold(spec, factors, base=dict(base.state_dict())))
    images, texts = _inputs()
    for x, y in zip(
        _features(surgery.eval(), images, texts, 0),
        _features(folded.eval(), images, texts, 0),
        strict=True,
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_load_factors_puts_each_factor_in_its_projection() -> None:
    _, surgery, factors, _ = _pair(("q", "v"), True, 0.25)
    attn: Any = surgery.get_submodule("visual.transformer.resblocks.0.attn")
    prefix = "visual.transformer.resblocks.0.attn."
    torch.testing.assert_close(attn.q_proj.lora_A, factors[prefix + "in_proj_weight_lora_A_q"])
    torch.testing.assert_close(attn.v_proj.lora_B, factors[prefix + "in_proj_weight_lora_B_v"])
    torch.testing.assert_close(attn.proj.lora_B, factors[prefix + "out_proj.weight_lora_B"])
    assert not isinstance(attn.k_proj, LoRALinear)  # 'k' not chosen: a plain frozen Linear
    assert set(factors_of(surgery, list(factors))) == set(factors)


def test_lora_linear_hand_values() -> None:
    """y = W x + b + s (x A^T) B^T in eval mode; merged weight with dropout 0; s = alpha/sqrt(r)."""
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([0.5, -0.5])
    x = torch.tensor([[1.0, 1.0]])
    for p in (0.25, 0.0):
        layer = LoRALinear(w, b, r=4, alpha=2.0, dropout=p).eval()
        assert layer.scaling == 1.0  # 2 / sqrt(4)
        torch.testing.assert_close(layer(x), torch.tensor([[1.5, 1.5]]))  # B = 0: W x + b
        with torch.no_grad():
            layer.lora_A.copy_(torch.tensor([[1.0, 2.0]] + [[0.0, 0.0]] * 3))
            layer.lora_B.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        # x A^T = [3, 0, 0, 0]; (.) B^T = [3, -3]
        torch.testing.assert_close(layer(x), torch.tensor([[4.5, -1.5]]))
    bound = 1 / math.sqrt(2)  # kaiming-uniform(a=sqrt(5)) on fan_in 2
    a = LoRALinear(w, b, r=64, alpha=1.0, dropout=0.0).lora_A.detach()
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.8 * bound
