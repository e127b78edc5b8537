"""The checkpoint's own image preprocessing (load_model), save_model, and the demo's --save-model.

No download: a pretrained tag is registered for a tiny model config in open_clip's registry for
the test only, pointing at a local file (open_clip returns a tag config's ``file`` as is).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from recipes_fixtures import TINY_CONFIG, write_tiny_config
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.transforms import functional as TF

from robustft.recipes._model import ClipBundle, SavedModel, load_model, save_model
from robustft.recipes._preprocess import sidecar_path
from robustft.recipes._runfolder import RunError

TAG = "toy_v1"
TAG_PREPROCESS = {
    "mean": (0.2, 0.3, 0.4),
    "std": (0.15, 0.25, 0.35),
    "interpolation": "bilinear",
    "resize_mode": "squash",
}
OPENAI_MEAN = [float(v) for v in open_clip.OPENAI_DATASET_MEAN]


class Tagged(NamedTuple):
    config: Path
    weights: Path
    state: dict[str, torch.Tensor]


@pytest.fixture
def tagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tagged:
    """A tiny model config with one pretrained tag, ``toy_v1``: non-default preprocessing and
    weights in a local file (what open_clip would have downloaded)."""
    config = write_tiny_config(tmp_path / "tiny-tagged.json")
    state = {k: v + 0.5 for k, v in load_model(config).model.state_dict().items()}
    weights = tmp_path / "downloaded" / "open_clip_model.pt"
    weights.parent.mkdir()
    torch.save(state, weights)
    tag_cfg = {"file": str(weights), "hf_hub": "", "url": "", **TAG_PREPROCESS}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-tagged", {TAG: tag_cfg})
    return Tagged(config, weights, state)


def _images() -> list[Image.Image]:
    """A few images of different sizes and aspect ratios (random pixels: no resize is exact)."""
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (32, 32), (64, 20), (17, 90)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _features(bundle: ClipBundle, images: list[Image.Image]) -> torch.Tensor:
    with torch.no_grad():
        return bundle.model.encode_image(torch.stack([bundle.eval_transform(i) for i in images]))


def _normalised(pixels: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _state_equal(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> bool:
    sa = a.state_dict()
    return sorted(sa) == sorted(b) and all(torch.equal(sa[k], b[k]) for k in b)


# --- (a) a tag's preprocessing -----------------------------------------------------------------


def test_a_tag_brings_its_own_preprocessing(tagged: Tagged) -> None:
    bundle = load_model(tagged.config, pretrained=TAG)
    assert bundle.preprocess == {
        "mean": [0.2, 0.3, 0.4],
        "std": [0.15, 0.25, 0.35],
        "resize_mode": "squash",
        "interpolation": "bilinear",
        "image_size": 32,
        "source": f"tag {TAG}",
    }
    assert json.loads(json.dumps(bundle.preprocess)) == bundle.preprocess  # JSON-able
    assert _state_equal(bundle.model, tagged.state)  # the tag's file was loaded
    image = _images()[0]  # 40x50: squashed to 32x32 (no crop), bilinear
    expected = TF.to_tensor(image.resize((32, 32), Image.Resampling.BILINEAR))
    expected = _normalised(expected, TAG_PREPROCESS["mean"], TAG_PREPROCESS["std"])
    torch.testing.assert_close(bundle.eval_transform(image), expected, rtol=0, atol=1e-6)
    # without the tag (random init), open_clip's defaults: another transform
    plain = load_model(tagged.config)
    assert plain.preprocess["mean"] == OPENAI_MEAN and plain.preprocess["source"] == "default"
    assert plain.preprocess["resize_mode"] == "shortest"
    assert plain.preprocess["interpolation"] == "bicubic"


# --- (b) a local copy evaluates exactly like the tag -------------------------------------------


def test_a_local_copy_evaluates_exactly_like_the_tag(tagged: Tagged, tmp_path: Path) -> None:
    tag = load_model(tagged.config, pretrained=TAG)
    saved = save_model(tag, tmp_path / "copy")
    assert saved == SavedModel(
        tmp_path / "copy" / "model.json",
        tmp_path / "copy" / "model.safetensors",
        tmp_path / "copy" / "model.safetensors.json",
    )
    assert saved.sidecar == sidecar_path(saved.weights)
    copy = load_model(saved.config, pretrained=saved.weights)
    assert copy.name == "model"
    assert copy.preprocess == {**tag.preprocess, "source": f"sidecar {saved.sidecar.resolve()}"}
    assert _state_equal(copy.model, tag.model.state_dict())
    images = _images()
    for image in images:
        assert torch.equal(copy.eval_transform(image), tag.eval_transform(image))
        torch.manual_seed(3)
        augmented = tag.train_transform(image)
        torch.manual_seed(3)
        assert torch.equal(copy.train_transform(image), augmented)
    assert torch.equal(_features(copy, images), _features(tag, images))
    tokens = tag.tokenizer(["a photo of a zero.", "a photo of a one."])
    with torch.no_grad():
        assert torch.equal(copy.model.encode_text(tokens), tag.model.encode_text(tokens))
    # the config file is the open_clip config, without preprocessing; the sidecar holds that
    assert json.loads(saved.config.read_text()) == TINY_CONFIG
    sidecar = {k: v for k, v in tag.preprocess.items() if k != "source"}
    assert json.loads(saved.sidecar.read_text()) == sidecar
    with safe_open(str(saved.weights), framework="pt") as f:
        assert json.loads(f.metadata()["preprocess"]) == sidecar


# --- (c) a bare checkpoint gets the default, and says so ---------------------------------------


def test_a_bare_copy_without_its_sidecar_gets_the_default(tagged: Tagged, tmp_path: Path) -> None:
    tag = load_model(tagged.config, pretrained=TAG)
    saved = save_model(tag, tmp_path / "copy")
    bare = tmp_path / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    shutil.copy(saved.weights, bare)  # the weights alone, as a user might copy them
    copy = load_model(saved.config, pretrained=bare)
    assert copy.preprocess["source"] == "default"  # the caller can warn
    assert copy.preprocess["mean"] == OPENAI_MEAN
    assert _state_equal(copy.model, tag.model.state_dict())  # same weights ...
    assert not torch.allclose(_features(copy, _images()), _features(tag, _images()))  # ... not


# --- (d) explicit arguments win ----------------------------------------------------------------


def test_explicit_arguments_override_the_tag_and_the_sidecar(
    tagged: Tagged, tmp_path: Path
) -> None:
    bundle = load_model(
        tagged.config,
        pretrained=TAG,
        image_mean=(0.1, 0.1, 0.1),
        image_std=[0.9, 0.8, np.float32(0.5)],
        image_resize="shortest",
        image_interpolation="bicubic",
    )
    assert bundle.preprocess == {
        "mean": [0.1, 0.1, 0.1],
        "std": [0.9, 0.8, 0.5],
        "resize_mode": "shortest",
        "interpolation": "bicubic",
        "image_size": 32,
        "source": f"tag {TAG} + arguments",
    }
    colour = (10, 120, 250)
    constant = Image.new("RGB", (40, 50), colour)  # any resize or crop keeps a constant image
    pixels = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 255
    expected = _normalised(pixels, [0.1, 0.1, 0.1], [0.9, 0.8, 0.5])
    torch.testing.assert_close(bundle.eval_transform(constant), expected)
    torch.testing.assert_close(bundle.train_transform(constant), expected)
    # one argument over a sidecar: the rest stays the sidecar's
    saved = save_model(load_model(tagged.config, pretrained=TAG), tmp_path / "copy")
    partial = load_model(saved.config, pretrained=saved.weights, image_std=[1, 1, 1])
    assert partial.preprocess["mean"] == [0.2, 0.3, 0.4]
    assert partial.preprocess["std"] == [1.0, 1.0, 1.0]
    assert partial.preprocess["resize_mode"] == "squash"
    assert partial.preprocess["source"] == f"sidecar {saved.sidecar.resolve()} + arguments"
    only = load_model(tagged.config, image_interpolation="bilinear")
    assert only.preprocess["source"] == "arguments"
    assert only.preprocess["mean"] == OPENAI_MEAN


# --- the model config's preprocess_cfg ---------------------------------------------------------


def test_model_config_preprocess_cfg_then_the_tag(tmp_path: Path, tagged: Tagged) -> None:
    cfg = {**TINY_CONFIG, "preprocess_cfg": {"mean": [0, 0, 0], "std": [1, 1, 1]}}
    config = tmp_path / "with-pp.json"
    config.write_text(json.dumps({**cfg, "preprocess_cfg": {**cfg["preprocess_cfg"],
                                                            "resize_mode": "longest"}}))  # fmt: skip
    bundle = load_model(config)
    assert bundle.preprocess["mean"] == [0.0, 0.0, 0.0]
    assert bundle.preprocess["resize_mode"] == "longest"
    assert bundle.preprocess["source"] == "model config"
    assert "preprocess_cfg" not in open_clip.get_model_config("with-pp")  # not a model kwarg
    # "longest": a 64x32 red image becomes 32x16, padded with black above and below
    out = bundle.eval_transform(Image.new("RGB", (64, 32), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    assert torch.equal(out[:, :8], torch.zeros(3, 8, 32))  # the padding (fill 0, mean 0, std 1)
    assert torch.equal(out[:, 8:24], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 16, 32))
    # the tag's config beats the model config's, key by key
    tagged_cfg = json.loads(tagged.config.read_text())
    tagged_cfg["preprocess_cfg"] = {"mean": [0, 0, 0], "fill_color": 0}
    tagged.config.write_text(json.dumps(tagged_cfg))
    both = load_model(tagged.config, pretrained=TAG)
    assert both.preprocess["mean"] == [0.2, 0.3, 0.4]
    assert both.preprocess["source"] == f"model config + tag {TAG}"


def test_open_clip_hub_config_layout(tmp_path: Path) -> None:
    """open_clip's ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``), as on the hub."""
    hub = tmp_path / "hub" / "open_clip_config.json"
    hub.parent.mkdir()
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
           "resize_mode": "squash", "size": 32}  # fmt: skip
    hub.write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": pre}))
    bundle = load_model(hub)
    assert bundle.name == "open_clip_config"
    assert bundle.preprocess == {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "resize_mode": "squash",
        "interpolation": "bilinear",
        "image_size": 32,
        "source": "model config",
    }


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"image_mean": "0.5"}, TypeError, r"image_mean must be a list of 3 finite numbers, got '0.5'"),
        ({"image_mean": [0.5, True, 0.5]}, TypeError, r"image_mean must be a list of 3 finite"),
        ({"image_mean": [0.5, 0.5]}, ValueError, r"image_mean must be a list of 3 finite numbers, got \[0.5, 0.5\]"),
        ({"image_mean": [0.5, float("nan"), 0.5]}, ValueError, r"image_mean must be .* got \[0.5, nan, 0.5\]"),
        ({"image_std": [1, 0, 1]}, ValueError, r"image_std must be a list of 3 finite numbers > 0, got \[1, 0, 1\]"),
        ({"image_std": [1, float("inf"), 1]}, ValueError, r"image_std must be a list of 3 finite numbers > 0"),
        ({"image_resize": "crop"}, ValueError, r"image_resize must be one of shortest, longest, squash, got 'crop'"),
        ({"image_interpolation": "nearest"}, ValueError, r"image_interpolation must be one of bicubic, bilinear, got 'nearest'"),
        ({"image_interpolation": 3}, ValueError, r"image_interpolation must be one of bicubic, bilinear, got 3"),
    ],
)  # fmt: skip
def test_bad_preprocessing_arguments(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    config = write_tiny_config(tmp_path / "tiny-clip.json")
    with pytest.raises(error, match=r"^load_model: " + message):
        load_model(config, **kwargs)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", r"is not valid JSON .*; fix or remove it"),
        ("[0.5, 0.5, 0.5]", r"must hold a JSON object with keys among mean, std, .* got a JSON list"),
        ('{"mean": [0.5, 0.5, 0.5], "stdev": [1, 1, 1]}', r"has unknown keys \['stdev'\]; the allowed keys are mean, std, resize_mode"),
        ('{"mean": [0.5, 0.5]}', r"'mean' of the preprocessing sidecar .* must be a list of 3 finite numbers, got \[0.5, 0.5\]"),
        ('{"std": [1, -1, 1]}', r"'std' of .* must be a list of 3 finite numbers > 0, got \[1, -1, 1\]"),
        ('{"std": [1, NaN, 1]}', r"'std' of .* must be a list of 3 finite numbers > 0"),
        ('{"mean": "grey"}', r"'mean' of .* must be a list of 3 finite numbers, got 'grey'"),
        ('{"resize_mode": "fit"}', r"'resize_mode' of .* must be one of shortest, longest, squash, got 'fit'"),
        ('{"interpolation": "lanczos"}', r"'interpolation' of .* must be one of bicubic, bilinear"),
        ('{"image_size": 0}', r"'image_size' of .* must be a positive int or \[height, width\], got 0"),
        ('{"image_size": [32, 32, 3]}', r"'image_size' of .* got \[32, 32, 3\]"),
        ('{"image_size": 224}', r"sidecar .* was written for image_size 224, but the model takes 32; it belongs to another model"),
        ('{"image_size": [32, 16]}', r"written for image_size \[32, 16\], but the model takes 32"),
    ],
)  # fmt: skip
def test_bad_sidecars(tmp_path: Path, content: str, message: str) -> None:
    config = write_tiny_config(tmp_path / "tiny-clip.json")
    weights = tmp_path / "w.pt"
    torch.save(load_model(config).model.state_dict(), weights)
    (tmp_path / "w.pt.json").write_text(content)
    with pytest.raises(ValueError, match=r"^load_model: .*" + message):
        load_model(config, pretrained=weights)


