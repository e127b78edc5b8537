r"""LiNeS-style depth schedules: a per-tensor coefficient linear in the layer depth."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

from robustft._checks import check_number, check_tensor_tree, describe, fmt_keys, is_real_number
from robustft.typing import Params

__all__ = ["depth_schedule"]

_BLOCK = re.compile(r"^(?:(.*)\.)?(?:resblocks|blocks|layers|layer)\.(\d+)\.")
_EMBEDDINGS = frozenset(
    {
        "conv1",
        "class_embedding",
        "positional_embedding",
        "token_embedding",
        "ln_pre",
        "patch_embed",
        "cls_token",
        "pos_embed",
        "embeddings",
        "embed_tokens",
    }
)


def _default_fractions(fn: str, keys: list[str]) -> dict[str, float]:
    """Relative depth in [0, 1] per key from open_clip / timm-style names (see depth_schedule)."""
    blocks: dict[str, tuple[str, int]] = {}
    depth: dict[str, int] = {}  # blocks per tower prefix
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            tower, i = m.group(1) or "", int(m.group(2))
            blocks[k] = (tower, i)
            depth[tower] = max(depth.get(tower, 0), i + 1)
    if not blocks:
        raise ValueError(
            f"{fn}: keys must name transformer blocks ('resblocks.<i>.', 'blocks.<i>.', "
            f"'layers.<i>.') for the default depth parser, got none in {fmt_keys(keys)}; pass "
            "depth_of= for other models"
        )
    out: dict[str, float] = {}
    for k in keys:
        if k in blocks:
            tower, i = blocks[k]
            out[k] = (i + 1) / (depth[tower] + 1)
        elif _EMBEDDINGS.intersection(k.split(".")):
            out[k] = 0.0
        else:  # final norms, projections, heads, logit_scale: the output side
            out[k] = 1.0
    return out


def depth_schedule(
    params: Params | Iterable[str],
    *,
    start: float,
    end: float,
    depth_of: Callable[[str], float] | None = None,
) -> dict[str, float]:
    r"""A per-tensor coefficient linear in each tensor's depth (LiNeS): ``start`` shallow, ``end`` deep.

    .. math:: \lambda_k = \lambda_{\mathrm{start}}
        + (\lambda_{\mathrm{end}} - \lambda_{\mathrm{start}})\,\frac{d_k}{D}

    with :math:`d_k` the depth of tensor :math:`k` and :math:`D` the largest depth. Pass the
    result as ``alpha=`` of :func:`wise` or ``scale=`` of :func:`task_arithmetic` / :func:`ties`:
    LiNeS keeps the shallow, general-purpose layers close to the pre-trained weights (a small
    ``start``) and the deep, task-specific ones fine-tuned (``end``), which reduces forgetting
    after fine-tuning and interference in multi-task merges.

    Default depths (open_clip and timm names): a tensor of transformer block :math:`i` of a tower
    with :math:`L` blocks (``visual.transformer.resblocks.{i}.``, ``transformer.resblocks.{i}.``,
    ``blocks.{i}.``, ``layers.{i}.``) has relative depth :math:`(i+1)/(L+1)`, each tower
    normalised by its own :math:`L` (a ViT-L/14 visual tower of 24 blocks next to a 12-block text
    tower); embeddings (``conv1``, ``class_embedding``, ``positional_embedding``,
    ``token_embedding``, ``ln_pre``, ``patch_embed``, ...) are at depth 0 (``start``); every other
    tensor -- final norms (``ln_post``, ``ln_final``), projections (``proj``,
    ``text_projection``), ``logit_scale`` and heads -- at depth :math:`L+1` (``end``).
    ``depth_of(name) -> depth`` overrides this: any non-negative numbers, divided by their maximum.

    The official LiNeS code scales the blocks only, by :math:`\alpha + \beta\,\ell/(L-1)` for
    block :math:`\ell = 0, \dots, L-1`; to reproduce it, pass ``start=alpha``,
    ``end=alpha + beta`` and a ``depth_of`` that returns the block index (and what the official
    code gives the other tensors).

    Args:
        params: a tree or its keys (only the names are used).
        start: the coefficient at depth 0 (embeddings), a finite real number.
        end: the coefficient at the deepest tensors (output side), a finite real number.
        depth_of: ``name -> depth`` (a non-negative real number), or ``None`` for the default
            open_clip / timm parser.

    Returns:
        A dict ``{name: coefficient}`` in ``params``' key order.

    Raises:
        TypeError: a ``params`` that is neither a tree nor an iterable of ``str``, bad
            ``start``/``end``, a non-callable ``depth_of`` or a non-number depth.
        ValueError: no keys, non-finite ``start``/``end``, keys without transformer blocks
            (default parser), negative or non-finite depths, or every depth 0.

    >>> keys = ["visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
    ...         "visual.transformer.resblocks.1.mlp.c_fc.weight", "visual.proj"]
    >>> depth_schedule(keys, start=0.0, end=1.0)
    {'visual.conv1.weight': 0.0, 'visual.transformer.resblocks.0.attn.in_proj_weight': 0.3333333333333333, 'visual.transformer.resblocks.1.mlp.c_fc.weight': 0.6666666666666666, 'visual.proj': 1.0}

    References:
        Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
        Merging", ICLR 2025. Code: https://github.com/wang-kee/LiNeS
    """
    fn = "depth_schedule"
    if isinstance(params, Mapping):
        keys = list(check_tensor_tree(fn, "params", params))
    elif isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(
            f"{fn}: params must be a parameter tree or an iterable of parameter names, got "
            f"{describe(params)}"
        )
    else:
        keys = list(params)
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{fn}: params must hold str names, got {describe(bad[0])}")
    if not keys:
        raise ValueError(f"{fn}: params must hold at least one name, got none")
    a = check_number(fn, "start", start)
    b = check_number(fn, "end", end)
    if depth_of is None:
        frac = _default_fractions(fn, keys)
    else:
        if not callable(depth_of):
            raise TypeError(f"{fn}: depth_of must be callable or None, got {describe(depth_of)}")
        depths: dict[str, float] = {}
        for k in keys:
            d = depth_of(k)
            if not is_real_number(d):
                raise TypeError(
                    f"{fn}: depth_of must return a real number, got {describe(d)} for {k!r}"
                )
            if math.isnan(float(d)) or math.isinf(float(d)) or float(d) < 0:
                raise ValueError(
                    f"{fn}: depth_of must return a finite number >= 0, got {d!r} for {k!r}"
                )
            depths[k] = float(d)
        deepest = max(depths.values())
        if deepest == 0:
            raise ValueError(f"{fn}: depth_of must give some key a depth > 0, got 0 for every key")
        frac = {k: d / deepest for k, d in depths.items()}
    # torch.lerp's two-sided form: exact at both ends
    return {k: a + (b - a) * f if f < 0.5 else b - (b - a) * (1.0 - f) for k, f in frac.items()}
