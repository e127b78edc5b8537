"""robustft.recipes._model.load_model: config JSON models, local checkpoints, tags, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from recipes_fixtures import TINY_CONFIG, write_tiny_config
from safetensors.torch import save_file

from robustft.recipes._model import ClipBundle, load_model

SOT = 49406  # open_clip's start-of-text token id


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path / "tiny-clip.json")


def _shifted_state(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor moved away from its initial value."""
    return {k: v + 1.0 for k, v in bundle.model.state_dict().items()}


def _assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


# --- what a bundle holds -----------------------------------------------------------------------


def test_load_model_from_config_json(config: Path) -> None:
    bundle = load_model(config)
    assert isinstance(bundle, ClipBundle)
    assert isinstance(bundle.model, open_clip.CLIP)
    assert bundle.name == "tiny-clip"
    assert bundle.model.training is False
    params = dict(bundle.model.named_parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())
    assert all(p.requires_grad for p in params.values())  # the recipes decide what trains
    assert params["text_projection"].shape == (32, TINY_CONFIG["embed_dim"])
    assert bundle.model.visual.image_size == (32, 32)
    tokens = bundle.tokenizer(["a photo of a zero.", "a photo of a one."])
    assert tokens.shape == (2, 16) and tokens[:, 0].tolist() == [SOT, SOT]
    assert load_model(str(config), device=torch.device("cpu")).name == "tiny-clip"


