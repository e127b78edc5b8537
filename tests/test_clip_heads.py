"""robustft.clip zero-shot heads and CAR-FT context prototypes on tiny open_clip models."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_custom_text_clip, tiny_resnet_clip, tiny_vit_clip, tokenizer
from reference.clip_ref import context_prototypes_ref, zero_shot_head_ref
from torch import nn

from robustft import clip

NAMES = ["cat", "golden retriever", "dog"]
TEMPLATES = ["a photo of a {}.", "itap of a {}.", "a {} in the wild."]


@pytest.fixture(scope="module")
def tok() -> open_clip.tokenizer.SimpleTokenizer:
    return tokenizer()


@pytest.fixture(scope="module", params=["vit", "resnet", "custom_text"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    return {"vit": tiny_vit_clip, "resnet": tiny_resnet_clip, "custom_text": tiny_custom_text_clip}[
        request.param
    ]()


class CharModel(nn.Module):
    """encode_text = (#characters, 1) as float: hand-computable features."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.seen_training: list[bool] = []
        self.batches: list[int] = []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.batches.append(tokens.shape[0])
        return self.drop(torch.cat([tokens, torch.ones_like(tokens)], 1).float())


def count(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t)] for t in texts])


def test_head_hand_computed() -> None:
    # class "a": texts "a" (1,1), "a!!" (3,1); class "bb": "bb" (2,1), "bb!!" (4,1)
    head = clip.zero_shot_head(CharModel(), count, ["a", "bb"], ["{}", "{}!!"])

    def unit(x: float, y: float) -> torch.Tensor:
        v = torch.tensor([float(x), float(y)])
        return v / v.norm()

    expected = torch.stack(
        [F.normalize(unit(1, 1) + unit(3, 1), dim=0), F.normalize(unit(2, 1) + unit(4, 1), dim=0)]
    )
    torch.testing.assert_close(head, expected, rtol=0, atol=1e-7)


def test_prototypes_hand_computed() -> None:
    protos = clip.context_prototypes(CharModel(), count, ["a", "bb"], ["{}", "{}!!"])

    def unit(x: float, y: float) -> torch.Tensor:
        v = torch.tensor([float(x), float(y)])
        return v / v.norm()

    expected = torch.stack(
        [F.normalize(unit(1, 1) + unit(2, 1), dim=0), F.normalize(unit(3, 1) + unit(4, 1), dim=0)]
    )
    torch.testing.assert_close(protos, expected, rtol=0, atol=1e-7)


def test_head_equals_manual_loop_exactly(model: nn.Module, tok: object) -> None:
    # one class per text-tower batch, like the reference loop: bit-for-bit equal
    head = clip.zero_shot_head(model, tok, NAMES, TEMPLATES, batch_size=len(TEMPLATES))
    assert torch.equal(head, zero_shot_head_ref(model, tok, NAMES, TEMPLATES))


@pytest.mark.parametrize("batch_size", [1, 4, 1000])
def test_head_batching_changes_only_rounding(batch_size: int, tok: object) -> None:
    model = tiny_vit_clip()
    head = clip.zero_shot_head(model, tok, NAMES, TEMPLATES, batch_size=batch_size)
    ref = zero_shot_head_ref(model, tok, NAMES, TEMPLATES)
    torch.testing.assert_close(head, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(NAMES)), rtol=0, atol=1e-6)


def test_prototypes_equal_reference(model: nn.Module, tok: object) -> None:
    protos = clip.context_prototypes(model, tok, NAMES, TEMPLATES, batch_size=5)
    torch.testing.assert_close(
        protos, context_prototypes_ref(model, tok, NAMES, TEMPLATES), rtol=0, atol=1e-6
    )
    assert protos.shape == (len(TEMPLATES), 16)


def test_head_with_open_clip_templates_matches_open_clip(tok: object) -> None:
    model = tiny_vit_clip()
    names = list(open_clip.IMAGENET_CLASSNAMES[:2])
    for templates in (open_clip.OPENAI_IMAGENET_TEMPLATES, open_clip.SIMPLE_IMAGENET_TEMPLATES):
        ours = clip.zero_shot_head(model, tok, names, templates, batch_size=len(templates))
        with torch.no_grad():
            theirs = open_clip.build_zero_shot_classifier(
                model, tok, names, templates, num_classes_per_batch=1
            )
        torch.testing.assert_close(ours, theirs.T, rtol=0, atol=3e-7)


def test_streams_batches_and_never_encodes_everything_at_once() -> None:
    toy = CharModel()
    clip.zero_shot_head(toy, count, ["a", "b", "c", "d", "e"], ["{}", "{}.", "{}!"], batch_size=4)
    assert toy.batches == [4, 4, 4, 3]


def test_eval_mode_no_grad_and_flags_restored(tok: object) -> None:
    toy = CharModel()
    toy.train()
    toy.drop.eval()  # a mixed state must survive
    head = clip.zero_shot_head(toy, count, ["ab"], ["{}"])
    torch.testing.assert_close(head, F.normalize(torch.tensor([[2.0, 1.0]]), dim=-1))  # no dropout
    assert toy.seen_training == [False]
    assert toy.training and not toy.drop.training

    model = tiny_vit_clip().train()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    out = clip.context_prototypes(model, tok, NAMES, TEMPLATES, params=params)
    assert not out.requires_grad
    assert all(m.training for m in model.modules())


