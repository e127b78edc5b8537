"""Argument validators shared by every public function.

Every validator raises ``ValueError`` or ``TypeError`` with a message in the house form::

    fn: arg must be <what is allowed>, got <value received>

so that a user reading the traceback knows which call, which argument, what was passed and what
would have been accepted. Validators only look at Python-level metadata (types, shapes, dtypes and
Python numbers); they never read tensor *values*, so they are safe in hot paths, under
``torch.func`` transforms and inside ``torch.compile`` graphs.
"""

from __future__ import annotations

import dis
import functools
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DuplicateKeyError",
    "apply_reduction",
    "check_choice",
    "check_device",
    "check_dtype",
    "check_floating",
    "check_floating_tree",
    "check_group",
    "check_int",
    "check_labels",
    "check_ndim",
    "check_number",
    "check_per_tensor",
    "check_per_tensor_scalar",
    "check_reduction",
    "check_same_size",
    "check_scalar",
    "check_tensor",
    "check_tensor_tree",
    "describe",
    "fmt_keys",
    "is_dtensor",
    "is_functorch_wrapped",
    "is_real_number",
    "keyword_hints",
    "moved_names",
    "unique_keys",
]

_REDUCTIONS = ("mean", "sum", "none")

_functorch_probe: Callable[[Tensor], bool] = getattr(
    torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False
)


def is_functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (batched by ``vmap``, tracked by ``grad``).

    Such tensors take the per-tensor paths (no ``torch._foreach_*``, no value reads). A metadata
    probe: no tensor value is read. Not traceable by dynamo: check
    ``torch.compiler.is_compiling()`` first.
    """
    return bool(_functorch_probe(t))


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (sharded by FSDP2 or tensor
    parallelism). A type probe that never imports ``torch.distributed.tensor`` itself: if the
    module was never imported, no DTensor can exist.
    """
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return isinstance(dtensor, type) and isinstance(t, dtensor)


def describe(value: Any) -> str:
    """Short human description of ``value`` for error messages (never prints tensor contents)."""
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))!r}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is a real Python or NumPy number (``bool`` and ``numpy.bool_`` excluded)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    return isinstance(value, numbers.Real)


def _interval(low: float | None, high: float | None, low_inc: bool, high_inc: bool) -> str:
    lb = "-inf" if low is None else repr(low)
    hb = "inf" if high is None else repr(high)
    text = ("[" if low_inc and low is not None else "(") + f"{lb}, {hb}"
    return text + ("]" if high_inc and high is not None else ")")