def test_sidecar_and_config_that_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_tiny_config(tmp_path / "tiny-clip.json")
    weights = tmp_path / "w.pt"
    torch.save(load_model(config).model.state_dict(), weights)
    (tmp_path / "w.pt.json").write_text("{}")
    read_text = Path.read_text

    def unreadable(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name in ("w.pt.json", "locked.json"):
            raise PermissionError(13, "Permission denied")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(
        ValueError,
        match=r"^load_model: could not read the preprocessing sidecar .*w.pt.json': "
        r"Permission denied$",
    ):
        load_model(config, pretrained=weights)
    locked = write_tiny_config(tmp_path / "locked.json")
    with pytest.raises(
        ValueError, match=r"^load_model: could not read model config .*locked.json': Permission"
    ):
        load_model(locked)


@pytest.mark.parametrize(
    ("preprocess_cfg", "message"),
    [
        ([0.5], r"'preprocess_cfg' of model config .* must be a JSON object, got \[0.5\]"),
        ({"std": [0, 1, 1]}, r"'std' of the preprocess_cfg of model config .* must be a list of 3 finite numbers > 0"),
        ({"resize_mode": "crop"}, r"'resize_mode' of the preprocess_cfg .* must be one of shortest"),
    ],
)  # fmt: skip
def test_bad_model_config_preprocess_cfg(tmp_path: Path, preprocess_cfg: Any, message: str) -> None:
    config = tmp_path / "bad-pp.json"
    config.write_text(json.dumps({**TINY_CONFIG, "preprocess_cfg": preprocess_cfg}))
    with pytest.raises(ValueError, match=r"^load_model: " + message):
        load_model(config)


# --- save_model --------------------------------------------------------------------------------


def test_save_model_keeps_trained_weights_and_refuses_to_overwrite(tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "tiny-clip.json")
    bundle = load_model(config, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    with torch.no_grad():
        bundle.model.visual.proj.add_(1.0)  # "trained"
    saved = save_model(bundle, tmp_path / "out" / "nested", name="tiny-trained")
    assert [p.name for p in saved] == [
        "tiny-trained.json",
        "tiny-trained.safetensors",
        "tiny-trained.safetensors.json",
    ]
    copy = load_model(saved.config, pretrained=saved.weights)
    assert copy.name == "tiny-trained"
    assert _state_equal(copy.model, bundle.model.state_dict())
    assert copy.preprocess["mean"] == [0.5, 0.5, 0.5]
    mask = os.umask(0o022)
    os.umask(mask)
    for path in saved:  # readable like any file the user writes (safetensors alone gives 0600)
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    before = saved.weights.read_bytes()
    with pytest.raises(
        FileExistsError,
        match=r"^save_model: .*nested' already holds \[.*tiny-trained.json.*\]; pass "
        r"overwrite=True to replace them",
    ):
        save_model(bundle, saved.config.parent, name="tiny-trained")
    assert saved.weights.read_bytes() == before
    with torch.no_grad():
        bundle.model.visual.proj.add_(1.0)
    save_model(bundle, saved.config.parent, name="tiny-trained", overwrite=True)
    again = load_model(saved.config, pretrained=saved.weights)
    assert _state_equal(again.model, bundle.model.state_dict())


def test_save_model_argument_errors(tmp_path: Path) -> None:
    bundle = load_model(write_tiny_config(tmp_path / "tiny-clip.json"))
    with pytest.raises(TypeError, match=r"^save_model: bundle must be a ClipBundle .* got tuple"):
        save_model(tuple(bundle), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^save_model: name must be a str, got 3"):
        save_model(bundle, tmp_path, name=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^save_model: overwrite must be a bool, got 'yes'"):
        save_model(bundle, tmp_path, overwrite="yes")  # type: ignore[arg-type]
    for bad in ("a/b", "", ".hidden", "model.json", "w.safetensors", "a b"):
        with pytest.raises(ValueError, match=r"^save_model: name must be a file stem"):
            save_model(bundle, tmp_path, name=bad)
    with pytest.raises(
        ValueError, match=r"^save_model: name must not be an open_clip model name .* 'ViT-B-16'"
    ):
        save_model(bundle, tmp_path, name="ViT-B-16")
    with pytest.raises(
        ValueError, match=r"^save_model: bundle.name 'no-such-model' is not a registered"
    ):
        save_model(bundle._replace(name="no-such-model"), tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RunError, match=r"could not write .*a-file'"):
        save_model(bundle, tmp_path / "a-file")
    assert not list(tmp_path.glob("model*"))  # nothing was written by the failed calls


def test_save_model_refuses_a_config_that_no_longer_fits(tmp_path: Path) -> None:
    """Loading another config of the same stem re-registers the name: saving must notice."""
    first = load_model(write_tiny_config(tmp_path / "a" / "tiny.json"))
    cfg = {**TINY_CONFIG, "embed_dim": 16}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tiny.json").write_text(json.dumps(cfg))
    load_model(tmp_path / "b" / "tiny.json")
    with pytest.raises(
        ValueError,
        match=r"^save_model: the registered model config 'tiny' does not describe bundle.model "
        r".*other shapes \[.*'text_projection'.*\]; reload",
    ):
        save_model(first, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the demo's --save-model -------------------------------------------------------------------


@pytest.fixture
def demo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROBUSTFT_CACHE", str(cache))
    return cache


def _fake_folders(root: Path) -> dict[str, int]:
    (root / "train").mkdir(parents=True)
    return {"train": 0}


def test_demo_save_model_writes_the_demos_clip_and_folders(
    tmp_path: Path, demo_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from robustft.demo._data import CLASSNAMES, SHIFTS, TEMPLATES, load_splits, normalize
    from robustft.demo._main import main
    from robustft.demo._model import build_model, build_tokenizer, pretrain

    out = tmp_path / "demo_clip"
    assert main(["--save-model", str(out), "--pretrain-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "pre-training the demo's CLIP (3 steps" in printed
    assert "robustft finetune --method clipood" in printed
    assert f"--model {out}/model.json --pretrained {out}/model.safetensors" in printed
    bundle = load_model(out / "model.json", pretrained=out / "model.safetensors")
    assert bundle.preprocess == {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "resize_mode": "shortest",
        "interpolation": "bilinear",
        "image_size": 32,
        "source": f"sidecar {(out / 'model.safetensors.json').resolve()}",
    }
    # the demo's model: build_model(seed=0) pre-trained by the demo's own loop
    data = load_splits(seed=0)
    reference = build_model(seed=0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        pretrain(reference, build_tokenizer(), data, steps=3)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert _state_equal(bundle.model, reference.state_dict())
    # the folders hold the demo's splits, and the eval transform of a PNG is the demo's input
    data_root = out / "data"
    assert sorted(p.name for p in (data_root / "train").iterdir()) == sorted(CLASSNAMES[:8])
    assert sum(1 for _ in (data_root / "train").rglob("*.png")) == len(data.train_y)
    assert sum(1 for _ in (data_root / "open").rglob("*.png")) == len(data.test_y) + len(
        data.unknown_test_x
    )
    assert sorted(p.name for p in (data_root / "shifted").iterdir()) == sorted(SHIFTS)
    assert (data_root / "classnames.txt").read_text().split() == CLASSNAMES[:8]
    assert (data_root / "templates.txt").read_text().splitlines() == TEMPLATES
    label = int(data.train_y[0])
    png = Image.open(data_root / "train" / CLASSNAMES[label] / "0000.png")
    torch.testing.assert_close(
        bundle.eval_transform(png), normalize(data.train_x[0]), rtol=0, atol=1.01 / 255
    )
    # a second call takes the model from the cache; an existing folder is refused
    assert main(["--save-model", str(tmp_path / "again"), "--pretrain-steps", "3"]) == 0
    assert "from the cache" in capsys.readouterr().out
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        out / "model.safetensors"
    ).read_bytes()
    assert main(["--save-model", str(out), "--pretrain-steps", "3"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("python -m robustft.demo: error: --save-model: ")
    assert "already exists and is not an empty folder — remove it or choose another" in error
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_demo_cache_damaged_or_unwritable(
    tmp_path: Path, demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robustft.demo import _quickstart

    monkeypatch.setattr(_quickstart, "write_folders", _fake_folders)
    lines: list[str] = []
    first = _quickstart.save_demo(tmp_path / "one", steps=1, log=lines.append)
    assert first.weights.is_file() and (tmp_path / "one" / "data" / "train").is_dir()
    (cached,) = demo_cache.iterdir()
    (cached / "model.safetensors").write_bytes(b"damaged")
    lines.clear()
    _quickstart.save_demo(tmp_path / "two", steps=1, log=lines.append)
    assert any("is damaged" in line and "pre-training it again" in line for line in lines)
    assert load_file(str(cached / "model.safetensors"))  # repaired
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("ROBUSTFT_CACHE", str(blocked))
    lines.clear()
    _quickstart.save_demo(tmp_path / "three", steps=1, log=lines.append)
    assert any("could not cache the model" in line for line in lines)
    assert (tmp_path / "three" / "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    _quickstart.save_demo(tmp_path / "empty", steps=1, log=lines.append)
    assert (tmp_path / "empty" / "model.json").is_file()

    def full_disk(root: Path) -> dict[str, int]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_quickstart, "write_folders", full_disk)
    with pytest.raises(
        RunError,
        match=r"^--save-model: could not write .*four': No space left on device — choose a "
        r"writable folder with free space$",
    ):
        _quickstart.save_demo(tmp_path / "four", steps=1, log=lines.append)
    assert not (tmp_path / "four").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.slow
def test_the_printed_command_runs_offline(tmp_path: Path, demo_cache: Path) -> None:
    """The quick-start: ``--save-model`` then the command it prints (shortened), from elsewhere."""
    from robustft.demo._quickstart import next_command, save_demo

    save_demo(tmp_path / "demo_clip", steps=2, log=lambda _: None)
    argv = shlex.split(next_command(Path("demo_clip")).replace("\\\n", " "))
    assert argv[:2] == ["robustft", "finetune"]
    argv += ["--steps", "2", "--batch-size", "8", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "robustft", *argv[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| zero-shot | test |" in done.stdout
    results = json.loads((tmp_path / "runs" / "quick" / "results.json").read_text())
    assert results
