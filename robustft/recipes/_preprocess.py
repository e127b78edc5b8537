"""A checkpoint's own image preprocessing: where :func:`~robustft.recipes.load_model` takes it from.

open_clip takes the normalisation (mean, std), the resize mode and the interpolation of the eval
transform from the *pretrained tag's* config; given a local checkpoint file it falls back to the
model config's ``preprocess_cfg`` or to OpenAI's values, which are wrong for about 50 tags
(ViT-L-14 ``laion2b_s32b_b82k``, MobileCLIP, PE-Core, SigLIP, ...). Here the preprocessing is
resolved in layers, each later one winning key by key, with open_clip's own
:class:`open_clip.transform.PreprocessCfg` and ``merge_preprocess_dict``:

1. open_clip's defaults (OpenAI's mean and std, bicubic, ``shortest``);
2. the model config's ``preprocess_cfg``;
3. the pretrained tag's config, or, for a local checkpoint ``weights.safetensors``, the sidecar
   ``weights.safetensors.json`` next to it (:func:`sidecar_path`);
4. the explicit arguments (``--image-mean``, ``--image-std``, ``--image-resize``,
   ``--image-interpolation``).

A sidecar is a JSON object with any of the keys ``mean`` and ``std`` (3 numbers each),
``resize_mode`` (``shortest``, ``longest``, ``squash``), ``interpolation`` (``bicubic``,
``bilinear``) and ``image_size`` (an int, or ``[height, width]``; checked against the model).
:func:`robustft.recipes.save_model` writes one next to every model it saves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from robustft._checks import describe, is_real_number

__all__ = [
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "SIDECAR_KEYS",
    "check_image_size",
    "check_model_config_layer",
    "check_overrides",
    "read_sidecar",
    "record",
    "resolve",
    "sidecar_content",
    "sidecar_path",
]

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
SIDECAR_KEYS = ("mean", "std", "resize_mode", "interpolation", "image_size")
_OPEN_CLIP_KEYS = ("mean", "std", "resize_mode", "interpolation")  # the keys a layer may set


def sidecar_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The preprocessing sidecar of a local checkpoint: its file name with ``.json`` appended."""
    path = Path(checkpoint)
    return path.with_name(path.name + ".json")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else describe(value)


def _triple(where: str, value: Any, *, positive: bool, type_error: bool) -> list[float]:
    """``value`` as 3 finite floats (``> 0`` if ``positive``), or a one-line error about ``where``."""
    need = "3 finite numbers > 0" if positive else "3 finite numbers"
    if not isinstance(value, (list, tuple)) or not all(is_real_number(v) for v in value):
        error = TypeError if type_error else ValueError
        raise error(f"{where} must be a list of {need}, got {_show(value)}")
    values = [float(v) for v in value]
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise ValueError(f"{where} must be a list of {need}, got {_show(list(value))}")
    return values


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(choices)}, got {_show(value)}")
    return value


