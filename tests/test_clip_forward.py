"""robustft.clip functional forwards and parameter selection on tiny open_clip models."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_custom_text_clip, tiny_resnet_clip, tiny_vit_clip, tokenizer
from reference.clip_ref import official_norm_names
from torch import nn

from robustft import clip, tree


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit_clip()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return tiny_resnet_clip()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- functional forwards


@pytest.mark.parametrize("name", ["vit", "resnet", "custom"])
def test_functional_forward_equals_module_forward(name: str, images: torch.Tensor) -> None:
    model = {"vit": tiny_vit_clip, "resnet": tiny_resnet_clip, "custom": tiny_custom_text_clip}[
        name
    ]()
    tokens = tokenizer()(["a photo of a cat.", "a dog"])
    full = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        raw = model.encode_image(images)
        for params in (None, full, {}):
            assert torch.equal(clip.image_features(model, params, images), img)
            assert torch.equal(clip.text_features(model, params, tokens), txt)
        assert torch.equal(clip.image_features(model, None, images, normalize=False), raw)
        assert torch.equal(
            clip.text_features(model, full, tokens, normalize=False), model.encode_text(tokens)
        )


def test_partial_params_and_buffers_are_swapped_in(resnet: nn.Module, images: torch.Tensor) -> None:
    other = copy.deepcopy(resnet)
    with torch.no_grad():
        other.visual.attnpool.c_proj.weight.mul_(-1.0)
        other.visual.bn1.running_mean.add_(0.5)  # a buffer
    partial = {
        "visual.attnpool.c_proj.weight": other.visual.attnpool.c_proj.weight,
        "visual.bn1.running_mean": other.visual.bn1.running_mean,
    }
    snapshot = {k: v.clone() for k, v in partial.items()}
    with torch.no_grad():
        out = clip.image_features(resnet, partial, images)
        assert torch.equal(out, other.encode_image(images, normalize=True))
        assert not torch.allclose(out, resnet.encode_image(images, normalize=True), atol=1e-3)
    assert all(torch.equal(partial[k], snapshot[k]) for k in partial)  # inputs not mutated
    assert not torch.equal(resnet.visual.bn1.running_mean, partial["visual.bn1.running_mean"])


def test_wise_blend_without_copying_modules(vit: nn.Module, images: torch.Tensor) -> None:
    theta0 = tree.clone(dict(vit.named_parameters()), detach=True)
    theta1 = tree.map(lambda t: t + 0.05 * torch.randn_like(t), theta0)
    mid = tree.lerp(theta0, theta1, 0.5)
    blended = copy.deepcopy(vit)
    blended.load_state_dict({**blended.state_dict(), **mid})
    with torch.no_grad():
        torch.testing.assert_close(
            clip.image_features(vit, mid, images),
            blended.encode_image(images, normalize=True),
            rtol=0,
            atol=0,
        )


def test_gradients_flow_only_to_selected_params(resnet: nn.Module, images: torch.Tensor) -> None:
    model = copy.deepcopy(resnet)
    for p in model.parameters():
        p.requires_grad_(False)
    trained, frozen = tree.partition(
        dict(model.named_parameters()), clip.norm_affine_names(model, under="visual")
    )
    trained = {k: v.detach().clone().requires_grad_() for k, v in trained.items()}
    feats = clip.image_features(model, tree.combine(trained, frozen), images)
    feats.square().sum(dim=0)[0].backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in trained.values())
    assert all(p.grad is None for p in model.parameters())


def test_torch_func_grad_matches_autograd(vit: nn.Module, images: torch.Tensor) -> None:
    params = {
        k: v.detach() for k, v in tree.select(dict(vit.named_parameters()), "visual.ln_*").items()
    }
    target = torch.randn(3, 16)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (clip.image_features(vit, p, images) * target).sum()

    grads = torch.func.grad(loss)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-4, atol=1e-6)


def test_frozen_copy_features_no_grad_eval_and_restore(
    resnet: nn.Module, images: torch.Tensor
) -> None:
    model = copy.deepcopy(resnet).train()
    model.visual.layer1.eval()  # mixed flags must survive
    stats = model.visual.bn1.running_mean.clone()
    teacher = tree.clone(dict(model.named_parameters()), detach=True)
    with torch.no_grad():
        model.visual.attnpool.c_proj.weight.mul_(-1.0)  # the module moves on: it is θ now
    out = clip.frozen_copy_features(model, images, params=teacher)
    assert not out.requires_grad
    assert torch.equal(model.visual.bn1.running_mean, stats)  # eval: statistics untouched
    assert model.training and model.visual.training and not model.visual.layer1.training
    with torch.no_grad():
        model.eval()
        expected = resnet.eval().encode_image(images, normalize=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    raw = clip.frozen_copy_features(resnet, images, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), out, rtol=0, atol=1e-6)


def test_forward_errors(vit: nn.Module, images: torch.Tensor) -> None:
    for fn in ("image_features", "frozen_copy_features"):
        call = (
            (lambda m, p, x: clip.image_features(m, p, x))
            if fn == "image_features"
            else (lambda m, p, x: clip.frozen_copy_features(m, x, params=p))
        )
        with pytest.raises(TypeError, match=rf"{fn}: model must be an open_clip model"):
            call("vit", None, images)
        with pytest.raises(TypeError, match=rf"{fn}: model must have method\(s\) encode_image"):
            call(nn.Linear(2, 2), None, images)
        with pytest.raises(ValueError, match=rf"{fn}: params must name parameters.*'visual.nope'"):
            call(vit, {"visual.nope": torch.zeros(1)}, images)
        with pytest.raises(TypeError, match=rf"{fn}: params must be a mapping"):
            call(vit, [torch.zeros(1)], images)
        with pytest.raises(TypeError, match=rf"{fn}: images must be a floating-point tensor"):
            call(vit, None, images.long())
        with pytest.raises(TypeError, match=rf"{fn}: images must be a torch.Tensor"):
            call(vit, None, [[0.0]])
    tokens = tokenizer()(["a cat"])
    with pytest.raises(TypeError, match=r"text_features: tokens must be an integer tensor"):
        clip.text_features(vit, None, tokens.float())
    with pytest.raises(ValueError, match=r"text_features: tokens must have 2 dimension"):
        clip.text_features(vit, None, tokens[0])
    with pytest.raises(TypeError, match=r"text_features: model must have method\(s\) encode_text"):
        clip.text_features(nn.Linear(2, 2), None, tokens)


# ---------------------------------------------------------------- parameter selection


def test_norm_affines_resnet_include_downsample_bn(resnet: nn.Module) -> None:
    ours = clip.norm_affine_names(resnet, under="visual")
    official = official_norm_names(resnet)
    missed = sorted(set(ours) - set(official))
    assert set(official) <= set(ours)
    assert missed == sorted(
        f"visual.layer{i}.0.downsample.1.{w}" for i in range(1, 5) for w in ("weight", "bias")
    )
    assert all(
        isinstance(resnet.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d) for n in missed
    )


def test_norm_affines_vit_equal_official_rule(vit: nn.Module) -> None:
    ours = clip.norm_affine_names(vit, under="visual")
    assert ours == official_norm_names(vit)
    assert "visual.ln_pre.weight" in ours and "visual.ln_post.bias" in ours
    everything = clip.norm_affine_names(vit)
    assert set(everything) - set(ours) == {
        "ln_final.weight",
        "ln_final.bias",
        "transformer.resblocks.0.ln_1.weight",
        "transformer.resblocks.0.ln_1.bias",
        "transformer.resblocks.0.ln_2.weight",
        "transformer.resblocks.0.ln_2.bias",
    }
    selected, rest = tree.partition(dict(vit.named_parameters()), ours)
    assert list(selected) == ours and len(selected) + len(rest) == len(list(vit.parameters()))


def test_norm_affines_by_type_hand_case() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 1),
        nn.GroupNorm(2, 4),
        nn.BatchNorm2d(4, affine=False),
        nn.Sequential(nn.LayerNorm(4, bias=False), nn.Linear(4, 4)),
    )
    assert clip.norm_affine_names(net) == ["1.weight", "1.bias", "3.0.weight"]
    assert clip.norm_affine_names(net, under="3") == ["3.0.weight"]


@pytest.mark.parametrize("name", ["vit", "custom"])
def test_visual_and_text_names_partition_the_model(name: str) -> None:
    model = tiny_vit_clip() if name == "vit" else tiny_custom_text_clip()
    params = dict(model.named_parameters())
    vis, txt = clip.visual_names(model), clip.text_names(model)
    assert set(vis) | set(txt) | {"logit_scale"} == set(params)
    assert not set(vis) & set(txt) and "logit_scale" not in txt
    assert all(n.startswith("visual.") for n in vis)
    if name == "custom":
        assert all(n.startswith("text.") for n in txt)
    else:
        assert {"token_embedding.weight", "positional_embedding", "text_projection"} <= set(txt)
    assert clip.visual_names(params) == vis and clip.text_names(params) == txt  # trees work too
    selected, _ = tree.partition(params, txt)
    assert list(selected) == txt


def test_selection_errors() -> None:
    with pytest.raises(TypeError, match=r"norm_affine_names: module must be a torch.nn.Module"):
        clip.norm_affine_names({"a": torch.zeros(1)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"norm_affine_names: under must name a submodule .*'vis'"):
        clip.norm_affine_names(nn.Sequential(nn.LayerNorm(2)), under="vis")
    with pytest.raises(TypeError, match=r"norm_affine_names: under must be a dotted submodule"):
        clip.norm_affine_names(nn.Sequential(nn.LayerNorm(2)), under=0)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"visual_names: model must have parameters under 'visual.'"
    ):
        clip.visual_names(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"text_names: model must have text-tower parameters"):
        clip.text_names({"visual.w": torch.zeros(1), "logit_scale": torch.zeros(())})
    with pytest.raises(TypeError, match=r"text_names: model must be an open_clip model"):
        clip.text_names("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"visual_names: model must have torch.Tensor leaves"):
        clip.visual_names({"visual.w": 1.0})  # type: ignore[dict-item]


def test_import_does_not_import_open_clip() -> None:
    code = (
        "import sys, robustft.clip, robustft.losses\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'open_clip']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pretrained_local_file_through_open_clip(tmp_path: object, images: torch.Tensor) -> None:
    """The guide's offline path: create_model_and_transforms(name, pretrained=<local file>)."""
    import json
    from pathlib import Path

    import open_clip

    root = Path(str(tmp_path))
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "image_size": 32,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (root / "robustft-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "robustft-tiny-vit.json")
    source = tiny_vit_clip(seed=5)
    torch.save(source.state_dict(), root / "weights.pt")
    loaded, _, _ = open_clip.create_model_and_transforms(
        "robustft-tiny-vit", pretrained=str(root / "weights.pt")
    )
    loaded.eval()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    tok = tokenizer()
    names, templates = ["cat", "dog"], ["a photo of a {}.", "a {}."]
    assert torch.equal(
        clip.zero_shot_head(loaded, tok, names, templates),
        clip.zero_shot_head(source, tok, names, templates),
    )
    with torch.no_grad():
        assert torch.equal(
            clip.image_features(loaded, None, images), clip.image_features(source, None, images)
        )
