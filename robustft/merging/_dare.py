r"""DARE: drop a task vector's entries at random and rescale the rest (Yu et al., ICML 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import check_floating_tree, check_number, describe, fmt_keys
from robustft._numerics import plain_tensor
from robustft.typing import Params, Scalar

__all__ = ["dare"]


def dare(
    task_vector: Params, *, drop: Scalar, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    r"""DARE (drop and rescale): zero each entry with probability :math:`p`, rescale the rest.

    .. math:: \tau' = \frac{m \odot \tau}{1 - p}, \qquad m_j \sim \mathrm{Bernoulli}(1 - p)

    independently for every entry, so :math:`\mathbb{E}[\tau'] = \tau`. Each kept entry is
    exactly ``tau / (1 - p)`` in ``tau``'s dtype, each dropped entry 0. The result is a task
    vector: merge it with :func:`task_arithmetic` or :func:`ties` by adding it back to the anchor
    (``tree.add(anchor, dare(...))``), e.g. inside the loader of :func:`lazy`.

    Reproducible: the masks are drawn from ``generator`` (or torch's default generator) tensor by
    tensor in the tree's key order, one Bernoulli draw per entry, so the same seed gives the same
    result. A merge that loads each candidate twice (:func:`ties`, :func:`greedy_soup`) must see
    the same masks on both loads: seed a generator per candidate
    (``torch.Generator().manual_seed(i)``) inside the loader.

    Args:
        task_vector: :math:`\tau`, a tree of floating-point tensors (e.g. from
            :func:`task_vector`); plain tensors, on the generator's device type.
        drop: :math:`p \in [0, 1)`, the drop rate (the paper uses up to 0.9--0.99 for language
            models); ``0`` returns a copy. ``1`` would drop everything and divide by 0.
        generator: a ``torch.Generator`` for the masks, or ``None`` (the default generator).

    Returns:
        A new tree with ``task_vector``'s keys, shapes and dtypes (differentiable in ``tau``).

    Raises:
        TypeError: a non-tree, non-floating or sharded (``DTensor``) tensors, a bad ``drop`` or
            ``generator``.
        ValueError: ``drop`` outside ``[0, 1)`` or NaN, or tensors on another device type than
            the generator.

    >>> g = torch.Generator().manual_seed(0)
    >>> out = dare({"w": torch.full((8,), 3.0)}, drop=0.5, generator=g)
    >>> sorted(set(out["w"].tolist()))  # each entry dropped (0) or kept and doubled
    [0.0, 6.0]

    References:
        Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as
        a Free Lunch", ICML 2024. Code: https://github.com/yule-BUAA/MergeLM
    """
    fn = "dare"
    check_floating_tree(fn, "task_vector", task_vector)
    p = check_number(fn, "drop", drop, low=0.0, high=1.0, high_inclusive=False)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got {describe(generator)}"
        )
    sharded = [k for k, v in task_vector.items() if not plain_tensor(v)]
    if sharded:
        raise TypeError(
            f"{fn}: task_vector must hold plain tensors (not DTensor or other subclasses), got "
            f"{type(task_vector[sharded[0]]).__name__} at keys {fmt_keys(sharded)}; gather them "
            "with .full_tensor() first"
        )
    if generator is not None:
        other = [k for k, v in task_vector.items() if v.device.type != generator.device.type]
        if other:
            raise ValueError(
                f"{fn}: task_vector must be on the generator's device type "
                f"({generator.device.type}), got {task_vector[other[0]].device} at keys "
                f"{fmt_keys(other)}"
            )
    keep = 1.0 - p
    out: dict[str, Tensor] = {}
    for k, t in task_vector.items():
        if p == 0.0:
            out[k] = t.clone()
            continue
        with torch.no_grad():
            mask = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            mask.bernoulli_(keep, generator=generator)
        out[k] = t * mask / keep
    return out
