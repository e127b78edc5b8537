"""The miniature's world: procedurally rendered 32×32 scenes and a caption grammar over them.

Every image shows one *object* -- a handwritten digit (a glyph of scikit-learn's bundled 8×8
digits, nothing downloaded) or a geometric shape -- drawn with six attributes, each from a short
list: the object's colour, size, position and style, and the background's colour and texture. A
scene is a row of integer codes (:data:`FIELDS`); :func:`render` draws a batch of scenes at once
(vectorised torch, no Python loop over images) and :func:`caption` writes a caption that names the
object and a random subset of its attributes ("a small red outlined seven on a grey striped
background, at the top."). Pre-training pairs the two over the whole space of attributes, as web
captions describe images with many words besides the class; the fine-tuning domain is one narrow
corner of that space (:data:`robustft.demo._data.DOMAINS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "DIGITS",
    "FIELDS",
    "OBJECTS",
    "PLAIN",
    "POSITIONS",
    "SHAPES",
    "SIZE",
    "SIZES",
    "STYLES",
    "TEXTURES",
    "caption",
    "draw_scenes",
    "glyph_masks",
    "render",
    "vocabulary_texts",
]

SIZE = 32
TEXTURE_CONTRAST = 0.15
"""How much a background texture lightens the (dark) background colour."""
STYLE_FLOOR = 0.4
"""The ink's weight between a striped or dotted style's marks."""
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPES = ["circle", "square", "triangle", "cross", "star", "heart"]
OBJECTS = [*DIGITS, *SHAPES]
"""Every object class: the ten digits (glyphs), then the shapes (drawn from formulas)."""

COLOURS = {
    "red": (0.95, 0.25, 0.2),
    "green": (0.35, 0.9, 0.3),
    "blue": (0.4, 0.55, 1.0),
    "yellow": (0.95, 0.9, 0.2),
    "purple": (0.8, 0.45, 1.0),
    "orange": (1.0, 0.6, 0.15),
    "white": (0.97, 0.97, 0.97),
    "pink": (1.0, 0.6, 0.8),
}
"""The objects' colours: all light, so an object is always lighter than its background."""
BACKGROUNDS = {
    "black": (0.05, 0.05, 0.05),
    "grey": (0.32, 0.32, 0.32),
    "brown": (0.35, 0.2, 0.1),
    "navy": (0.08, 0.1, 0.35),
    "maroon": (0.38, 0.05, 0.1),
    "olive": (0.28, 0.3, 0.05),
}
"""The backgrounds' colours: all dark."""
SIZES = {"small": 0.62, "medium": 0.78, "large": 0.95}
POSITIONS = {
    "centre": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "top": (0.0, -1.0),
    "bottom": (0.0, 1.0),
}
STYLES = ["solid", "outlined", "striped", "dotted"]
TEXTURES = ["plain", "striped", "checkered", "noisy", "spotted"]

PLAIN = {
    "colour": [6],
    "size": [1],
    "position": [0],
    "style": [0],
    "background": [0],
    "texture": [0],
}
"""The plain scene: a medium white solid object, centred on a plain black background."""

FIELDS = ("object", "colour", "size", "position", "style", "background", "texture", "glyph")
"""The columns of a scene ``[n, 8]`` long tensor: an index into each list, and for a digit the
index of its glyph in the glyph bank (ignored for shapes, whose variation is drawn from it)."""

ATTRIBUTES = {
    "colour": list(COLOURS),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "style": STYLES,
    "background": list(BACKGROUNDS),
    "texture": TEXTURES,
}
"""Each attribute's words, in code order."""


def draw_scenes(
    objects: Tensor,
    glyph_pool: Tensor,
    glyph_labels: Tensor,
    g: torch.Generator,
    **attributes: Sequence[int],
) -> Tensor:
    """``[n, 8]`` scene codes (:data:`FIELDS`) for the given objects, attributes drawn at random.

    Args:
        objects: ``[n]`` object indices (into :data:`OBJECTS`).
        glyph_pool: ``[m]`` indices into the glyph bank the digits may use (a split's glyphs).
        glyph_labels: ``[len(bank)]`` the digit of every glyph of the bank.
        g: CPU generator.
        **attributes: attribute name (a key of :data:`ATTRIBUTES`) -> the codes it is drawn
            from, uniformly (default: every code).

    A digit gets a random glyph of its own class from ``glyph_pool``; a shape gets a random
    variation code.
    """
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"draw_scenes: unknown attributes {sorted(unknown)}")
    n = len(objects)
    columns = [objects]
    for name, words in ATTRIBUTES.items():
        allowed = torch.as_tensor(list(attributes.get(name, range(len(words)))))
        columns.append(allowed[torch.randint(0, len(allowed), (n,), generator=g)])
    glyph = torch.randint(0, 4096, (n,), generator=g)
    pool_labels = glyph_labels[glyph_pool]
    for digit in range(len(DIGITS)):
        chosen = (objects == digit).nonzero().squeeze(1)
        if len(chosen):
            own = glyph_pool[pool_labels == digit]
            if not len(own):
                raise ValueError(
                    f"draw_scenes: glyph_pool has no glyph of the digit {DIGITS[digit]!r}, which "
                    f"objects asks for; give a pool with a glyph of every digit drawn"
                )
            glyph[chosen] = own[torch.randint(0, len(own), (len(chosen),), generator=g)]
    columns.append(glyph)
    return torch.stack(columns, 1)


