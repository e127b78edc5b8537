"""``python -m robustft.demo --save-model DIR``: the demo's CLIP and image folders, for the CLI.

Writes, into a new folder ``DIR``:

- ``model.json``, ``model.safetensors``, ``model.safetensors.json``: the demo's pre-trained tiny
  CLIP (the model ``make demo`` pre-trains: :func:`robustft.demo._model.build_model` with seed 0,
  :func:`robustft.demo._model.pretrain` on the rendered world's broad distribution) saved by
  :func:`robustft.recipes.save_model`, with its normalisation (mean and std 0.5) in the sidecar;
- ``data/``: the demo's splits as image folders of 32×32 PNGs: ``train``, ``val`` and ``test``
  (the known digits zero..seven, clean domain), ``shifted/<shift>`` (the test glyphs in each of
  the demo's five shifted domains), ``open`` (the target-domain test images plus the unknown
  digits eight and nine, in a folder ``unknown`` that is no class), ``classnames.txt`` and ``templates.txt``
  (the demo's prompt templates).

Pre-training takes about two minutes on one thread; the result is cached (``$ROBUSTFT_CACHE``, else
``$XDG_CACHE_HOME/robustft``, else ``~/.cache/robustft``), so later calls take seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from robustft.demo._cache import cache_root, pretrained
from robustft.demo._data import CLASSNAMES, KNOWN, SHIFTS, TEMPLATES, load_splits
from robustft.demo._model import IMAGE_PREPROCESS, MODEL_CONFIG
from robustft.recipes._model import ClipBundle, SavedModel, load_model, save_model
from robustft.recipes._runfolder import RunError, atomic_write

__all__ = ["cache_root", "next_command", "pretrained_clip", "save_demo", "write_folders"]

Log = Callable[[str], None]
_CONFIG_NAME = "robustft-demo-clip"  # the name the model config is registered under in training


def _bundle(model: torch.nn.Module) -> ClipBundle:
    """The demo's CLIP as a :class:`ClipBundle` (through its model config and weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        config, weights = Path(tmp) / f"{_CONFIG_NAME}.json", Path(tmp) / "weights.safetensors"
        config.write_text(json.dumps(MODEL_CONFIG), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        return load_model(config, pretrained=weights, **IMAGE_PREPROCESS)


def pretrained_clip(*, steps: int, seed: int = 0, log: Log = print) -> ClipBundle:
    """The demo's pre-trained CLIP as a bundle: from the cache, or pre-trained (and cached).

    The cache is the demo's own (:func:`robustft.demo._cache.pretrained`): ``make demo`` and
    ``--save-model`` share it. A cache that cannot be read is pre-trained again; one that cannot
    be written is skipped (with a line in the log).
    """
    tic = time.perf_counter()
    model, _ = pretrained(load_splits(seed=0), steps=steps, seed=seed, log=log)
    log(f"  the demo's CLIP ready in {time.perf_counter() - tic:.1f} s")
    return _bundle(model)


def _save_png(image: Tensor, path: Path) -> None:
    """Write a ``[3, H, W]`` image in ``[0, 1]`` as an 8-bit RGB PNG."""
    pixels = (image.permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(path)


def _write_split(root: Path, images: Tensor, labels: Tensor) -> int:
    """``root/<class name>/<index>.png`` per image (label -1: ``unknown``); returns the count."""
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = root / (CLASSNAMES[label] if label >= 0 else "unknown")
        folder.mkdir(parents=True, exist_ok=True)
        _save_png(image, folder / f"{index:04d}.png")
    return len(labels)


def write_folders(root: Path) -> dict[str, int]:
    """Write the demo's splits as image folders under ``root``; returns images per folder.

    ``train``, ``val``, ``test``: the known digits (zero..seven) of the demo's seed-0 split;
    ``shifted/<shift>``: the test images under each of :data:`robustft.demo._data.SHIFTS`;
    ``open``: the target domain's test images plus, in ``open/unknown``, the unknown digits
    (eight and nine) of the demo's open-set test;
    ``classnames.txt``: the known classes in label order; ``templates.txt``: the demo's prompt
    templates, one per line.
    """
    data = load_splits(seed=0)
    counts = {
        "train": _write_split(root / "train", data.train_x, data.train_y),
        "val": _write_split(root / "val", data.val_x, data.val_y),
        "test": _write_split(root / "test", data.test_x, data.test_y),
    }
    for name in SHIFTS:
        counts[f"shifted/{name}"] = _write_split(
            root / "shifted" / name, data.shifted[name], data.test_y
        )
    counts["open"] = _write_split(root / "open", data.target_test_x, data.test_y)
    counts["open"] += _write_split(
        root / "open", data.unknown_test_x, torch.full((len(data.unknown_test_x),), -1)
    )
    atomic_write(root / "classnames.txt", "".join(f"{c}\n" for c in CLASSNAMES[:KNOWN]))
    atomic_write(root / "templates.txt", "".join(f"{t}\n" for t in TEMPLATES))
    return counts


def next_command(directory: Path, *, output: str = "runs/quick") -> str:
    """The ``robustft finetune`` command that fine-tunes the saved model on the saved folders."""
    d = directory.as_posix()
    q = shlex.quote
    lines = [
        "robustft finetune --method clipood",
        f"--model {q(d + '/model.json')} --pretrained {q(d + '/model.safetensors')}",
        f"--train {q(d + '/data/train')} --val {q(d + '/data/val')}",
        f"--classnames {q(d + '/data/classnames.txt')} --templates {q(d + '/data/templates.txt')}",
        f"--eval test={q(d + '/data/test')} --eval open={q(d + '/data/open')}",
        " ".join(f"--shift {s}={q(d + '/data/shifted/' + s)}" for s in ("outlined", "colourful")),
        f"--steps 200 --batch-size 32 --lr 1e-4 --output {q(output)}",
    ]
    return " \\\n    ".join(lines)


def save_demo(directory: Path, *, steps: int, log: Log = print) -> SavedModel:
    """Write the demo's pre-trained CLIP and its digit folders into the new folder ``directory``.

    Everything is written into a temporary sibling first and renamed at the end, so a kill
    leaves no half-written ``directory``.

    Raises:
        RunError: ``directory`` exists and is not empty, or a file could not be written.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise RunError(
            f"--save-model: {str(directory)!r} already exists and is not an empty folder — "
            "remove it or choose another folder"
        )
    bundle = pretrained_clip(steps=steps, log=log)
    tic = time.perf_counter()
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        saved = save_model(bundle, tmp)
        counts = write_folders(tmp / "data")
        with contextlib.suppress(FileNotFoundError):
            directory.rmdir()  # an empty folder is replaced
        os.replace(tmp, directory)
    except OSError as err:
        raise RunError(
            f"--save-model: could not write {str(directory)!r}: {err.strerror or err} — choose "
            "a writable folder with free space"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"  wrote the model and {sum(counts.values())} images "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}) in "
        f"{time.perf_counter() - tic:.1f} s"
    )
    return SavedModel(*(directory / p.name for p in saved))
