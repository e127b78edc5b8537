"""Tiny on-disk data and model for the recipes tests: digit image folders and a tiny CLIP config.

Nothing is downloaded: the images are scikit-learn's bundled 8×8 digits, upsampled to 32×32 RGB
PNGs, and the model is an open_clip config JSON for a 2-layer ViT CLIP (open_clip's bundled BPE
tokenizer at context length 16). Writing the folders takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = ["DIGITS", "KNOWN", "TINY_CONFIG", "DigitFolders", "write_digits", "write_tiny_config"]

DIGITS = ["zero", "one", "two", "three", "four", "five", "six"]
KNOWN = 5  # zero..four are the classes; five and six appear only in the open-set folder
SIZE = 32

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""An open_clip model config: a tiny ViT CLIP (about 0.1 M visual, 1.6 M text parameters)."""


class DigitFolders(NamedTuple):
    """The folders :func:`write_digits` writes (``root/<split>/<digit name>/<index>.png``)."""

    train: Path
    val: Path
    test: Path
    shifted: Path
    open: Path
    names_file: Path


def write_tiny_config(path: Path) -> Path:
    """Write :data:`TINY_CONFIG` as JSON to ``path`` (a ``.json`` file name) and return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CONFIG, indent=2), encoding="utf-8")
    return path


def _render(grey: np.ndarray, *, invert: bool = False) -> Image.Image:
    """An 8×8 digit with values 0..16 -> a 32×32 RGB image (white ink on black, or inverted)."""
    pixels = np.clip(np.rint(grey * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    if invert:
        image = Image.eval(image, lambda v: 255 - v)
    return image.convert("RGB")


def _save(images: np.ndarray, indices: np.ndarray, folder: Path, *, invert: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in indices:
        _render(images[index], invert=invert).save(folder / f"{int(index):04d}.png")


def write_digits(root: Path, *, per_class: int = 12, seed: int = 0) -> DigitFolders:
    """Write disjoint digit images as image folders under ``root``.

    Per known digit (zero..four): ``per_class`` training images, ``max(2, per_class // 3)``
    validation images and ``per_class`` test images; ``shifted`` holds the test images inverted
    (a domain shift), ``open`` the test images plus ``max(2, per_class // 2)`` images of each
    unknown digit (five, six). ``names_file`` lists the known classes as ``folder<TAB>digit
    <folder>``. With the default ``per_class=12``: 272 images.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    images, targets = digits.images, digits.target
    n_val, n_unknown = max(2, per_class // 3), max(2, per_class // 2)
    rng = np.random.default_rng(seed)
    folders = DigitFolders(
        *(root / split for split in ("train", "val", "test", "shifted", "open")),
        names_file=root / "classnames.txt",
    )
    for digit, name in enumerate(DIGITS):
        pool = rng.permutation(np.flatnonzero(targets == digit))
        if len(pool) < 2 * per_class + n_val:
            raise ValueError(
                f"write_digits: per_class={per_class} needs more than {len(pool)} images"
            )
        if digit >= KNOWN:
            _save(images, pool[:n_unknown], folders.open / name)
            continue
        train, val = pool[:per_class], pool[per_class : per_class + n_val]
        test = pool[per_class + n_val : 2 * per_class + n_val]
        _save(images, train, folders.train / name)
        _save(images, val, folders.val / name)
        _save(images, test, folders.test / name)
        _save(images, test, folders.shifted / name, invert=True)
        _save(images, test, folders.open / name)
    lines = [f"{name}\tdigit {name}\n" for name in DIGITS[:KNOWN]]
    folders.names_file.write_text("".join(lines), encoding="utf-8")
    return folders
