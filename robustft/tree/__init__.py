"""Arithmetic and structure over parameter trees (``Mapping[str, Tensor]``).

A parameter tree is what ``dict(model.named_parameters())`` gives and
:func:`torch.func.functional_call` takes. Every other robustft module handles trees through these
functions, so key checks, dtype rules and the ``torch._foreach_*`` fast paths live in one place.

Pure functions return new dicts and never mutate their inputs; the in-place ones end in ``_`` and
write only into their first argument.
"""

from typing import TYPE_CHECKING

from robustft._checks import keyword_hints, moved_names
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

keyword_hints(
    globals(),
    ["select"],
    renamed={
        "select": {
            "regex": "is gone: pass the compiled pattern as where, select(tree, re.compile(r'...'))",
            "predicate": "is gone: pass the predicate as where, select(tree, predicate)",
        }
    },
    notes={
        "select": "several patterns are now one collection, select(tree, ['a*', 'b*'])",
    },
)

# Public names that moved or were removed, and where they went (CHANGELOG, docs/migration.md)
_MOVED = {
    "accumulation_dtype": "was removed from the public API; use "
    "torch.promote_types(dtype, torch.float32)",
}

if not TYPE_CHECKING:  # runtime only: type checkers keep flagging unknown names
    __getattr__ = moved_names(__name__, _MOVED)
