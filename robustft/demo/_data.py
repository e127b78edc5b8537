"""The demo's data: scikit-learn's bundled 8×8 digits as small RGB images, splits and shifts.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn. Each 8×8 grey
digit is upsampled to 16×16 and replicated to three channels. The digits 0-7 are the *known*
classes, 8 and 9 the *unknown* ones (label -1 in the open-set test, SPEC §0).

- The **pre-training pool** (all ten digits) is seen only by :func:`broad_batch`, which draws every
  image through a random mix of the distribution shifts and pairs it with a matching caption —
  the broad, web-like distribution of the "pre-trained" CLIP.
- The **fine-tuning** splits hold disjoint images of the known digits, clean only (narrow):
  ``train`` (labelled), ``val`` (model selection: soups, TPGM, the open-set threshold) and
  ``test``. :data:`SHIFTS` turns ``test`` into the shifted test sets, deterministically.
- ``unknown_train`` (unlabelled, for UEO) and ``unknown_test`` hold disjoint images of 8 and 9.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CAPTIONS",
    "CLASSNAMES",
    "KNOWN",
    "SHIFTS",
    "TEMPLATES",
    "Splits",
    "broad_batch",
    "caption_tokens",
    "load_splits",
    "normalize",
    "resplit",
]

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
KNOWN = 8  # digits 0..7 are the known classes; 8 and 9 are unknown
BASE = 4  # open-class experiment: digits 0..3 are the base classes, 4..7 the new ones
SIZE = 16

TEMPLATES = [
    "a photo of the digit {}.",
    "a photo of the number {}.",
    "a drawing of a {}.",
    "the handwritten digit {}.",
]
"""Generic prompt templates: the zero-shot head's ensemble and part of the pre-training captions."""

CAPTIONS = [
    *TEMPLATES,
    "a noisy photo of the digit {}.",  # shift-specific captions, two per shift, in SHIFTS order
    "a grainy picture of the number {}.",
    "a blurry photo of the digit {}.",
    "a blurred picture of the number {}.",
    "an off-centre photo of the digit {}.",
    "a shifted picture of the number {}.",
    "an inverted photo of the digit {}.",
    "a dark picture of the number {}.",
    "a colourful photo of the digit {}.",
    "a coloured drawing of the number {}.",
]
"""Every caption template of the pre-training distribution (generic ones first)."""


class Splits(NamedTuple):
    """Image tensors ``[n, 3, 16, 16]`` in ``[0, 1]`` and labels ``[n]`` of every split."""

    pretrain_x: Tensor
    pretrain_y: Tensor
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    unknown_train_x: Tensor
    unknown_test_x: Tensor


def load_splits(*, seed: int = 0) -> Splits:
    """Shuffle the 1,797 digits with ``seed`` and cut them into the disjoint splits.

    40 % of the images (all ten digits) form the pre-training pool. Of the rest, the known digits
    go 45 / 15 / 40 % to train / val / test and the unknown ones half to ``unknown_train``, half
    to ``unknown_test``.
    """
    from sklearn.datasets import load_digits  # the demo extra; keep `import robustft.demo` light

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.4 * len(y))
    rest_x, rest_y = x[cut:], y[cut:]
    known = rest_y < KNOWN
    kx, ky, ux = rest_x[known], rest_y[known], rest_x[~known]
    a, b = int(0.45 * len(ky)), int(0.60 * len(ky))
    half = len(ux) // 2
    return Splits(
        x[:cut], y[:cut], kx[:a], ky[:a], kx[a:b], ky[a:b], kx[b:], ky[b:], ux[:half], ux[half:]
    )


def resplit(data: Splits, seed: int) -> Splits:
    """Re-draw the train / val partition of the labelled known-class pool for one seed.

    The union of ``train`` and ``val`` is permuted with ``seed`` and cut at the same sizes, so
    every seed of a run trains and selects on its own split; the test sets, the unknown
    digits and the pre-training pool stay as they are (every seed is scored on the same test
    images, so the differences between rows are paired).
    """
    x = torch.cat([data.train_x, data.val_x])
    y = torch.cat([data.train_y, data.val_y])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_007 + seed))
    cut = len(data.train_y)
    train, val = order[:cut], order[cut:]
    return data._replace(train_x=x[train], train_y=y[train], val_x=x[val], val_y=y[val])


def normalize(images: Tensor) -> Tensor:
    """Map ``[0, 1]`` images to ``[-1, 1]``, the model's input range."""
    return images * 2.0 - 1.0


# --- Distribution shifts: x [n, 3, H, W] in [0, 1] -> same shape, with a strength in [0, 1]. ---