def check_number(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_tensor: bool = False,
    finite: bool = True,
) -> float:
    """Check a real number lies in an interval; return it as a Python float.

    Python and NumPy numbers are accepted (``bool`` is not). NaN is always rejected; ``±inf`` is
    rejected unless ``finite=False`` (a threshold may be infinite, a scale or temperature may not).
    ``allow_tensor`` admits 0-d floating tensors; their value is *not* read (no ``.item()``) and the
    interval is then not checked, so traced or compiled callers keep working.
    """
    if allow_tensor and isinstance(value, Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise TypeError(
                f"{fn}: {name} must be a real number or a 0-d floating tensor, got {describe(value)}"
            )
        return value  # type: ignore[return-value]
    if not is_real_number(value):
        what = "a real number or a 0-d floating tensor" if allow_tensor else "a real number"
        raise TypeError(f"{fn}: {name} must be {what}, got {describe(value)}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{fn}: {name} must not be NaN, got {value!r}")
    if finite and math.isinf(x):
        interval = _interval(low, high, low_inclusive, high_inclusive)
        raise ValueError(f"{fn}: {name} must be a finite number in {interval}, got {value!r}")
    lo_ok = low is None or (x >= low if low_inclusive else x > low)
    hi_ok = high is None or (x <= high if high_inclusive else x < high)
    if not (lo_ok and hi_ok):
        interval = _interval(low, high, low_inclusive, high_inclusive)
        raise ValueError(f"{fn}: {name} must be in {interval}, got {value!r}")
    return x


def check_scalar(fn: str, name: str, value: Any, *, positive: bool = False) -> Any:
    """A finite real number (Python or NumPy) or a 0-d floating tensor (value not read).

    Numbers come back as Python floats; tensors unchanged. ``positive`` requires ``> 0`` of numbers.
    """
    low = 0 if positive else None
    return check_number(fn, name, value, low=low, low_inclusive=not positive, allow_tensor=True)


def check_int(fn: str, name: str, value: Any, *, low: int | None = None) -> int:
    """Check ``value`` is a Python or NumPy integer (not bool) with ``value >= low``; return an int."""
    if (
        isinstance(value, bool)
        or type(value).__name__ == "bool_"
        or not isinstance(value, numbers.Integral)
    ):
        raise TypeError(f"{fn}: {name} must be an int, got {describe(value)}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")
    return value


def check_choice(fn: str, name: str, value: Any, choices: Collection[Any]) -> Any:
    """Check ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{fn}: {name} must be one of {allowed}, got {describe(value)}")
    return value


def check_reduction(fn: str, reduction: Any) -> str:
    """Check a ``reduction`` argument is ``"mean"``, ``"sum"`` or ``"none"``."""
    if not isinstance(reduction, str):
        raise TypeError(
            f"{fn}: reduction must be one of 'mean', 'sum', 'none', got {describe(reduction)}"
        )
    return str(check_choice(fn, "reduction", reduction, _REDUCTIONS))


def check_tensor(fn: str, name: str, value: Any) -> Tensor:
    """Check ``value`` is a ``torch.Tensor``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {describe(value)}")
    return value


def check_floating(
    fn: str, name: str, value: Any, *, ndim: int | Sequence[int] | None = None
) -> Tensor:
    """Check ``value`` is a floating-point tensor, optionally of a given rank."""
    check_tensor(fn, name, value)
    if not value.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None:
        check_ndim(fn, name, value, ndim)
    return value


def check_ndim(fn: str, name: str, value: Tensor, ndim: int | Sequence[int]) -> Tensor:
    """Check a tensor's rank is ``ndim`` (or one of several ranks)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if value.ndim not in allowed:
        what = " or ".join(str(n) for n in allowed)
        raise ValueError(
            f"{fn}: {name} must have {what} dimension(s), got shape {tuple(value.shape)}"
        )
    return value


def check_same_size(
    fn: str, name_a: str, a: Tensor, dim_a: int, name_b: str, b: Tensor, dim_b: int
) -> None:
    """Check ``a.shape[dim_a] == b.shape[dim_b]`` (e.g. matching batch or embedding sizes)."""
    if a.shape[dim_a] != b.shape[dim_b]:
        raise ValueError(
            f"{fn}: {name_a}.shape[{dim_a}] must equal {name_b}.shape[{dim_b}], got "
            f"{name_a} of shape {tuple(a.shape)} and {name_b} of shape {tuple(b.shape)}"
        )


def check_labels(fn: str, name: str, labels: Any, *, batch: int | None = None) -> Tensor:
    """Check ``labels`` is a 1-d integer tensor (optionally of length ``batch``); return it as int64.

    Every integer dtype is accepted (int64, int32, int16, int8, uint8, ...) and converted to int64,
    the index dtype torch's gathers and ``cross_entropy`` require; use the returned tensor. Values
    are not read here (no host sync); range checks that need values belong in eager-only paths.
    """
    check_tensor(fn, name, labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor, got dtype {labels.dtype}")
    check_ndim(fn, name, labels, 1)
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(
            f"{fn}: {name} must have length {batch} (the batch size), got shape {tuple(labels.shape)}"
        )
    return labels if labels.dtype == torch.int64 else labels.long()


def check_per_tensor(fn: str, name: str, value: Any, keys: Collection[str]) -> None:
    """Check a per-tensor hyper-parameter: a scalar, or a mapping whose keys are exactly ``keys``."""
    if isinstance(value, Mapping):
        missing = sorted(set(keys) - set(value))
        unexpected = sorted(set(value) - set(keys))
        if missing or unexpected:
            raise ValueError(
                f"{fn}: {name} given per tensor must have the same keys as the tree; "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )


def fmt_keys(keys: Iterable[str], limit: int = 10) -> str:
    """Sorted keys for an error message, at most ``limit`` of them and a count of the rest."""
    keys = sorted(keys)
    if len(keys) <= limit:
        return repr(keys)
    return repr(keys[:limit])[:-1] + f", ... ({len(keys) - limit} more)]"


def check_tensor_tree(fn: str, name: str, tree: Any) -> Mapping[str, Tensor]:
    """A parameter tree: a ``Mapping`` with ``str`` keys and ``torch.Tensor`` leaves (any dtype).

    The structural half of :func:`check_floating_tree`; ``robustft.tree.check_tree`` is this.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{fn}: {name} must be a mapping from parameter names to tensors "
            f"(e.g. dict(model.named_parameters())), got {describe(tree)}"
        )
    bad_keys = [k for k in tree if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"{fn}: {name} must have str keys, got non-str keys {bad_keys[:10]!r}")
    bad = [k for k, v in tree.items() if not isinstance(v, Tensor)]
    if bad:
        kinds = sorted({type(tree[k]).__name__ for k in bad})
        raise TypeError(
            f"{fn}: {name} must have torch.Tensor leaves, got non-tensor leaves "
            f"({', '.join(kinds)}) at keys {fmt_keys(bad)}"
        )
    return tree