def test_transforms_are_open_clips_preprocessing(config: Path) -> None:
    bundle = load_model(config)
    colour = (10, 120, 250)
    image = Image.new("RGB", (40, 50), colour)  # constant: any resize or crop keeps the value
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    expected = (
        (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
    ).expand(3, 32, 32)
    torch.testing.assert_close(bundle.eval_transform(image), expected)
    torch.testing.assert_close(bundle.train_transform(image), expected)
    grey = bundle.eval_transform(Image.new("L", (32, 32), 120))  # converted to RGB
    assert grey.shape == (3, 32, 32)
    torch.testing.assert_close(grey[0, 0, 0], (120 / 255 - mean[0, 0, 0]) / std[0, 0, 0])


def test_config_is_reread_when_loaded_again(tmp_path: Path) -> None:
    path = write_tiny_config(tmp_path / "a" / "tiny.json")
    assert load_model(path).model.text_projection.shape[1] == 32
    cfg = json.loads(path.read_text())
    cfg["embed_dim"] = 16
    path.write_text(json.dumps(cfg))  # same file, new content
    assert load_model(path).model.text_projection.shape[1] == 16
    other = tmp_path / "b" / "tiny.json"  # same stem elsewhere: the one given wins
    cfg["embed_dim"] = 8
    other.parent.mkdir()
    other.write_text(json.dumps(cfg))
    assert load_model(other).model.text_projection.shape[1] == 8
    assert load_model(path).model.text_projection.shape[1] == 16


# --- local checkpoints -------------------------------------------------------------------------


def test_pretrained_torch_save_state_dict(config: Path, tmp_path: Path) -> None:
    state = _shifted_state(load_model(config))
    torch.save(state, tmp_path / "weights.pt")
    _assert_state(load_model(config, pretrained=tmp_path / "weights.pt").model, state)
    _assert_state(load_model(config, pretrained=str(tmp_path / "weights.pt")).model, state)


def test_pretrained_open_clip_training_checkpoint(config: Path, tmp_path: Path) -> None:
    state = _shifted_state(load_model(config))
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    _assert_state(load_model(config, pretrained=tmp_path / "epoch_3.pt").model, state)


def test_pretrained_safetensors(config: Path, tmp_path: Path) -> None:
    state = _shifted_state(load_model(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    _assert_state(load_model(config, pretrained=tmp_path / "w.safetensors").model, state)


def test_pretrained_file_silences_the_random_init_notice(
    config: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save(load_model(config).model.state_dict(), tmp_path / "w.pt")
    filters = list(logging.getLogger().filters)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model(config, pretrained=tmp_path / "w.pt")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    assert logging.getLogger().filters == filters  # the filter is removed again
    with caplog.at_level(logging.WARNING):
        load_model(config)  # random init: open_clip's notice is kept
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_mismatched_checkpoint_lists_keys(config: Path, tmp_path: Path) -> None:
    state = load_model(config).model.state_dict()
    state["head.weight"] = state.pop("visual.proj")
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(
        ValueError,
        match=r"load_model: pretrained checkpoint .*w.pt' does not match the model; "
        r"missing keys \['visual.proj'\], unexpected keys \['head.weight'\]",
    ):
        load_model(config, pretrained=tmp_path / "w.pt")


def test_checkpoint_with_wrong_shapes(config: Path, tmp_path: Path) -> None:
    state = load_model(config).model.state_dict()
    state["visual.proj"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(
        ValueError,
        match=r"load_model: .* does not fit the model: .*size mismatch for visual.proj: .*torch.Size\(\[3, 3\]\)",
    ):
        load_model(config, pretrained=tmp_path / "w.pt")


_EXECUTED: list[str] = []


def _side_effect() -> str:
    _EXECUTED.append("unpickled")
    return "payload"


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_side_effect, ())


def test_unsafe_pickle_is_refused_without_running_it(config: Path, tmp_path: Path) -> None:
    _EXECUTED.clear()
    torch.save({"visual.proj": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"load_model: .*torch.load\(weights_only=True\)"):
        load_model(config, pretrained=tmp_path / "evil.pt")
    assert _EXECUTED == []


def test_no_unrestricted_unpickle_when_the_safe_load_fails(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip retries ``torch.load`` without ``weights_only`` after a TypeError: never reach it."""
    torch.save(load_model(config).model.state_dict(), tmp_path / "w.pt")
    unsafe: list[object] = []

    def fake_load(*args: object, **kwargs: object) -> object:
        if kwargs.get("weights_only") is True:
            raise TypeError("simulated failure inside the restricted unpickler")
        unsafe.append(kwargs)
        raise AssertionError("unrestricted torch.load")

    monkeypatch.setattr(torch, "load", fake_load)
    with pytest.raises(
        ValueError, match=r"could not be loaded with torch.load\(weights_only=True\)"
    ):
        load_model(config, pretrained=tmp_path / "w.pt")
    assert unsafe == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([torch.zeros(2)], r"must hold a state dict .* got list of length 1"),
        ({}, r"must hold a state dict"),
        ({"state_dict": {}}, r"must hold a state dict"),
    ],
)
def test_checkpoint_that_is_not_a_state_dict(
    config: Path, tmp_path: Path, content: object, message: str
) -> None:
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"load_model: pretrained checkpoint .*" + message):
        load_model(config, pretrained=tmp_path / "w.pt")


def test_bad_safetensors_and_numpy_files(config: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError, match=r"load_model: .* is not a readable safetensors file"):
        load_model(config, pretrained=tmp_path / "junk.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match=r"load_model: .*empty.safetensors' holds no tensors"):
        load_model(config, pretrained=tmp_path / "empty.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"numpy weights are not supported"):
        load_model(config, pretrained=tmp_path / "w.npz")


# --- open_clip names and tags ------------------------------------------------------------------


def test_model_name_and_tag_go_to_open_clip(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name + tag is open_clip's to build (and download); check the call without building it."""
    load_model(config)  # registers "tiny-clip"
    tiny = open_clip.create_model_and_transforms("tiny-clip")
    calls: list[tuple[str, object, object]] = []
    forced: list[dict[str, object]] = []

    def fake(
        name: str, *, pretrained: object, precision: str, device: object, **preprocess: object
    ) -> object:
        calls.append((name, pretrained, precision))
        forced.append(preprocess)
        return tiny

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    bundle = load_model("ViT-B/16", pretrained="openai")  # open_clip's "/" spelling is accepted
    assert calls == [("ViT-B-16", "openai", "fp32")]
    assert forced[0] == {  # the tag's preprocessing, passed on explicitly
        "image_mean": open_clip.OPENAI_DATASET_MEAN,
        "image_std": open_clip.OPENAI_DATASET_STD,
        "image_interpolation": "bicubic",
        "image_resize_mode": "shortest",
    }
    assert bundle.preprocess["source"] == "tag openai"
    assert bundle.name == "ViT-B-16"
    assert bundle.model is tiny[0] and bundle.model.training is False
    assert bundle.tokenizer(["x"]).shape == (1, 77)  # ViT-B-16's own tokenizer
    load_model("ViT-B-16")
    assert calls[-1] == ("ViT-B-16", None, "fp32")


def test_unknown_model_name_lists_close_names() -> None:
    with pytest.raises(
        ValueError, match=r"load_model: model must be .* got 'ViT-B-61' .*close names: .*ViT-B-16"
    ):
        load_model("ViT-B-61")
    with pytest.raises(ValueError, match=r"got 'vit-b-16' .*close names: ViT-B-16"):
        load_model("vit-b-16")
    with pytest.raises(ValueError, match=r"got 'qqqqqqqqqqqq' .*see open_clip.list_models\(\)"):
        load_model("qqqqqqqqqqqq")
    with pytest.raises(ValueError, match=r"'hf-hub:' and 'local-dir:' schemas are not supported"):
        load_model("hf-hub:timm/ViT-B-16-SigLIP")


def test_unknown_pretrained_value(config: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"load_model: pretrained must be None, a pretrained tag of the model or the path of "
        r"an existing checkpoint file, got 'no-such-tag' \(not a tag, no such file\); "
        r"the tags of 'ViT-B-16' are openai, ",
    ):
        load_model("ViT-B-16", pretrained="no-such-tag")
    with pytest.raises(ValueError, match=r"got 'openai' .*'tiny-clip' has no tags"):
        load_model(config, pretrained="openai")
    with pytest.raises(ValueError, match=r"missing.pt' \(not a tag, no such file\)"):
        load_model(config, pretrained=tmp_path / "missing.pt")


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"load_model: model must be .* \(no such file\)"):
        load_model(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        load_model(str(tmp_path / "missing.json"))
    yaml_file = tmp_path / "tiny.yaml"
    yaml_file.write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(ValueError, match=r"load_model: a model config file must be a .json file"):
        load_model(yaml_file)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(
        ValueError, match=r"load_model: model config .*broken.json' is not valid JSON"
    ):
        load_model(broken)
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object .* got a JSON list"):
        load_model(listed)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match=r"missing keys \['vision_cfg', 'text_cfg'\]"):
        load_model(partial)
    clash = write_tiny_config(tmp_path / "ViT-B-16.json")
    with pytest.raises(ValueError, match=r"named like open_clip's built-in model 'ViT-B-16'"):
        load_model(clash)
    assert open_clip.get_model_config("ViT-B-16")["embed_dim"] == 512  # the built-in is intact


def test_argument_types(config: Path) -> None:
    with pytest.raises(
        TypeError, match=r"load_model: model must be an open_clip model name .* got 3"
    ):
        load_model(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"load_model: pretrained must be None, a pretrained tag"):
        load_model(config, pretrained=1)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"load_model: device must be None, a str or a torch.device"
    ):
        load_model(config, device=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"load_model: device must name a torch device"):
        load_model(config, device="gpu-please")