def _grid(n: int) -> tuple[Tensor, Tensor]:
    """``[1, SIZE, SIZE]`` x and y coordinates in ``[-1, 1]`` (pixel centres)."""
    c = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x.expand(n, -1, -1), y.expand(n, -1, -1)


def _shape_masks(kind: Tensor, variation: Tensor) -> Tensor:
    """``[n, 1, SIZE, SIZE]`` soft masks of the shapes ``kind`` (indices into :data:`SHAPES`).

    ``variation`` (any integers) seeds a small rotation, aspect ratio and stroke width per image,
    so that a shape class has within-class variation like a digit's glyphs.
    """
    n = len(kind)
    g = torch.Generator().manual_seed(0)
    table = torch.rand(4096, 3, generator=g)
    v = table[variation % 4096]
    angle = (v[:, 0] - 0.5) * 0.6
    aspect = 0.8 + 0.4 * v[:, 1]
    width = 0.18 + 0.1 * v[:, 2]
    x, y = _grid(n)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    xr = (cos * x + sin * y) * aspect.view(-1, 1, 1)
    yr = (-sin * x + cos * y) / aspect.view(-1, 1, 1)
    r = torch.sqrt(xr**2 + yr**2)
    theta = torch.atan2(yr, xr)
    w = width.view(-1, 1, 1)
    sdf = torch.stack(
        [
            r - 0.8,  # circle
            torch.maximum(xr.abs(), yr.abs()) - 0.7,  # square
            torch.maximum(yr - 0.65, (yr * -0.5 + xr.abs() * 0.866) - 0.33),  # triangle
            torch.minimum(  # cross
                torch.maximum(xr.abs() - w, yr.abs() - 0.8),
                torch.maximum(yr.abs() - w, xr.abs() - 0.8),
            ),
            r - (0.45 + 0.35 * torch.cos(5 * theta).clamp(min=0) ** 2),  # star
            torch.sqrt(xr**2 + (yr + 0.35 - 0.6 * xr.abs().sqrt()) ** 2) - 0.7,  # heart
        ]
    )
    chosen = sdf[kind, torch.arange(n)]
    return torch.sigmoid(-chosen * 20).unsqueeze(1)