def add_noise(x: Tensor, strength: Tensor, g: torch.Generator) -> Tensor:
    """Gaussian pixel noise with standard deviation ``0.4 * strength``."""
    noise = torch.randn(x.shape, generator=g)
    return (x + 0.4 * strength.view(-1, 1, 1, 1) * noise).clamp(0.0, 1.0)


def blur(x: Tensor, strength: Tensor, g: torch.Generator) -> Tensor:
    """Blend with a 5×5 box blur: ``(1 - strength) x + strength * blur(x)``."""
    kernel = torch.full((3, 1, 5, 5), 1.0 / 25.0)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    return torch.lerp(x, blurred, strength.view(-1, 1, 1, 1))


def translate(x: Tensor, strength: Tensor, g: torch.Generator) -> Tensor:
    """Shift by up to ``round(4 * strength)`` pixels along each axis (random signs), zero-filled."""
    out = torch.empty_like(x)
    padded = F.pad(x, (4, 4, 4, 4))
    sign = torch.randint(0, 2, (len(x), 2), generator=g) * 2 - 1
    steps = (4 * strength).round().long().view(-1, 1) * sign
    for i, (dy, dx) in enumerate(steps.tolist()):  # data preparation, not a hot path
        out[i] = padded[i, :, 4 - dy : 4 - dy + SIZE, 4 - dx : 4 - dx + SIZE]
    return out


def invert(x: Tensor, strength: Tensor, g: torch.Generator) -> Tensor:
    """Contrast inversion: ``1 - x`` (applied fully when ``strength > 0``)."""
    return torch.where(strength.view(-1, 1, 1, 1) > 0, 1.0 - x, x)


def colour(x: Tensor, strength: Tensor, g: torch.Generator) -> Tensor:
    """Random ink and paper colours, their contrast scaled down by ``strength / 2``."""
    ink = torch.rand(len(x), 3, 1, 1, generator=g)
    paper = torch.rand(len(x), 3, 1, 1, generator=g)
    paper = torch.lerp(1.0 - ink, paper, 0.5 * strength.view(-1, 1, 1, 1))
    return paper + (ink - paper) * x[:, :1]


Shift = Callable[[Tensor, Tensor, torch.Generator], Tensor]
_TRANSFORMS: dict[str, Shift] = {
    "noise": add_noise,
    "blur": blur,
    "translate": translate,
    "invert": invert,
    "colour": colour,
}


def _fixed(name: str, strength: float) -> Callable[[Tensor], Tensor]:
    def shift(x: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(1234)
        return _TRANSFORMS[name](x, torch.full((len(x),), strength), g)

    shift.__name__ = name
    return shift


SHIFTS: dict[str, Callable[[Tensor], Tensor]] = {
    "noise": _fixed("noise", 0.8),
    "blur": _fixed("blur", 1.0),
    "translate": _fixed("translate", 0.5),
    "invert": _fixed("invert", 1.0),
    "colour": _fixed("colour", 0.5),
}
"""The test-time shifts: deterministic, fixed-strength versions of the pre-training transforms."""


def broad_batch(
    images: Tensor, labels: Tensor, batch_size: int, g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """A batch of the broad pre-training distribution: shifted images and caption ids.

    Each image goes through one random shift (or none, one time in six) at a random strength;
    its caption is a generic template or, half the time, one naming the shift
    (``"a blurry photo of the digit three."``): ``CAPTIONS[template].format(CLASSNAMES[label])``.

    Returns:
        ``[batch, 3, 16, 16]`` images in ``[0, 1]``, ``[batch]`` labels and ``[batch]`` indices
        into :data:`CAPTIONS`.
    """
    idx = torch.randint(0, len(labels), (batch_size,), generator=g)
    x, y = images[idx], labels[idx]
    which = torch.randint(0, len(_TRANSFORMS) + 1, (batch_size,), generator=g)
    strength = torch.rand(batch_size, generator=g)
    for k, transform in enumerate(_TRANSFORMS.values()):
        chosen = (which == k).nonzero().squeeze(1)
        x[chosen] = transform(x[chosen], strength[chosen], g)
    pick = torch.randint(0, 4, (batch_size,), generator=g)
    specific = len(TEMPLATES) + 2 * which + pick - 2  # the shift's own two templates
    template = torch.where((which < len(_TRANSFORMS)) & (pick >= 2), specific, pick)
    return x, y, template


def caption_tokens(tokenizer: Callable[[list[str]], Tensor]) -> Tensor:
    """Token ids of every caption: ``[len(CAPTIONS), 10, context_length]``, tokenised once."""
    rows = [tokenizer([t.format(c) for c in CLASSNAMES]) for t in CAPTIONS]
    return torch.stack(rows)