def test_params_tree_is_used_and_not_mutated(tok: object) -> None:
    model = tiny_vit_clip()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.text_projection.mul_(-1.5)
        other.ln_final.bias.add_(0.3)
    partial = {"text_projection": other.text_projection, "ln_final.bias": other.ln_final.bias}
    snapshot = {k: v.clone() for k, v in partial.items()}
    head = clip.zero_shot_head(model, tok, NAMES, TEMPLATES, params=partial)
    torch.testing.assert_close(
        head, zero_shot_head_ref(other, tok, NAMES, TEMPLATES), atol=1e-6, rtol=0
    )
    assert not torch.allclose(head, zero_shot_head_ref(model, tok, NAMES, TEMPLATES), atol=1e-3)
    assert all(torch.equal(partial[k], snapshot[k]) for k in partial)


def test_bf16_model_gives_float32_head_close_to_fp32(tok: object) -> None:
    model = tiny_vit_clip()
    ref = clip.zero_shot_head(model, tok, NAMES, TEMPLATES)
    head = clip.zero_shot_head(copy.deepcopy(model).to(torch.bfloat16), tok, NAMES, TEMPLATES)
    assert head.dtype == torch.float32 and ref.dtype == torch.float32
    torch.testing.assert_close(head, ref, rtol=0, atol=0.05)
    head64 = clip.zero_shot_head(copy.deepcopy(model).double(), tok, NAMES, TEMPLATES)
    assert head64.dtype == torch.float64
    torch.testing.assert_close(head64.float(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fn", [clip.zero_shot_head, clip.context_prototypes])
def test_errors(fn: object, tok: object) -> None:
    name = fn.__name__  # type: ignore[attr-defined]
    model = tiny_vit_clip()
    with pytest.raises(TypeError, match=rf"{name}: model must be an open_clip model"):
        fn(object(), tok, NAMES, TEMPLATES)  # type: ignore[operator]
    with pytest.raises(TypeError, match=rf"{name}: model must have method\(s\) encode_text"):
        fn(nn.Linear(1, 1), tok, NAMES, TEMPLATES)  # type: ignore[operator]
    with pytest.raises(TypeError, match=rf"{name}: classnames must be a sequence of str"):
        fn(model, tok, "cat", TEMPLATES)  # type: ignore[operator]
    with pytest.raises(ValueError, match=rf"{name}: classnames must hold at least one"):
        fn(model, tok, [], TEMPLATES)  # type: ignore[operator]
    with pytest.raises(TypeError, match=rf"{name}: classnames must contain only str, got 3"):
        fn(model, tok, ["cat", 3], TEMPLATES)  # type: ignore[operator]
    with pytest.raises(TypeError, match=rf"{name}: templates must be a sequence"):
        fn(model, tok, NAMES, "a photo of a {}.")  # type: ignore[operator]
    with pytest.raises(ValueError, match=rf"{name}: templates must hold at least one"):
        fn(model, tok, NAMES, [])  # type: ignore[operator]
    with pytest.raises(ValueError, match=rf"{name}: templates given as str must contain"):
        fn(model, tok, NAMES, ["a photo"])  # type: ignore[operator]
    with pytest.raises(TypeError, match=rf"{name}: templates must contain format strings"):
        fn(model, tok, NAMES, [None])  # type: ignore[operator]
    with pytest.raises(ValueError, match=rf"{name}: batch_size must be an int >= 1, got 0"):
        fn(model, tok, NAMES, TEMPLATES, batch_size=0)  # type: ignore[operator]
    with pytest.raises(TypeError, match=rf"{name}: tokenizer must be callable"):
        fn(model, "tok", NAMES, TEMPLATES)  # type: ignore[operator]
    with pytest.raises(
        ValueError, match=rf"{name}: params must name parameters or buffers.*'nope'"
    ):
        fn(model, tok, NAMES, TEMPLATES, params={"nope": torch.zeros(1)})  # type: ignore[operator]
    with pytest.raises(TypeError, match=rf"{name}: params must have torch.Tensor leaves"):
        fn(model, tok, NAMES, TEMPLATES, params={"logit_scale": 1.0})  # type: ignore[operator]


@pytest.mark.parametrize(
    "template",
    ["a {} and a {}.", "a photo of {0}.", "a {name}.", "a {} {", "a } {}", "{}{}"],
)
def test_malformed_templates_raise_clearly(template: str, tok: object) -> None:
    for fn in (clip.zero_shot_head, clip.context_prototypes):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: templates given as str must"):
            fn(tiny_vit_clip(), tok, NAMES, ["a photo of a {}.", template])


def test_literal_braces_and_format_specs_are_fine() -> None:
    head = clip.zero_shot_head(CharModel(), count, ["ab"], ["{{{}}}", "{!s}"])  # "{ab}", "ab"
    expected = F.normalize(
        F.normalize(torch.tensor([4.0, 1.0]), dim=0) + F.normalize(torch.tensor([2.0, 1.0]), dim=0),
        dim=0,
    )
    torch.testing.assert_close(head[0], expected, rtol=0, atol=1e-7)