def glyph_masks(images: Tensor) -> Tensor:
    """``[n, 1, SIZE, SIZE]`` soft masks from 8×8 digit images in ``[0, 1]`` (bilinear upsampling)."""
    up = F.interpolate(images.unsqueeze(1), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (up * 1.6 - 0.2).clamp(0.0, 1.0)


def _place(mask: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Scale the centred masks by ``scale`` and move them by ``offset`` (both per image)."""
    n = len(mask)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / scale
    theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = -offset / scale.unsqueeze(1)
    grid = F.affine_grid(theta, [n, 1, SIZE, SIZE], align_corners=False)
    return F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _patterns(n: int, g: torch.Generator) -> dict[str, Tensor]:
    """Texture patterns ``[n, 1, SIZE, SIZE]`` in ``[0, 1]`` with a random phase per image."""
    x, y = _grid(n)
    px = (x + 1) * SIZE / 2
    py = (y + 1) * SIZE / 2
    phase = torch.randint(0, 8, (n, 2), generator=g).float().view(n, 2, 1, 1)
    stripes = (((px + py + phase[:, 0]) // 3) % 2).float()
    checks = (((px + phase[:, 0]) // 4 + (py + phase[:, 1]) // 4) % 2).float()
    dots = ((((px + phase[:, 0]) % 6 - 3) ** 2 + ((py + phase[:, 1]) % 6 - 3) ** 2) < 3.5).float()
    noise = torch.rand(n, SIZE, SIZE, generator=g)
    return {
        "plain": torch.zeros(n, SIZE, SIZE),
        "striped": stripes,
        "checkered": checks,
        "noisy": noise,
        "spotted": dots,
    }


def render(scenes: Tensor, glyphs: Tensor, g: torch.Generator) -> Tensor:
    """Draw a batch of scenes: ``[n, 3, SIZE, SIZE]`` images in ``[0, 1]``.

    Args:
        scenes: ``[n, 8]`` long codes (:data:`FIELDS`).
        glyphs: ``[m, 8, 8]`` the glyph bank (digit images in ``[0, 1]``) the digits index.
        g: CPU generator for the per-image randomness (pattern phases, noise, jitter).
    """
    n = len(scenes)
    obj, colour, size, pos, style, bg, texture, glyph = scenes.T
    is_digit = obj < len(DIGITS)
    mask = torch.empty(n, 1, SIZE, SIZE)
    if is_digit.any():
        mask[is_digit] = glyph_masks(glyphs[glyph[is_digit]])
    if (~is_digit).any():
        mask[~is_digit] = _shape_masks(obj[~is_digit] - len(DIGITS), glyph[~is_digit])
    scale = torch.tensor(list(SIZES.values()))[size]
    scale = scale * (0.92 + 0.16 * torch.rand(n, generator=g))
    direction = torch.tensor(list(POSITIONS.values()))[pos]
    offset = direction * (1 - scale).unsqueeze(1) * 0.95
    offset = offset + (torch.rand(n, 2, generator=g) - 0.5) * 0.1
    mask = _place(mask, scale, offset)
    patterns = _patterns(n, g)
    pattern_stack = torch.stack([patterns[t] for t in TEXTURES])  # [textures, n, H, W]
    # the object's style: solid, its outline, or the solid masked by stripes or dots
    inner = -F.max_pool2d(-mask, 3, stride=1, padding=1)
    outline = (mask - inner).mul(2.5).clamp(0.0, 1.0)
    styled = torch.stack(
        [
            mask,
            outline,
            mask * (STYLE_FLOOR + (1 - STYLE_FLOOR) * patterns["striped"].unsqueeze(1)),
            mask * (STYLE_FLOOR + (1 - STYLE_FLOOR) * patterns["spotted"].unsqueeze(1)),
        ]
    )[style, torch.arange(n)]
    ink = torch.tensor(list(COLOURS.values()))[colour].view(n, 3, 1, 1)
    paper = torch.tensor(list(BACKGROUNDS.values()))[bg].view(n, 3, 1, 1)
    texture_map = pattern_stack[texture, torch.arange(n)].unsqueeze(1)
    # a texture lightens the (dark) background by up to TEXTURE_CONTRAST
    background = (paper + TEXTURE_CONTRAST * texture_map).clamp(0.0, 1.0)
    return torch.lerp(background, ink.expand_as(background), styled)


_OPENINGS = ["a photo of", "a picture of", "an image of", "a drawing of", "a rendering of"]
_POSITION_PHRASES = {
    "centre": "in the centre",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}


def caption(scene: Sequence[int], g: torch.Generator, *, keep: float = 0.5) -> str:
    """A caption of one scene from the grammar; each attribute is named with probability ``keep``.

    ``"{opening} a [size] [colour] [style] {object} [on a [background] [texture] background]
    [position]."`` -- the object is always named, digits sometimes as "the digit {name}" or
    "the number {name}", shapes as "{name} shape".
    """
    obj, colour, size, pos, style, bg, texture, _ = (int(v) for v in scene)
    draws = torch.rand(8, generator=g).tolist()
    words = [_OPENINGS[int(draws[0] * len(_OPENINGS))], "a"]
    if draws[1] < keep:
        words.append(list(SIZES)[size])
    if draws[2] < keep:
        words.append(list(COLOURS)[colour])
    if draws[3] < keep:
        words.append(STYLES[style])
    name = OBJECTS[obj]
    if obj < len(DIGITS):
        form = int(draws[4] * 3)
        words += [["", "digit", "number"][form], name] if form else [name]
    else:
        words += [name, "shape"] if draws[4] < 0.5 else [name]
    if draws[5] < keep:
        ground = [list(BACKGROUNDS)[bg]] + ([TEXTURES[texture]] if draws[6] < 0.5 else [])
        words += ["on", "a", *ground, "background"]
    elif draws[6] < keep * 0.5:
        words += ["on", "a", TEXTURES[texture], "background"]
    if draws[7] < keep:
        words.append(_POSITION_PHRASES[list(POSITIONS)[pos]])
    words = [w for w in words if w]
    for i in range(len(words) - 1):  # "a orange" -> "an orange"
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words) + "."


def vocabulary_texts() -> list[str]:
    """Texts that hold every word of the grammar (the random texts' vocabulary, one per line)."""
    words = [
        *_OPENINGS,
        "a an the digit number shape on background in at",
        *OBJECTS,
        *(w for ws in ATTRIBUTES.values() for w in ws),
        *_POSITION_PHRASES.values(),
    ]
    return [w + "." for w in words]
