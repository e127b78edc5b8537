"""The demo's data: splits of the rendered world (:mod:`robustft.demo._world`), domains and shifts.

Nothing is downloaded: the digits' glyphs are scikit-learn's bundled 8×8 digits
(``sklearn.datasets.load_digits``); everything else is drawn from formulas with a seed.

- **Pre-training** sees every object (the ten digits and the six shapes) under every attribute,
  through :func:`pretrain_batch`, with a caption from the grammar (:func:`robustft.demo._world.caption`)
  -- the broad, web-like distribution of the "pre-trained" CLIP. It uses 40 % of the glyphs.
- **Fine-tuning** happens in one narrow corner of the attribute space, the *clean* domain
  (:data:`CLEAN`: small white solid objects, centred, on a black noisy background), on the other
  glyphs of the digits zero..seven (the *known* classes): ``train`` (labelled), ``val`` (model
  selection) and ``test``, glyph-disjoint. :data:`SHIFTS` re-draw the test glyphs in five other
  corners (the shifted test sets, paired image for image with the clean one).
- **Open classes**: zero..three are the *base* classes, four..seven the *new* ones; new-class
  names and images appear only in pre-training.
- **Unknown classes** (universal experiment, label -1): the digits eight and nine, drawn in the
  target domain (:data:`TARGET`) next to the known digits. The six shapes appear in pre-training
  only: as unknowns, the zero-shot model takes them for a digit *more* confidently than the
  digits themselves (a circle is a very good "zero"), so MCM could not flag them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustft.demo import _world as world

__all__ = [
    "BASE",
    "CLASSNAMES",
    "CLEAN",
    "DOMAINS",
    "KNOWN",
    "PROMPT",
    "SHIFTS",
    "TARGET",
    "TEMPLATES",
    "Splits",
    "load_splits",
    "normalize",
    "pretrain_batch",
    "resplit",
]

CLASSNAMES = list(world.OBJECTS)
"""Every object's name; labels index it (the known classes are its first :data:`KNOWN`)."""
KNOWN = 8  # the digits zero..seven are the known classes
BASE = 4  # open classes: zero..three are the base classes, four..seven the new ones
UNKNOWN = [8, 9]
"""The unknown classes of the universal experiment: the digits eight and nine."""

TEMPLATES = [
    "a photo of a {}.",
    "a picture of the digit {}.",
    "an image of the number {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
]
"""The zero-shot head's prompt ensemble (openings of the caption grammar)."""
PROMPT = "a photo of a"
"""The single prompt of the methods that use one: CLIPood's head and UEO's context."""


def _codes(attribute: str, *words: str) -> list[int]:
    return [world.ATTRIBUTES[attribute].index(w) for w in words]


CLEAN: dict[str, list[int]] = {
    "colour": _codes("colour", "white"),
    "size": _codes("size", "small"),
    "position": _codes("position", "centre"),
    "style": _codes("style", "solid"),
    "background": _codes("background", "black"),
    "texture": _codes("texture", "noisy"),
}
"""The fine-tuning (in-distribution) domain: attribute -> the codes its scenes draw from."""

SHIFTS: dict[str, dict[str, list[int]]] = {
    "outlined": {**CLEAN, "style": _codes("style", "outlined")},
    "colourful": {
        **CLEAN,
        "colour": list(range(len(world.COLOURS))),
        "background": list(range(len(world.BACKGROUNDS))),
        "texture": _codes("texture", "plain"),
    },
    "larger": {**CLEAN, "size": _codes("size", "medium")},
    "moved": {
        **CLEAN,
        "size": _codes("size", "large"),
        "position": _codes("position", "left", "right", "top", "bottom"),
    },
    "plain": {attribute: list(codes) for attribute, codes in world.PLAIN.items()},
}
"""The test-time domain shifts: each changes some of :data:`CLEAN`'s attributes."""
DOMAINS = {"clean": CLEAN, **SHIFTS}
"""Every domain of the splits: the clean one and the shifts."""
TARGET = "clean"
"""The universal experiment's target domain (a key of :data:`DOMAINS`): the one whose unlabelled
pool the zero-shot model separates best (its MCM AUROC is in every run's regime table)."""

_RENDERS = {"pool": 2, "test": 1, "unknown": 2}  # images drawn per glyph of each split


