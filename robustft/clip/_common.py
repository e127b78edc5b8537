"""Shared plumbing of robustft.clip: argument checks, eval mode, functional calls on a method.

Nothing here imports open_clip: models and tokenizers are used through the attributes open_clip
gives them (``encode_image``, ``encode_text``, ``token_embedding``, ``sot_token_id``, ...), so
``import robustft.clip`` stays cheap and the core never depends on open_clip at import time.
"""

from __future__ import annotations

import gc
import string
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.weak import WeakIdKeyDictionary

from robustft._checks import check_int, describe, fmt_keys, is_dtensor, is_functorch_wrapped
from robustft._modules import eval_mode
from robustft.distributed import is_replicated
from robustft.tree import check_tree

__all__ = [
    "STANDARD_CONTEXT_LENGTH",
    "STANDARD_EOT",
    "STANDARD_SOT",
    "STANDARD_VOCAB_SIZE",
    "Template",
    "Tokenizer",
    "call_method",
    "check_batch_size",
    "check_classnames",
    "check_data_parallel",
    "check_model",
    "check_params",
    "check_templates",
    "eval_mode",
    "model_device",
    "special_ids",
]

# open_clip's standard BPE vocabulary (``open_clip.tokenizer.SimpleTokenizer``): 49,152 merges +
# 256 bytes, with <start_of_text> and <end_of_text> as the last two ids.
STANDARD_VOCAB_SIZE = 49408
STANDARD_SOT = 49406
STANDARD_EOT = 49407
STANDARD_CONTEXT_LENGTH = 77

Tokenizer = Callable[..., Tensor]
"""An open_clip tokenizer: ``tokenizer(list_of_str) -> LongTensor [n, context_length]``."""

Template = str | Callable[[str], str]
"""A prompt template: a format string with one ``{}`` or a callable of the class name."""

_DATA_PARALLEL_HELP = (
    "a functional call on a DistributedDataParallel's .module computes gradients that DDP never "
    "synchronises (its hooks run only through DDP's own forward); pass the DDP wrapper itself as "
    "model (robustft.clip then runs the method through DDP's forward), or train a parameter tree "
    "passed as params= and replicate it with robustft.distributed.replicate(params)"
)


