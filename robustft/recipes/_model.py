"""Load an open_clip model with its tokenizer and image transforms: :func:`load_model`.

The recipes name a model the way open_clip does -- a model name (``"ViT-B-16"``) and a
``pretrained`` tag (``"openai"``, ``"laion2b_s34b_b88k"``) -- or give a model config JSON of their
own (a tiny model in tests) and a local checkpoint file. Everything is built by open_clip itself
(:func:`open_clip.create_model_and_transforms`, :func:`open_clip.get_tokenizer`,
:func:`open_clip.load_checkpoint`); this module only validates the arguments, registers a config
file with :func:`open_clip.add_model_config`, and makes loading a local file safe and loud.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
from PIL import Image
from torch import Tensor, nn

from robustft._checks import check_device, describe, fmt_keys

__all__ = ["ClipBundle", "load_model"]

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
    """

    model: nn.Module
    tokenizer: Callable[..., Tensor]
    train_transform: Callable[[Image.Image], Tensor]
    eval_transform: Callable[[Image.Image], Tensor]
    name: str


def load_model(
    model: str | os.PathLike[str],
    *,
    pretrained: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> ClipBundle:
    """Build an open_clip model, its tokenizer and its train/eval image transforms.

    ``model`` is an open_clip model name (``"ViT-B-16"``; ``open_clip.list_models()`` lists them)
    or the path of an open_clip model config JSON (``{"embed_dim": ..., "vision_cfg": {...},
    "text_cfg": {...}}``), which is registered with :func:`open_clip.add_model_config` under its
    file stem. ``pretrained`` is ``None`` (random initialisation), an open_clip pretrained tag of
    that model (open_clip downloads and caches the weights), or the path of a local checkpoint:
    a state dict saved by ``torch.save`` (open_clip's training checkpoints, ``{"state_dict": ...}``,
    included) or a ``.safetensors`` file. A local ``torch.save`` file is first read with
    ``torch.load(weights_only=True)``; if that fails the call fails, so open_clip's loader, which
    falls back to an unrestricted unpickle on some errors, never sees an unsafe file. Every key
    of the checkpoint must match the model (no missing, no unexpected keys).

    Args:
        model: an open_clip model name, or the path of a model config ``.json`` file.
        pretrained: ``None``, a pretrained tag of ``model``, or the path of a checkpoint file.
        device: where the model goes (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    Returns:
        A :class:`ClipBundle` ``(model, tokenizer, train_transform, eval_transform, name)``; the
        model is float32 and in eval mode. The transforms map a PIL image to ``[3, S, S]`` with
        ``S`` the model's image size.

    Raises:
        TypeError: ``model`` or ``pretrained`` is not a str or path, or ``device`` names no device.
        ValueError: an unknown model name (the message lists close names), a config file that is
            not ``.json``, not valid JSON, lacks ``embed_dim``/``vision_cfg``/``text_cfg`` or is
            named like one of open_clip's built-in models; a ``pretrained`` value that is neither a
            known tag nor an existing file; a checkpoint that cannot be read safely, is not a
            state dict, or whose keys or shapes do not match the model (missing and unexpected
            keys listed).
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
        >>> bundle = load_model(config)
        >>> bundle.name, bundle.model.training
        ('tiny-clip', False)
        >>> bundle.tokenizer(["a photo of a cat."]).shape
        torch.Size([1, 8])
        >>> from PIL import Image
        >>> bundle.eval_transform(Image.new("RGB", (40, 50))).shape
        torch.Size([3, 32, 32])
        >>> tmp.cleanup()

    References:
        open_clip, https://github.com/mlfoundations/open_clip (``create_model_and_transforms``,
        ``load_checkpoint``, ``add_model_config``).
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

    name = _resolve_model(model)
    tag, checkpoint = _resolve_pretrained(name, pretrained)
    with _quiet_random_init(checkpoint is not None):
        net, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name, pretrained=tag, precision="fp32", device=target
        )
    if checkpoint is not None:
        _load_checkpoint(net, checkpoint)
    net.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(net, tokenizer, train_transform, eval_transform, name)


def _resolve_model(model: str | os.PathLike[str]) -> str:
    """The open_clip model name for ``model``; a config file is registered under its stem."""
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
        return name
    lower = {k.lower(): k for k in known}
    close = [lower[k] for k in difflib.get_close_matches(name.lower(), list(lower), n=5)]
    hint = f"close names: {', '.join(close)}" if close else "see open_clip.list_models()"
    raise ValueError(
        f"{_FN}: model must be an open_clip model name or the path of a model config JSON, "
        f"got {text!r} (not a known model name and not a file); {hint}"
    )


def _register_config(path: Path) -> str:
    """Check a model config JSON and register it with open_clip; return its name (the stem)."""
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{_FN}: model config {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{_FN}: model config {str(path)!r} must hold a JSON object with keys "
            f"{list(_CONFIG_KEYS)}, got a JSON {type(cfg).__name__}"
        )
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(
            f"{_FN}: model config {str(path)!r} must have the keys {list(_CONFIG_KEYS)}; "
            f"missing keys {missing}"
        )
    name = path.stem
    builtin = Path(open_clip.__file__).parent / "model_configs" / f"{name}.json"
    if builtin.is_file():
        raise ValueError(
            f"{_FN}: model config {str(path)!r} is named like open_clip's built-in model "
            f"{name!r} and would replace it for the whole process; rename the file"
        )
    open_clip.add_model_config(path)  # re-registering picks up the file's current content
    return name


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