class Splits(NamedTuple):
    """Image tensors ``[n, 3, 32, 32]`` in ``[0, 1]`` and labels ``[n]`` of every split.

    Attributes:
        train_x, train_y, val_x, val_y: the labelled known-class pool in the clean domain, cut
            glyph-disjointly into train and val (:func:`resplit` re-draws the cut per seed).
        test_x, test_y: the clean test set.
        shifted: shift name -> the test glyphs drawn in that domain (labels ``test_y``).
        target_train_x, target_val_x: the train and val images' scenes in the :data:`TARGET`
            domain (same glyphs and labels as ``train_y`` and ``val_y``).
        target_test_x: the test glyphs in the target domain (labels ``test_y``).
        unknown_train_x, unknown_test_x: unknown objects in the target domain.
        train_glyph, val_glyph: the glyph of every train / val image (for glyph-level cuts).
        pretrain_glyphs: the glyph indices pre-training draws digits from.
        glyphs, glyph_labels: the glyph bank ``[1797, 8, 8]`` and its digits ``[1797]``.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    shifted: dict[str, Tensor]
    target_train_x: Tensor
    target_val_x: Tensor
    target_test_x: Tensor
    unknown_train_x: Tensor
    unknown_test_x: Tensor
    train_glyph: Tensor
    val_glyph: Tensor
    pretrain_glyphs: Tensor
    glyphs: Tensor
    glyph_labels: Tensor


def _items(glyph_ids: Tensor, labels: Tensor, renders: int) -> tuple[Tensor, Tensor]:
    """Each glyph ``renders`` times: ``(glyph ids, labels)``."""
    return glyph_ids.repeat_interleave(renders), labels[glyph_ids].repeat_interleave(renders)


def _render_items(
    glyph_ids: Tensor,
    attributes: Mapping[str, Sequence[int]],
    bank: tuple[Tensor, Tensor],
    seed: int,
) -> Tensor:
    """One image per entry of ``glyph_ids`` (its own glyph), attributes from ``attributes``."""
    g = torch.Generator().manual_seed(seed)
    scenes = world.draw_scenes(bank[1][glyph_ids], glyph_ids, bank[1], g, **attributes)
    scenes[:, -1] = glyph_ids  # exactly this glyph, not one of its class
    return world.render(scenes, bank[0], g)


def load_splits(*, seed: int = 0) -> Splits:
    """Shuffle the 1,797 glyphs with ``seed``, cut them into disjoint splits and draw the images.

    40 % of the glyphs (all ten digits) are pre-training's. Of the rest, the known digits'
    glyphs go 65 / 35 % to the labelled pool (train + val, each glyph drawn twice) and test
    (each once); the pool is cut 60 / 40 % into train and val by glyph (:func:`resplit`). The
    glyphs of eight and nine go half to the unknown train pool, half to the unknown test set
    (each drawn twice). Every image is drawn with a seed of its own split and domain, so the
    splits are the same on every machine.
    """
    from sklearn.datasets import load_digits  # the demo extra; keep `import robustft.demo` light

    digits = load_digits()
    glyphs = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    bank = (glyphs, labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.4 * len(labels))
    pretrain, rest = order[:cut], order[cut:]
    known = rest[labels[rest] < KNOWN]
    unknown = rest[labels[rest] >= KNOWN]
    n_pool = int(0.65 * len(known))
    pool_ids, pool_y = _items(known[:n_pool], labels, _RENDERS["pool"])
    test_ids, test_y = _items(known[n_pool:], labels, _RENDERS["test"])
    test_x = _render_items(test_ids, CLEAN, bank, 1)
    shifted = {
        name: _render_items(test_ids, attributes, bank, 2 + k)
        for k, (name, attributes) in enumerate(SHIFTS.items())
    }
    pool_x = _render_items(pool_ids, CLEAN, bank, 10)
    in_target = {"clean": (pool_x, test_x), **{n: (None, x) for n, x in shifted.items()}}
    target_x = in_target[TARGET][0]
    if target_x is None:
        target_x = _render_items(pool_ids, DOMAINS[TARGET], bank, 11)
    half = len(unknown) // 2
    unknown_x = [
        _render_items(_items(part, labels, _RENDERS["unknown"])[0], DOMAINS[TARGET], bank, 20 + k)
        for k, part in enumerate((unknown[:half], unknown[half:]))
    ]
    data = Splits(
        pool_x, pool_y, pool_x[:0], pool_y[:0], test_x, test_y, shifted, target_x,
        target_x[:0], in_target[TARGET][1], unknown_x[0], unknown_x[1], pool_ids, pool_ids[:0],
        pretrain, glyphs, labels,
    )  # fmt: skip
    return resplit(data, 0)


def resplit(data: Splits, seed: int) -> Splits:
    """Re-draw the glyph-disjoint train / val cut of the labelled pool for one seed.

    The glyphs of the union of ``train`` and ``val`` are permuted with ``seed``; the first 60 %
    (and every image of them, in both the clean and the target domain) are train, the rest val.
    The test sets, the unknown images and the pre-training glyphs stay as they are (every seed
    is scored on the same test images, so the differences between rows are paired).
    """
    x = torch.cat([data.train_x, data.val_x])
    y = torch.cat([data.train_y, data.val_y])
    tx = torch.cat([data.target_train_x, data.target_val_x])
    glyph = torch.cat([data.train_glyph, data.val_glyph])
    order = torch.sort(glyph, stable=True).indices  # the cut depends on the pool only
    x, y, tx, glyph = x[order], y[order], tx[order], glyph[order]
    unique = torch.unique(glyph)
    perm = unique[
        torch.randperm(len(unique), generator=torch.Generator().manual_seed(10_007 + seed))
    ]
    train_glyphs = perm[: int(0.6 * len(perm))]
    train = torch.isin(glyph, train_glyphs)
    return data._replace(
        train_x=x[train], train_y=y[train], val_x=x[~train], val_y=y[~train],
        target_train_x=tx[train], target_val_x=tx[~train], train_glyph=glyph[train],
        val_glyph=glyph[~train],
    )  # fmt: skip


def normalize(images: Tensor) -> Tensor:
    """Map ``[0, 1]`` images to ``[-1, 1]``, the model's input range."""
    return images * 2.0 - 1.0