def check_floating_tree(fn: str, name: str, tree: Any, *, hint: str = "") -> Mapping[str, Tensor]:
    """A parameter tree (``Mapping[str, Tensor]``) whose leaves are all floating-point tensors.

    The one home of the tree check every weight-space function shares (averages, merges,
    projections, norms). ``hint`` is appended to the dtype error (e.g. how to drop int buffers).
    """
    check_tensor_tree(fn, name, tree)
    bad = [k for k, v in tree.items() if not v.is_floating_point()]
    if bad:
        dtypes = sorted({str(tree[k].dtype) for k in bad})
        raise TypeError(
            f"{fn}: {name} must hold floating-point tensors only, got {', '.join(dtypes)} at keys "
            f"{fmt_keys(bad)}" + (f"; {hint}" if hint else "")
        )
    return tree


def check_per_tensor_scalar(
    fn: str,
    name: str,
    value: Any,
    keys: Collection[str],
    *,
    low: float | None = None,
    low_inclusive: bool = True,
    finite: bool = True,
) -> Any:
    """A per-tensor scalar (``PerTensor[Scalar]``): a number, a 0-d floating tensor, or a mapping.

    The one validator of weights, factors, interpolation coefficients and radii over a tree.
    Numbers (Python or NumPy, not ``bool``) are checked by :func:`check_number` (``low``,
    ``finite``) and come back as Python floats; 0-d floating tensors come back unchanged (values
    not read); a mapping must have exactly ``keys`` and comes back as a ``dict`` in ``keys``'
    order with each entry normalised the same way (errors name the entry, ``name['key']``).
    """

    def one(entry: str, v: Any) -> Any:
        if isinstance(v, Tensor):
            if v.ndim != 0 or not v.is_floating_point():
                raise TypeError(
                    f"{fn}: {entry} must be a real number or a 0-d floating tensor, "
                    f"got {describe(v)}"
                )
            return v
        if not is_real_number(v):
            raise TypeError(
                f"{fn}: {entry} must be a real number or a 0-d floating tensor, got {describe(v)}"
            )
        return check_number(fn, entry, v, low=low, low_inclusive=low_inclusive, finite=finite)

    if isinstance(value, Mapping):
        check_per_tensor(fn, name, value, keys)
        return {k: one(f"{name}[{k!r}]", value[k]) for k in keys}
    if not isinstance(value, Tensor) and not is_real_number(value):
        raise TypeError(
            f"{fn}: {name} must be a real number, a 0-d floating tensor or a dict of them with "
            f"the tree's keys, got {describe(value)}"
        )
    return one(name, value)