def _checked_layer(fn: str, what: str, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The open_clip preprocessing keys of ``layer`` (a file's content), each value checked."""
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if layer.get(key) is not None:
            out[key] = _triple(
                f"{fn}: {key!r} of {what}", layer[key], positive=key == "std", type_error=False
            )
    if layer.get("resize_mode") is not None:
        out["resize_mode"] = _choice(
            f"{fn}: 'resize_mode' of {what}", layer["resize_mode"], RESIZE_MODES
        )
    if layer.get("interpolation") is not None:
        out["interpolation"] = _choice(
            f"{fn}: 'interpolation' of {what}", layer["interpolation"], INTERPOLATIONS
        )
    return out


def check_overrides(
    fn: str, *, mean: Any, std: Any, resize: Any, interpolation: Any
) -> dict[str, Any]:
    """The explicit arguments as an open_clip preprocessing layer (``None`` values left out).

    Raises:
        TypeError: ``mean``/``std`` is not a list or tuple of real numbers.
        ValueError: ``mean``/``std`` does not hold 3 finite numbers (``std`` > 0), ``resize`` is
            not one of :data:`RESIZE_MODES` or ``interpolation`` not one of
            :data:`INTERPOLATIONS`.
    """
    out: dict[str, Any] = {}
    if mean is not None:
        out["mean"] = _triple(f"{fn}: image_mean", mean, positive=False, type_error=True)
    if std is not None:
        out["std"] = _triple(f"{fn}: image_std", std, positive=True, type_error=True)
    if resize is not None:
        out["resize_mode"] = _choice(f"{fn}: image_resize", resize, RESIZE_MODES)
    if interpolation is not None:
        out["interpolation"] = _choice(f"{fn}: image_interpolation", interpolation, INTERPOLATIONS)
    return out


def check_model_config_layer(fn: str, path: Path, layer: Any) -> dict[str, Any]:
    """The ``preprocess_cfg`` of a model config file, checked (its other keys are open_clip's)."""
    if not isinstance(layer, Mapping):
        raise ValueError(
            f"{fn}: 'preprocess_cfg' of model config {str(path)!r} must be a JSON object, got "
            f"{_show(layer)}"
        )
    return _checked_layer(fn, f"the preprocess_cfg of model config {str(path)!r}", layer)


def _image_size(where: str, value: Any) -> int | list[int]:
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if positive_int(value):
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(positive_int, value)):
        return [int(value[0]), int(value[1])] if value[0] != value[1] else int(value[0])
    raise ValueError(f"{where} must be a positive int or [height, width], got {_show(value)}")


def read_sidecar(fn: str, path: Path) -> dict[str, Any]:
    """Read and check a preprocessing sidecar; an open_clip layer plus ``image_size`` if given.

    Raises:
        ValueError: the file cannot be read, is not a JSON object, has keys other than
            :data:`SIDECAR_KEYS`, or a value is not allowed.
    """
    what = f"sidecar {str(path)!r}"
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(
            f"{fn}: could not read the preprocessing {what}: {err.strerror or err}"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{fn}: the preprocessing {what} is not valid JSON ({err}); fix or remove it"
        ) from err
    if not isinstance(content, dict):
        raise ValueError(
            f"{fn}: the preprocessing {what} must hold a JSON object with keys among "
            f"{', '.join(SIDECAR_KEYS)}, got a JSON {type(content).__name__}"
        )
    unknown = sorted(set(content) - set(SIDECAR_KEYS))
    if unknown:
        raise ValueError(
            f"{fn}: the preprocessing {what} has unknown keys {unknown}; the allowed keys are "
            f"{', '.join(SIDECAR_KEYS)}"
        )
    layer = _checked_layer(fn, f"the preprocessing {what}", content)
    if content.get("image_size") is not None:
        layer["image_size"] = _image_size(
            f"{fn}: 'image_size' of the preprocessing {what}", content["image_size"]
        )
    return layer


def resolve(layers: list[tuple[str, Mapping[str, Any]]]) -> tuple[dict[str, Any], str]:
    """Merge ``(label, layer)`` pairs over open_clip's defaults, later layers winning key by key.

    Returns:
        The merged open_clip ``PreprocessCfg`` dict and its source: the labels of the layers that
        were given (a tag counts even if its config sets nothing), joined by ``" + "``, or
        ``"default"``.
    """
    merged: dict[str, Any] = merge_preprocess_dict(PreprocessCfg(), {})
    sources: list[str] = []
    for label, layer in layers:
        if label.startswith("tag ") or any(layer.get(k) is not None for k in _OPEN_CLIP_KEYS):
            sources.append(label)
        merged = merge_preprocess_dict(merged, {k: layer.get(k) for k in _OPEN_CLIP_KEYS})
    return merged, " + ".join(sources) or "default"


def record(preprocess_cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The JSON-able record of a model's final preprocessing (open_clip's ``preprocess_cfg``)."""
    size = preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    return {
        "mean": [float(v) for v in preprocess_cfg["mean"]],
        "std": [float(v) for v in preprocess_cfg["std"]],
        "resize_mode": str(preprocess_cfg["resize_mode"]),
        "interpolation": str(preprocess_cfg["interpolation"]),
        "image_size": int(h) if h == w else [int(h), int(w)],
        "source": source,
    }


def check_image_size(fn: str, path: Path, expected: Any, actual: Any) -> None:
    """Refuse a sidecar written for another image size than the model's."""
    if expected != actual:
        raise ValueError(
            f"{fn}: the preprocessing sidecar {str(path)!r} was written for image_size "
            f"{expected}, but the model takes {actual}; it belongs to another model — fix or "
            "remove it"
        )


def sidecar_content(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """What a sidecar holds for a :attr:`~robustft.recipes.ClipBundle.preprocess` record."""
    return {key: preprocess[key] for key in SIDECAR_KEYS}
