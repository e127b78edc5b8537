"""Load an open_clip model with its tokenizer and image transforms (:func:`load_model`); save one
for offline use (:func:`save_model`).

The recipes name a model the way open_clip does -- a model name (``"ViT-B-16"``) and a
``pretrained`` tag (``"openai"``, ``"laion2b_s34b_b88k"``) -- or give a model config JSON of their
own (a tiny model in tests) and a local checkpoint file. Everything is built by open_clip itself
(:func:`open_clip.create_model_and_transforms`, :func:`open_clip.get_tokenizer`,
:func:`open_clip.load_checkpoint`); this module only validates the arguments, registers a config
file in open_clip's model registry, resolves the checkpoint's own image preprocessing
(:mod:`robustft.recipes._preprocess`) and makes loading a local file safe and loud.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
from PIL import Image
from torch import Tensor, nn

from robustft._checks import check_device, describe, fmt_keys
from robustft.recipes import _preprocess as pp
from robustft.recipes._runfolder import atomic_write, write_error, write_json

__all__ = ["ClipBundle", "SavedModel", "load_model", "save_model"]

_FN = "load_model"
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_SCHEMAS = ("hf-hub:", "local-dir:")


class ClipBundle(NamedTuple):
    """An open_clip model and what goes with it, as :func:`load_model` returns them.

    Attributes:
        model: the open_clip model (``open_clip.CLIP``, ``open_clip.CustomTextCLIP``) in float32,
            in eval mode, on the requested device; ``requires_grad`` is left as open_clip sets it
            (``True``): the recipes decide what trains.
        tokenizer: open_clip's tokenizer for the model: a list of ``n`` strings ->
            ``[n, context_length]`` token ids.
        train_transform: open_clip's training preprocessing (random resized crop, RGB, tensor,
            normalise): a PIL image -> ``[3, H, W]``.
        eval_transform: open_clip's evaluation preprocessing (resize, centre crop, RGB, tensor,
            normalise): a PIL image -> ``[3, H, W]``.
        name: the open_clip model name, or the file stem of a model config JSON.
        preprocess: the image preprocessing both transforms apply, JSON-able:
            ``{"mean": [3 floats], "std": [3 floats], "resize_mode": "shortest" | "longest" |
            "squash", "interpolation": "bicubic" | "bilinear", "image_size": int or [h, w],
            "source": ...}``. ``source`` says where the values came from: ``"default"``
            (open_clip's OpenAI values: nothing said otherwise), or the layers that set them,
            joined by ``" + "``: ``"model config"``, ``"tag <tag>"``, ``"sidecar <path>"``,
            ``"arguments"``.
    """

    model: nn.Module
    tokenizer: Callable[..., Tensor]
    train_transform: Callable[[Image.Image], Tensor]
    eval_transform: Callable[[Image.Image], Tensor]
    name: str
    preprocess: dict[str, Any]


def load_model(
    model: str | os.PathLike[str],
    *,
    pretrained: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    image_resize: str | None = None,
    image_interpolation: str | None = None,
) -> ClipBundle:
    """Build an open_clip model, its tokenizer and its train/eval image transforms.

    ``model`` is an open_clip model name (``"ViT-B-16"``; ``open_clip.list_models()`` lists them)
    or the path of a model config JSON, registered with open_clip under its file stem: either an
    open_clip model config (``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``,
    optionally with a ``"preprocess_cfg"``) or open_clip's ``open_clip_config.json`` layout of
    the Hugging Face hub (``{"model_cfg": {...}, "preprocess_cfg": {...}}``). ``pretrained`` is
    ``None`` (random initialisation), an open_clip pretrained tag of that model (open_clip
    downloads and caches the weights), or the path of a local checkpoint: a state dict saved by
    ``torch.save`` (open_clip's training checkpoints, ``{"state_dict": ...}``, included) or a
    ``.safetensors`` file. A local ``torch.save`` file is first read with
    ``torch.load(weights_only=True)``; if that fails the call fails, so open_clip's loader, which
    falls back to an unrestricted unpickle on some errors, never sees an unsafe file. Every key
    of the checkpoint must match the model (no missing, no unexpected keys).

    The image preprocessing (mean, std, resize mode, interpolation) is resolved in layers, each
    later one winning: open_clip's defaults (OpenAI's values), the model config's
    ``preprocess_cfg``, the pretrained tag's config -- or, for a local checkpoint ``w.pt``, the
    sidecar ``w.pt.json`` next to it (``{"mean": [...], "std": [...], "resize_mode": ...,
    "interpolation": ..., "image_size": ...}``, any subset; :func:`save_model` writes one) --,
    and last the ``image_*`` arguments. Both transforms are built by open_clip from the result,
    which :attr:`ClipBundle.preprocess` records with its source. A local checkpoint without a
    sidecar or arguments gets open_clip's defaults, silently: its ``source`` is then
    ``"default"``, which the caller may warn about.

    Args:
        model: an open_clip model name, or the path of a model config ``.json`` file.
        pretrained: ``None``, a pretrained tag of ``model``, or the path of a checkpoint file.
        device: where the model goes (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
        image_mean: per-channel normalisation mean, 3 numbers (overrides every other source).
        image_std: per-channel normalisation standard deviation, 3 numbers > 0.
        image_resize: resize mode of the eval transform: ``"shortest"`` (resize the shorter
            side, then centre-crop), ``"longest"`` (resize the longer side, then pad) or
            ``"squash"`` (resize both sides).
        image_interpolation: ``"bicubic"`` or ``"bilinear"``.

    Returns:
        A :class:`ClipBundle` ``(model, tokenizer, train_transform, eval_transform, name,
        preprocess)``; the model is float32 and in eval mode. The transforms map a PIL image to
        ``[3, H, W]`` with ``(H, W)`` the model's image size.

    Raises:
        TypeError: ``model`` or ``pretrained`` is not a str or path, ``device`` names no device,
            or ``image_mean``/``image_std`` is not a list or tuple of numbers.
        ValueError: an unknown model name (the message lists close names), a config file that is
            not ``.json``, not valid JSON, lacks ``embed_dim``/``vision_cfg``/``text_cfg``, has a
            bad ``preprocess_cfg`` or is named like one of open_clip's built-in models; a
            ``pretrained`` value that is neither a known tag nor an existing file; a checkpoint
            that cannot be read safely, is not a state dict, or whose keys or shapes do not match
            the model (missing and unexpected keys listed); ``image_mean``/``image_std`` not 3
            finite numbers (``std`` > 0), an ``image_resize`` or ``image_interpolation`` not
            listed above; a sidecar that is not a JSON object of the keys above with such values,
            or that was written for another image size than the model's.
        FileNotFoundError: the config file does not exist.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> cfg = {"embed_dim": 16, "text_cfg": {"context_length": 8, "vocab_size": 49408,
        ...        "width": 16, "heads": 1, "layers": 1}, "vision_cfg": {"image_size": 32,
        ...        "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}}
        >>> tmp = tempfile.TemporaryDirectory()
        >>> config = Path(tmp.name) / "tiny-clip.json"
        >>> _ = config.write_text(json.dumps(cfg))
        >>> bundle = load_model(config, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        >>> bundle.name, bundle.model.training
        ('tiny-clip', False)
        >>> bundle.tokenizer(["a photo of a cat."]).shape
        torch.Size([1, 8])
        >>> from PIL import Image
        >>> bundle.eval_transform(Image.new("RGB", (40, 50))).shape
        torch.Size([3, 32, 32])
        >>> bundle.preprocess["std"], bundle.preprocess["source"]
        ([0.5, 0.5, 0.5], 'arguments')
        >>> tmp.cleanup()

    References:
        open_clip, https://github.com/mlfoundations/open_clip (``create_model_and_transforms``,
        ``PreprocessCfg``, ``merge_preprocess_dict``, ``load_checkpoint``).
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"{_FN}: model must be an open_clip model name or the path of a model config JSON, "
            f"got {describe(model)}"
        )
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"{_FN}: pretrained must be None, a pretrained tag or the path of a checkpoint file, "
            f"got {describe(pretrained)}"
        )
    target = check_device(_FN, "device", device) or torch.device("cpu")
    arguments = pp.check_overrides(
        _FN, mean=image_mean, std=image_std, resize=image_resize, interpolation=image_interpolation
    )

    name, config_layer = _resolve_model(model)
    tag, checkpoint = _resolve_pretrained(name, pretrained)
    layers: list[tuple[str, Mapping[str, Any]]] = [("model config", config_layer)]
    sidecar: tuple[Path, dict[str, Any]] | None = None
    if tag is not None:
        layers.append((f"tag {tag}", open_clip.get_pretrained_cfg(name, tag)))
    elif checkpoint is not None and pp.sidecar_path(checkpoint).is_file():
        path = pp.sidecar_path(checkpoint).resolve()
        sidecar = path, pp.read_sidecar(_FN, path)
        layers.append((f"sidecar {path}", sidecar[1]))
    layers.append(("arguments", arguments))
    resolved, source = pp.resolve(layers)
    with _quiet_random_init(checkpoint is not None):
        net, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name,
            pretrained=tag,
            precision="fp32",
            device=target,
            image_mean=tuple(resolved["mean"]),
            image_std=tuple(resolved["std"]),
            image_interpolation=resolved["interpolation"],
            image_resize_mode=resolved["resize_mode"],
        )
    preprocess = pp.record(net.visual.preprocess_cfg, source)
    if sidecar is not None and "image_size" in sidecar[1]:
        pp.check_image_size(_FN, sidecar[0], sidecar[1]["image_size"], preprocess["image_size"])
    if checkpoint is not None:
        _load_checkpoint(net, checkpoint)
    net.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(net, tokenizer, train_transform, eval_transform, name, preprocess)


class SavedModel(NamedTuple):
    """The files :func:`save_model` wrote; ``load_model(config, pretrained=weights)`` reloads them.

    Attributes:
        config: the open_clip model config JSON (``<name>.json``).
        weights: the state dict as safetensors (``<name>.safetensors``).
        sidecar: the image preprocessing next to the weights (``<name>.safetensors.json``).
    """

    config: Path
    weights: Path
    sidecar: Path


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PREPROCESS_METADATA_KEY = "preprocess"
"""The safetensors metadata key under which :func:`save_model` records the preprocessing (JSON)."""


def save_model(
    bundle: ClipBundle,
    directory: str | os.PathLike[str],
    *,
    name: str = "model",
    overwrite: bool = False,
) -> SavedModel:
    """Save a model with its config and image preprocessing, to reload it offline.

    Writes, into ``directory`` (created if needed), each file atomically:

    - ``<name>.json``: the model's open_clip model config (``open_clip.get_model_config`` of
      ``bundle.name``), registered by :func:`load_model` under ``name``;
    - ``<name>.safetensors``: the model's state dict (float32 as loaded), with the sidecar's
      content also in the file's metadata, as JSON under ``"preprocess"``;
    - ``<name>.safetensors.json``: the preprocessing sidecar (``mean``, ``std``, ``resize_mode``,
      ``interpolation``, ``image_size`` of ``bundle.preprocess``).

    ``load_model(saved.config, pretrained=saved.weights)`` then gives the same weights and the same
    train and eval transforms, without any download: a local copy of a tagged model evaluates
    exactly like the tag.

    Args:
        bundle: what :func:`load_model` returned (the model may have been trained since).
        directory: the folder to write into.
        name: the file stem, also the name the config is registered under when loaded: letters,
            digits, ``.``, ``_`` and ``-``, not one of open_clip's built-in model names.
        overwrite: replace files of the same names; without it they are refused.

    Returns:
        The :class:`SavedModel` ``(config, weights, sidecar)`` paths.

    Raises:
        TypeError: ``bundle`` is not a :class:`ClipBundle`, ``name`` not a str or ``overwrite``
            not a bool.
        ValueError: a ``name`` that is not a plain file stem or is an open_clip built-in model
            name; ``bundle.name`` is not a registered model config, or its config no longer
            describes ``bundle.model`` (another config of the same name was loaded since).
        FileExistsError: the files exist and ``overwrite`` is false.
        RunError: a file could not be written (full disk, read-only folder); the files already
            there are intact.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from pathlib import Path
        >>> config = Path(tmp.name) / "tiny-clip.json"
        >>> _ = config.write_text(json.dumps({"embed_dim": 16, "text_cfg": {"context_length": 8,
        ...     "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}, "vision_cfg": {
        ...     "image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}}))
        >>> bundle = load_model(config, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        >>> saved = save_model(bundle, Path(tmp.name) / "copy")
        >>> sorted(p.name for p in saved)
        ['model.json', 'model.safetensors', 'model.safetensors.json']
        >>> copy = load_model(saved.config, pretrained=saved.weights)
        >>> copy.preprocess["mean"], copy.preprocess["source"].startswith("sidecar ")
        ([0.5, 0.5, 0.5], True)
        >>> tmp.cleanup()
    """
    fn = "save_model"
    if not isinstance(bundle, ClipBundle):
        raise TypeError(
            f"{fn}: bundle must be a ClipBundle (from load_model), got {describe(bundle)}"
        )
    if not isinstance(name, str):
        raise TypeError(f"{fn}: name must be a str, got {describe(name)}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"{fn}: overwrite must be a bool, got {describe(overwrite)}")
    if not _NAME.fullmatch(name) or name.lower().endswith((".json", ".safetensors")):
        raise ValueError(
            f"{fn}: name must be a file stem of letters, digits, '.', '_' and '-' (no folder, no "
            f"extension), got {name!r}"
        )
    if _is_builtin(name):
        raise ValueError(
            f"{fn}: name must not be an open_clip model name (load_model refuses a config file "
            f"named like one), got {name!r}; choose another, e.g. {name + '-local'!r}"
        )
    config = open_clip.get_model_config(bundle.name)
    if config is None:
        raise ValueError(
            f"{fn}: bundle.name {bundle.name!r} is not a registered open_clip model config; pass "
            "a bundle from load_model"
        )
    config.pop("preprocess_cfg", None)  # recorded in the sidecar instead
    state = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in bundle.model.state_dict().items()
    }
    _check_config_fits(fn, bundle.name, state)
    out = Path(directory)
    saved = SavedModel(
        out / f"{name}.json", out / f"{name}.safetensors", out / f"{name}.safetensors.json"
    )
    existing = [str(p) for p in saved if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{fn}: {str(out)!r} already holds {existing}; pass overwrite=True to replace them, "
            "or choose another directory or name"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(out, err) from err
    from safetensors.torch import save_file

    sidecar = pp.sidecar_content(bundle.preprocess)
    metadata = {PREPROCESS_METADATA_KEY: json.dumps(sidecar)}

    def write_weights(tmp: Path) -> None:
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; a model folder is shared

    atomic_write(saved.weights, write_weights)
    write_json(saved.sidecar, sidecar)
    write_json(saved.config, config)  # last: a config present means the files are complete
    return saved


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_builtin(name: str) -> bool:
    """Whether ``name`` is one of open_clip's own model configs (a config file may not shadow it)."""
    return (Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").is_file()


def _check_config_fits(fn: str, name: str, state: Mapping[str, Tensor]) -> None:
    """Check that the registered config ``name`` builds a model with ``state``'s keys and shapes.

    The model is built on the meta device (no memory, no initialisation cost).
    """
    with _quiet_random_init(True), torch.device("meta"):
        reference = open_clip.create_model(name, precision="fp32", device="meta")
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != ours:
        missing, unexpected = sorted(set(shapes) - set(ours)), sorted(set(ours) - set(shapes))
        wrong = sorted(k for k in set(shapes) & set(ours) if shapes[k] != ours[k])
        raise ValueError(
            f"{fn}: the registered model config {name!r} does not describe bundle.model (another "
            f"config of that name was loaded since?): missing keys {fmt_keys(missing)}, "
            f"unexpected keys {fmt_keys(unexpected)}, other shapes {fmt_keys(wrong)}; reload the "
            "bundle's config with load_model before saving"
        )


def _resolve_model(model: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The open_clip model name for ``model`` and its config's ``preprocess_cfg`` layer.

    A config file is registered under its stem.
    """
    text = os.fspath(model)
    if isinstance(model, os.PathLike) or text.lower().endswith(".json") or os.path.isfile(text):
        return _register_config(Path(text))
    if text.startswith(_SCHEMAS):
        raise ValueError(
            f"{_FN}: model must be an open_clip model name or the path of a model config JSON, "
            f"got {text!r}; the 'hf-hub:' and 'local-dir:' schemas are not supported: pass the "
            "model's config JSON and pretrained=<checkpoint file> instead"
        )
    name = text.replace("/", "-")  # open_clip accepts "ViT-B/16" for "ViT-B-16"
    known = open_clip.list_models()
    if name in known:
        layer = (open_clip.get_model_config(name) or {}).get("preprocess_cfg") or {}
        return name, dict(layer)
    lower = {k.lower(): k for k in known}
    close = [lower[k] for k in difflib.get_close_matches(name.lower(), list(lower), n=5)]
    hint = f"close names: {', '.join(close)}" if close else "see open_clip.list_models()"
    raise ValueError(
        f"{_FN}: model must be an open_clip model name or the path of a model config JSON, "
        f"got {text!r} (not a known model name and not a file); {hint}"
    )


def _register_config(path: Path) -> tuple[str, dict[str, Any]]:
    """Check a model config JSON and register it with open_clip under its stem.

    Returns the name and the checked ``preprocess_cfg`` layer. The model config goes into
    open_clip's registry without its ``preprocess_cfg`` (open_clip would pass that key to the
    model's constructor); re-registering picks up the file's current content.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{_FN}: model must be an open_clip model name or an existing model config JSON, "
            f"got {str(path)!r} (no such file)"
        )
    if path.suffix.lower() != ".json":
        raise ValueError(
            f"{_FN}: a model config file must be a .json file, got {str(path)!r}; "
            "open_clip registers only .json configs"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(
            f"{_FN}: could not read model config {str(path)!r}: {err.strerror or err}"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{_FN}: model config {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{_FN}: model config {str(path)!r} must hold a JSON object with keys "
            f"{list(_CONFIG_KEYS)}, got a JSON {type(cfg).__name__}"
        )
    layer: Any = cfg.pop("preprocess_cfg", None)
    if isinstance(cfg.get("model_cfg"), dict):  # open_clip's open_clip_config.json layout
        cfg = dict(cfg["model_cfg"])
        layer = cfg.pop("preprocess_cfg", layer)
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(
            f"{_FN}: model config {str(path)!r} must have the keys {list(_CONFIG_KEYS)}; "
            f"missing keys {missing}"
        )
    checked = {} if layer is None else pp.check_model_config_layer(_FN, path, layer)
    name = path.stem
    if _is_builtin(name):
        raise ValueError(
            f"{_FN}: model config {str(path)!r} is named like open_clip's built-in model "
            f"{name!r} and would replace it for the whole process; rename the file"
        )
    # open_clip's registry (add_model_config would also pass "preprocess_cfg" to the model)
    open_clip.factory._MODEL_CONFIGS[name] = cfg
    return name, checked


def _resolve_pretrained(
    name: str, pretrained: str | os.PathLike[str] | None
) -> tuple[str | None, Path | None]:
    """Split ``pretrained`` into an open_clip tag or a local checkpoint path (or neither)."""
    if pretrained is None:
        return None, None
    text = os.fspath(pretrained)
    if isinstance(pretrained, str) and open_clip.get_pretrained_cfg(name, text):
        return text, None
    path = Path(text)
    if not path.is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"the tags of {name!r} are {', '.join(tags)}" if tags else f"{name!r} has no tags"
        raise ValueError(
            f"{_FN}: pretrained must be None, a pretrained tag of the model or the path of an "
            f"existing checkpoint file, got {text!r} (not a tag, no such file); {known}"
        )
    if path.suffix.lower() in (".npz", ".npy"):
        raise ValueError(
            f"{_FN}: pretrained checkpoint must be a torch.save state dict or a .safetensors "
            f"file, got {text!r} (numpy weights are not supported)"
        )
    return None, path


def _check_readable(path: Path) -> None:
    """Read ``path`` safely (``weights_only=True`` / safetensors) and check it is a state dict."""
    what = f"pretrained checkpoint {str(path)!r}"
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{_FN}: {what} is not a readable safetensors file: {err}") from err
        if not keys:
            raise ValueError(f"{_FN}: {what} holds no tensors")
        return
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # any failure here must stop us before open_clip's fallback
        raise ValueError(
            f"{_FN}: {what} could not be loaded with torch.load(weights_only=True) (only plain "
            f"tensors and containers are allowed; never an arbitrary unpickle): {err}"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{_FN}: {what} must hold a state dict (a non-empty mapping of parameter names to "
            f"tensors, or {{'state_dict': ...}}), got {describe(obj)}"
        )


def _load_checkpoint(net: nn.Module, path: Path) -> None:
    """Load a local checkpoint into ``net`` with open_clip's converters; every key must match."""
    _check_readable(path)
    try:
        result: Any = open_clip.load_checkpoint(
            net, str(path), strict=False, weights_only=True, device="cpu"
        )
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(str(err).split())  # torch's message spans several lines
        raise ValueError(
            f"{_FN}: pretrained checkpoint {str(path)!r} does not fit the model: {detail}"
        ) from err
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"{_FN}: pretrained checkpoint {str(path)!r} does not match the model; "
            f"missing keys {fmt_keys(missing)}, unexpected keys {fmt_keys(unexpected)}"
        )


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    """Silence open_clip's "initialized randomly" notice while a checkpoint is still to come."""
    if not active:
        yield
        return
    notice = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice)  # open_clip logs through the root logger
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)