def check_device(fn: str, name: str, device: Any) -> torch.device | None:
    """``None``, a ``torch.device`` or a ``str`` naming one (``'cpu'``, ``'cuda:0'``)."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"{fn}: {name} must name a torch device (e.g. 'cpu', 'cuda:0'), got {device!r}"
            ) from err
    raise TypeError(f"{fn}: {name} must be None, a str or a torch.device, got {describe(device)}")


def check_dtype(fn: str, name: str, dtype: Any, *, floating: bool = True) -> torch.dtype:
    """A ``torch.dtype`` (floating-point unless ``floating=False``)."""
    if not isinstance(dtype, torch.dtype) or (floating and not dtype.is_floating_point):
        what = "a floating-point torch.dtype (e.g. torch.float32)" if floating else "a torch.dtype"
        raise TypeError(f"{fn}: {name} must be {what}, got {describe(dtype)}")
    return dtype


def check_group(fn: str, group: Any) -> Any:
    """``None`` or a ``torch.distributed.ProcessGroup``."""
    if group is None:
        return None
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"{fn}: group must be a torch.distributed ProcessGroup or None, got {describe(group)}"
        )
    return group


def apply_reduction(fn: str, per_sample: Tensor, reduction: str) -> Tensor:
    """Reduce a per-sample loss ``[B]``: ``"mean"`` → 0-d mean, ``"sum"`` → 0-d sum, ``"none"`` → ``[B]``.

    The one place where every loss applies its ``reduction`` argument (SPEC §0), and so the one
    home of the **empty-batch rule**: with ``B = 0`` samples, ``"none"`` gives an empty ``[0]``,
    ``"sum"`` gives 0 and ``"mean"`` gives 0 (not the 0/0 = NaN of ``Tensor.mean``), each with a
    zero, finite gradient -- so a rank or a filtered batch without samples contributes nothing.
    The batch size is shape metadata, so the rule costs no device sync and compiles.
    """
    check_reduction(fn, reduction)
    if reduction == "mean":
        return per_sample.sum() if per_sample.shape[0] == 0 else per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


# ---------------------------------------------------------------------------------------------
# Migration hints: moved names and keyword-only reference arguments (one mechanism for every
# package; it acts only on the error path, so a correct call costs one extra Python frame)
# ---------------------------------------------------------------------------------------------

MIGRATION = "see the migration table, docs/migration.md"
"""Where every message about a moved name or a changed call points."""

_IMPORT_FROM = dis.opmap["IMPORT_FROM"]


def _importing_from(frame: Any) -> bool:
    """Whether ``frame`` is executing ``from module import name`` (its current opcode)."""
    try:
        return bool(frame.f_code.co_code[frame.f_lasti] == _IMPORT_FROM)
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - exotic interpreters
        return False


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that says where a moved or removed public name went.

    ``moved`` maps each old name to what became of it (``"moved to robustft.merging.wise"``).
    ``module.<old>`` raises ``AttributeError`` and ``from module import <old>`` ``ImportError``,
    each with the new home and the migration page; any other missing name raises Python's usual
    ``AttributeError``. Only missing names reach a module ``__getattr__``, so the lookup of every
    existing name is untouched.

    >>> getattr_ = moved_names("pkg", {"old": "moved to pkg.new"})
    >>> getattr_("old")
    Traceback (most recent call last):
    ...
    AttributeError: module 'pkg' has no attribute 'old': it moved to pkg.new (see the migration table, docs/migration.md)
    """

    def module_getattr(name: str) -> Any:
        what = moved.get(name)
        if what is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}", name=name)
        if _importing_from(sys._getframe(1)):
            raise ImportError(
                f"cannot import name {name!r} from {module!r}: it {what} ({MIGRATION})",
                name=module,
            )
        raise AttributeError(
            f"module {module!r} has no attribute {name!r}: it {what} ({MIGRATION})", name=name
        )

    return module_getattr


