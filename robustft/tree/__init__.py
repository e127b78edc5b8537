"""Arithmetic and structure over parameter trees (``Mapping[str, Tensor]``).

A parameter tree is what ``dict(model.named_parameters())`` gives and
:func:`torch.func.functional_call` takes. Every other robustft module handles trees through these
functions, so key checks, dtype rules and the ``torch._foreach_*`` fast paths live in one place.

Pure functions return new dicts and never mutate their inputs; the in-place ones end in ``_`` and
write only into their first argument.
"""

from robustft.tree._arith import (
    add,
    copy_,
    dot,
    lerp,
    lerp_,
    norm,
    scale,
    sq_norm,
    sub,
)
from robustft.tree._select import Where, combine, partition, select
from robustft.tree._structure import (
    cast,
    check_same_structure,
    check_tree,
    clone,
    from_module,
    map,
    zeros_like,
)

__all__ = [
    "Where",
    "add",
    "cast",
    "check_same_structure",
    "check_tree",
    "clone",
    "combine",
    "copy_",
    "dot",
    "from_module",
    "lerp",
    "lerp_",
    "map",
    "norm",
    "partition",
    "scale",
    "select",
    "sq_norm",
    "sub",
    "zeros_like",
]