PLAIN_SHARE = 0.5
"""The share of pre-training pairs that are plain scenes with object-only captions."""


def pretrain_batch(
    data: Splits, batch_size: int, g: torch.Generator, *, keep: float = 0.5
) -> tuple[Tensor, list[str]]:
    """A batch of the broad pre-training distribution: images and their captions.

    Every object (digits and shapes alike) is drawn uniformly; digits use the pre-training
    glyphs. Half the pairs (:data:`PLAIN_SHARE`) are *plain* scenes
    (:data:`robustft.demo._world.PLAIN`: a medium white object centred on black) captioned with
    the object alone ("a photo of a seven."), like the web's simple product photos; the other
    half draw every attribute uniformly and their captions name the object and each attribute
    with probability ``keep`` (:func:`robustft.demo._world.caption`). Without the plain half the
    tiny ViT learns colours and textures but, within the demo's budget, hardly the objects: the
    contrastive loss is lowered faster by the attributes, and the objects are seen only through
    every nuisance at once.

    Returns:
        ``[batch, 3, 32, 32]`` images in ``[0, 1]`` and ``batch`` captions.
    """
    objects = torch.randint(0, len(world.OBJECTS), (batch_size,), generator=g)
    plain = int(PLAIN_SHARE * batch_size)
    scenes = torch.cat(
        [
            world.draw_scenes(objects[:plain], data.pretrain_glyphs, data.glyph_labels, g,
                              **world.PLAIN),
            world.draw_scenes(objects[plain:], data.pretrain_glyphs, data.glyph_labels, g),
        ]
    )  # fmt: skip
    images = world.render(scenes, data.glyphs, g)
    captions = [
        world.caption(s.tolist(), g, keep=0.0 if i < plain else keep) for i, s in enumerate(scenes)
    ]
    return images, captions


def describe(data: Splits) -> dict[str, Any]:
    """The split sizes (for the report)."""
    return {
        "train": len(data.train_y),
        "val": len(data.val_y),
        "test": len(data.test_y),
        "unknown_train": len(data.unknown_train_x),
        "unknown_test": len(data.unknown_test_x),
        "pretrain_glyphs": len(data.pretrain_glyphs),
    }