def _call_hint(
    public: str,
    sig: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    renamed: Mapping[str, str],
) -> str | None:
    """What to write instead, for a call that does not bind to ``sig`` (``None``: no hint)."""
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    required = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    example = f"{public}({', '.join([*positional, *(f'{k}=...' for k in required)])})"
    old = [k for k in kwargs if k in renamed]
    if old:
        return f"{old[0]}= {renamed[old[0]]}"
    if len(args) > len(positional) and keyword:  # (with *args the call would have bound)
        return f"pass the rest by keyword: {example} (positional reference arguments were removed)"
    if any(k not in kwargs for k in required):
        return f"call {example}"
    return None


def keyword_hints(
    namespace: dict[str, Any],
    names: Iterable[str],
    *,
    renamed: Mapping[str, Mapping[str, str]] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Wrap public functions so that a call in an old form gets a ``TypeError`` that says the fix.

    For each function ``namespace[name]`` (a package ``__init__``'s ``globals()``), the wrapper
    calls the function as is; only if that raises ``TypeError`` *and* the arguments do not bind
    to its signature (a call-shape error, not one raised inside) is the error replaced by one
    naming the keyword to use and the migration page -- a positional reference argument
    (``l2sp(params, theta0)`` → ``anchor=``), a renamed keyword (``renamed[name]`` maps the old
    keyword to what to write instead), a missing keyword-only argument; any other call-shape
    error of a function with a ``notes[name]`` gets that note appended. A correct call costs one
    Python frame (~0.3 µs; ``torch.compile`` traces through it). The wrapper keeps the
    function's name, module, docstring and signature (``functools.wraps``) and replaces the
    function in its defining module too, so it pickles, documents and runs its doctest as the
    function did (once, in its own module).

    >>> def two(a, *, anchor):
    ...     return a - anchor
    >>> space = {"two": two}
    >>> keyword_hints(space, ["two"])
    >>> space["two"](3, 1)
    Traceback (most recent call last):
    ...
    TypeError: two() takes 1 positional argument but 2 were given; pass the rest by keyword: two(a, anchor=...) (positional reference arguments were removed) (see the migration table, docs/migration.md)
    >>> space["two"](3, anchor=1)
    2
    """
    for name in names:
        fn = namespace[name]
        wrapped = _hinted(fn, (renamed or {}).get(name, {}), (notes or {}).get(name, ""))
        namespace[name] = wrapped
        home = sys.modules.get(fn.__module__)
        if getattr(home, name, None) is fn:  # the defining module too: one object to pickle
            setattr(home, name, wrapped)


def _hinted(fn: Callable[..., Any], renamed: Mapping[str, str], note: str) -> Callable[..., Any]:
    sig = inspect.signature(fn)
    public = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TypeError as err:
            try:
                sig.bind(*args, **kwargs)
            except TypeError:
                hint = _call_hint(public, sig, args, kwargs, renamed) or note
                if hint:
                    raise TypeError(f"{err}; {hint} ({MIGRATION})") from None
            raise

    return wrapper


class DuplicateKeyError(Exception):
    """A JSON object with the same key twice (raised by :func:`unique_keys`); ``key`` names it."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: a repeated key would silently keep only its last value.

    >>> import json
    >>> json.loads('{"a": 1, "a": 2}', object_pairs_hook=unique_keys)
    Traceback (most recent call last):
    ...
    robustft._checks.DuplicateKeyError: a
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out