def _fsdp_types() -> tuple[type, ...]:
    """FSDP1 and FSDP2 module types, if ``torch.distributed.fsdp`` was imported (else none can exist)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return ()
    return tuple(
        t
        for t in (
            getattr(fsdp, "FullyShardedDataParallel", None),
            getattr(fsdp, "FSDPModule", None),
        )
        if isinstance(t, type)
    )


def check_model(fn: str, model: Any, *methods: str, wrapper_ok: bool = False) -> nn.Module:
    """Check ``model`` is an ``nn.Module`` with the given methods (e.g. ``encode_text``).

    A ``DistributedDataParallel`` is accepted where ``wrapper_ok`` (the caller routes or unwraps
    it); FSDP-managed modules are rejected (their parameters are sharded between forwards).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{fn}: model must be an open_clip model (a torch.nn.Module such as open_clip.CLIP), "
            f"got {describe(model)}"
        )
    fsdp = _fsdp_types()
    if fsdp and isinstance(model, fsdp):
        raise TypeError(
            f"{fn}: model must be an unsharded module, got an FSDP-managed {type(model).__name__}; "
            f"FSDP shards the parameters between forwards, so encode_image/encode_text cannot be "
            f"called on it directly: run the trained tower through the FSDP module's own forward"
        )
    if isinstance(model, DistributedDataParallel):
        if not wrapper_ok:
            raise TypeError(f"{fn}: model must be a plain module here, got DistributedDataParallel")
        inner = model.module
    else:
        inner = model
    missing = [m for m in methods if not callable(getattr(inner, m, None))]
    if missing:
        raise TypeError(
            f"{fn}: model must have method(s) {', '.join(missing)} like open_clip's CLIP models, "
            f"got {type(inner).__name__}"
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps (the module itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    for p in unwrap(model).parameters():
        return p.device
    return torch.device("cpu")


# Parameter and buffer names per model, computed once per structure (issue 13: rebuilding the
# full name set cost 0.67 ms per call on a ViT-B-16). A name missing from the cached set triggers a
# refresh, so modules added after the first call are seen.
_NAMES: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def _names(model: nn.Module) -> frozenset[str]:
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names.update(n for n, _ in model.named_buffers(remove_duplicate=False))
    return frozenset(names)


def known_names(model: nn.Module, *, refresh: bool = False) -> frozenset[str]:
    """Every parameter and buffer name of ``model`` (tied duplicates included), cached per model.

    Under ``torch.compile`` tracing the set is computed without touching the cache: a cache write
    during tracing would invalidate the graph's guards and recompile on the next step.
    """
    if torch.compiler.is_compiling():
        return _names(model)
    names = None if refresh else _NAMES.get(model)
    if names is None:
        names = _NAMES[model] = _names(model)
    return names


def check_params(fn: str, model: nn.Module, params: Any) -> Mapping[str, Tensor] | None:
    """Check a (possibly partial) tree of parameters and buffers of ``model``.

    Missing entries are taken from the module (``strict=False`` semantics of
    :func:`torch.func.functional_call`); a name that is neither a parameter nor a buffer of
    ``model`` is an error (a typo would otherwise be silently ignored).
    """
    if params is None:
        return None
    check_tree(params, fn=fn, name="params")
    inner = unwrap(model)
    known = known_names(inner)
    unexpected = [k for k in params if k not in known]
    if unexpected:
        known = known_names(inner, refresh=True)
        unexpected = [k for k in params if k not in known]
    if unexpected:
        raise ValueError(
            f"{fn}: params must name parameters or buffers of the model (a partial tree is fine), "
            f"got unexpected keys {fmt_keys(unexpected)}"
        )
    return params


# Whether a live DistributedDataParallel wraps the module (checked once per module, and only in
# an initialised multi-process run; a heap scan, since DDP leaves no mark on the module it wraps).
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _wrapped_by_ddp(model: nn.Module) -> bool:
    found = _WRAPPED.get(model)
    if found is None:
        found = any(
            issubclass(type(o), DistributedDataParallel) and o.module is model
            for o in gc.get_objects()
        )
        _WRAPPED[model] = found
    return found


def _owned_on_stack(model: nn.Module) -> set[int]:
    """Ids of the parameters that a data-parallel engine synchronises in this forward.

    The parameters of ``model`` if it is a ``DistributedDataParallel``, and of every DDP or FSDP
    module whose method is running further up the call stack (a functional forward called from
    inside the wrapped module's own ``forward``, as the recipes' UEO model does). Walks the
    stack once; only reached for tensors not seen before, so not once per step.
    """
    types = (DistributedDataParallel, *_fsdp_types())
    wrappers: list[Any] = [model] if isinstance(model, DistributedDataParallel) else []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            obj = frame.f_locals.get("self")
            if isinstance(obj, types) and not any(obj is w for w in wrappers):
                wrappers.append(obj)
        frame = frame.f_back  # type: ignore[assignment]
    return {id(p) for w in wrappers for p in w.parameters()}


# Trainable leaf tensors already looked at under a process group: synchronised by the DDP/FSDP
# module that ran them, or carrying the refusal hook (identity-keyed: a tensor's == is elementwise)
_SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _refusal(fn: str, label: str, tensor: Tensor, world: int) -> Callable[[Tensor], None]:
    ref = weakref.ref(tensor)

    def hook(grad: Tensor) -> None:
        t = ref()
        if t is not None and is_replicated(t):  # replicated after the forward: fine
            return
        raise ValueError(
            f"{fn}: {label} requires grad under a {world}-rank process group, but nothing "
            f"averages its gradient over the ranks (no DistributedDataParallel/FSDP module running "
            f"this forward owns it), so the ranks would drift apart; call "
            f"robustft.distributed.replicate(params) once before training (or make it a parameter "
            f"of the module DDP wraps)"
        )

    return hook


def check_data_parallel(
    fn: str,
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    *,
    extra: Mapping[str, Tensor] | None = None,
) -> None:
    """Refuse gradients that no data-parallel engine would synchronise.

    Only with autograd on, outside compiled code, under an initialised process group -- on one
    process this is two cheap checks:

    - a gradient-carrying call on the ``.module`` of a live ``DistributedDataParallel`` whose own
      parameters would be trained raises at once (``ValueError``);
    - with more than one rank, every trainable leaf tensor the forward reaches -- of ``params``,
      of ``extra`` (a CoOp context) or the module's own -- that neither
      :func:`robustft.distributed.replicate` nor a DDP/FSDP module running this forward
      synchronises gets a gradient hook that raises on the first backward pass (so a forward
      with autograd on but no backward, e.g. evaluation, is not refused). Each tensor is looked
      at once.
    """
    if (
        torch.compiler.is_compiling()
        or not torch.is_grad_enabled()
        or not (dist.is_available() and dist.is_initialized())
    ):
        return
    given = params or {}
    inner = unwrap(model)
    if not isinstance(model, DistributedDataParallel):
        trained_own = any(p.requires_grad and n not in given for n, p in inner.named_parameters())
        if trained_own and _wrapped_by_ddp(model):
            raise ValueError(
                f"{fn}: model must not be the .module of a DistributedDataParallel when its own "
                f"parameters are trained, got {type(model).__name__} wrapped by a live DDP; "
                + _DATA_PARALLEL_HELP
            )
    world = dist.get_world_size()
    if world <= 1:
        return
    candidates: list[tuple[str, Tensor]] = []

    def consider(label: str, t: Tensor) -> None:
        if (
            t.requires_grad
            and t.is_leaf
            and t not in _SEEN
            and not is_replicated(t)
            and not is_dtensor(t)
            and not is_functorch_wrapped(t)
        ):
            candidates.append((label, t))

    for key, t in given.items():
        consider(f"params[{key!r}]", t)
    for key, t in (extra or {}).items():
        consider(key, t)
    for name, p in inner.named_parameters():
        if name not in given:
            consider(f"model parameter {name!r}", p)
    if not candidates:
        return
    owned = _owned_on_stack(model)
    for label, t in candidates:
        _SEEN[t] = True
        if id(t) not in owned:
            t.register_hook(_refusal(fn, label, t, world))


def _swap_call(
    model: nn.Module,
    method: str,
    params: Mapping[str, Tensor] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    if params is None:
        return getattr(model, method)(*args, **kwargs)
    # what torch.func.functional_call does around module.forward, around any method instead: no
    # wrapper module is built per call, so dynamo traces it in one graph without recompiles
    with _reparametrize_module(model, dict(params), tie_weights=True, strict=False):
        return getattr(model, method)(*args, **kwargs)


def call_method(
    model: nn.Module,
    method: str,
    params: Mapping[str, Tensor] | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``model.<method>(*args, **kwargs)`` with ``params`` (partial tree) swapped in, if given.

    A ``DistributedDataParallel`` runs the method through its own forward (its gradient hooks and
    buffer broadcast included): the wrapped module's ``forward`` is the method for that one call.
    """
    if not isinstance(model, DistributedDataParallel):
        return _swap_call(model, method, params, args, kwargs)
    inner = model.module

    def forward(*a: Any, **k: Any) -> Any:
        return _swap_call(inner, method, params, a, k)

    inner.forward = forward  # an instance attribute shadows the class's forward for this call
    try:
        return model(*args, **kwargs)
    finally:
        del inner.forward


def special_ids(fn: str, tokenizer: Any) -> tuple[int, int]:
    """``(sot, eot)`` of a CLIP-layout tokenizer (``[SOT] tokens [EOT] 0 ...``)."""
    sot = getattr(tokenizer, "sot_token_id", None)
    eot = getattr(tokenizer, "eot_token_id", None)
    if not callable(tokenizer) or not isinstance(sot, int) or not isinstance(eot, int):
        raise TypeError(
            f"{fn}: tokenizer must be a CLIP BPE tokenizer with int sot_token_id and eot_token_id "
            f"(e.g. open_clip.get_tokenizer('ViT-B-32')), got {type(tokenizer).__name__}"
        )
    return sot, eot


def check_classnames(fn: str, classnames: Any) -> list[str]:
    """A non-empty sequence of str (a bare str is rejected: it is a sequence of characters)."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(
            f"{fn}: classnames must be a sequence of str (e.g. open_clip.IMAGENET_CLASSNAMES), "
            f"got {describe(classnames)}"
        )
    if len(classnames) == 0:
        raise ValueError(f"{fn}: classnames must hold at least one class name, got []")
    bad = [c for c in classnames if not isinstance(c, str)]
    if bad:
        raise TypeError(f"{fn}: classnames must contain only str, got {describe(bad[0])}")
    return list(classnames)


def _check_format_template(fn: str, template: str) -> None:
    """A str template has exactly one replacement field, the automatic ``{}``.

    ``{{`` and ``}}`` are literal braces; ``{0}``, ``{name}``, ``{}`` twice or unbalanced braces
    would raise ``IndexError``/``KeyError``/``ValueError`` inside ``str.format`` (or silently
    repeat the name), so they are rejected here with the template in the message.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(
            f"{fn}: templates given as str must be valid format strings with one '{{}}' for the "
            f"class name ({err}), got {template!r}"
        ) from None
    if fields != [""]:
        raise ValueError(
            f"{fn}: templates given as str must contain exactly one '{{}}' for the class name and "
            f"no other format field (write literal braces as '{{{{' and '}}}}'), got {template!r}"
        )


def check_templates(fn: str, templates: Any) -> list[Callable[[str], str]]:
    """Templates as callables: format strings with one ``{}`` or callables of the class name."""
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise TypeError(
            f"{fn}: templates must be a sequence of format strings or callables (e.g. "
            f"open_clip.OPENAI_IMAGENET_TEMPLATES), got {describe(templates)}"
        )
    if len(templates) == 0:
        raise ValueError(f"{fn}: templates must hold at least one template, got []")
    out: list[Callable[[str], str]] = []
    for t in templates:
        if isinstance(t, str):
            _check_format_template(fn, t)
            out.append(t.format)
        elif callable(t):
            out.append(t)
        else:
            raise TypeError(
                f"{fn}: templates must contain format strings or callables, got {describe(t)}"
            )
    return out


def check_batch_size(fn: str, batch_size: Any) -> int:
    """A positive int."""
    return check_int(fn, "batch_size", batch_size, low=1)
