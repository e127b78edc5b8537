"""Shared plumbing of robustft.clip: argument checks, eval mode, functional calls on a method.

Nothing here imports open_clip: models and tokenizers are used through the attributes open_clip
gives them (``encode_image``, ``encode_text``, ``token_embedding``, ``sot_token_id``, ...), so
``import robustft.clip`` stays cheap and the core never depends on open_clip at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustft._checks import check_int, describe
from robustft.tree import check_tree
from robustft.tree._structure import _fmt_keys

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


def check_model(fn: str, model: Any, *methods: str) -> nn.Module:
    """Check ``model`` is an ``nn.Module`` with the given methods (e.g. ``encode_text``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{fn}: model must be an open_clip model (a torch.nn.Module such as open_clip.CLIP), "
            f"got {describe(model)}"
        )
    missing = [m for m in methods if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"{fn}: model must have method(s) {', '.join(missing)} like open_clip's CLIP models, "
            f"got {type(model).__name__}"
        )
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag.

    Restoring per submodule (not ``model.train(flag)``) keeps a mixed state intact, e.g. UEO's
    visual tower in eval mode inside a model otherwise in training mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_params(fn: str, model: nn.Module, params: Any) -> Mapping[str, Tensor] | None:
    """Check a (possibly partial) tree of parameters and buffers of ``model``.

    Missing entries are taken from the module (``strict=False`` semantics of
    :func:`torch.func.functional_call`); a name that is neither a parameter nor a buffer of
    ``model`` is an error (a typo would otherwise be silently ignored).
    """
    if params is None:
        return None
    check_tree(params, fn=fn, name="params")
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    known.update(n for n, _ in model.named_buffers(remove_duplicate=False))
    unexpected = [k for k in params if k not in known]
    if unexpected:
        raise ValueError(
            f"{fn}: params must name parameters or buffers of the model (a partial tree is fine), "
            f"got unexpected keys {_fmt_keys(unexpected)}"
        )
    return params


class _Method(nn.Module):
    """Wrap ``model.<method>`` as a ``forward`` so :func:`torch.func.functional_call` can run it."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = model
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self.method)(*args, **kwargs)


def call_method(
    model: nn.Module,
    method: str,
    params: Mapping[str, Tensor] | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``model.<method>(*args, **kwargs)`` with ``params`` (partial tree) swapped in, if given."""
    if params is None:
        return getattr(model, method)(*args, **kwargs)
    wrapper = _Method(model, method)
    tree = {"inner." + k: v for k, v in params.items()}
    return torch.func.functional_call(wrapper, tree, args, kwargs, strict=False)


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
            if "{}" not in t:
                raise ValueError(
                    f"{fn}: templates given as str must contain '{{}}' for the class name, "
                    f"got {t!r}"
                )
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
