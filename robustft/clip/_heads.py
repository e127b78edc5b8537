"""Zero-shot classification heads and CAR-FT context prototypes from prompt templates."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft._numerics import compute_dtype
from robustft.clip._common import (
    Template,
    Tokenizer,
    call_method,
    check_batch_size,
    check_classnames,
    check_model,
    check_params,
    check_templates,
    eval_mode,
    model_device,
    unwrap,
)
from robustft.typing import Params

__all__ = ["context_prototypes", "zero_shot_head"]


def encode_texts(
    model: nn.Module,
    tree: Params | None,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int,
) -> Iterator[tuple[range, Tensor]]:
    """``(positions, L2-normalised features)`` of ``texts``, ``batch_size`` at a time, in order.

    Under :func:`torch.no_grad` and in eval mode (each submodule's flag restored after), with
    ``tree`` swapped in; features in :func:`compute_dtype` of the model's output (at least
    float32). Only one batch of activations is alive at once. ``model`` is unwrapped and the
    arguments checked by the caller.
    """
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(texts), batch_size):
            idx = range(start, min(start + batch_size, len(texts)))
            tokens = tokenizer([texts[i] for i in idx]).to(device)
            feats = call_method(model, "encode_text", tree, tokens)
            yield idx, F.normalize(feats.to(compute_dtype(feats.dtype)), dim=-1)


def _grouped_text_means(
    fn: str,
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    by_class: bool,
    batch_size: int,
    params: Params | None,
) -> Tensor:
    """Renormalised mean of the normalised embeddings of every (class, template) text, per group.

    Texts are streamed in class-major order, ``batch_size`` at a time, so only one batch of
    activations and a ``[groups, dim]`` accumulator are alive at once.
    """
    check_model(fn, model, "encode_text", wrapper_ok=True)
    model = unwrap(model)  # no gradient, so nothing for DDP to synchronise
    names = check_classnames(fn, classnames)
    fills: list[Callable[[str], str]] = check_templates(fn, templates)
    check_batch_size(fn, batch_size)
    if not callable(tokenizer):
        raise TypeError(f"{fn}: tokenizer must be callable on a list of str, got {tokenizer!r}")
    tree = check_params(fn, model, params)
    n_cls, n_tpl = len(names), len(fills)
    texts = [fills[i % n_tpl](names[i // n_tpl]) for i in range(n_cls * n_tpl)]
    sums: Tensor | None = None
    for idx, feats in encode_texts(model, tree, tokenizer, texts, batch_size):
        if sums is None:
            sums = feats.new_zeros(n_cls if by_class else n_tpl, feats.shape[-1])
        group = torch.tensor(
            [i // n_tpl if by_class else i % n_tpl for i in idx], device=feats.device
        )
        sums.index_add_(0, group, feats)
    assert sums is not None  # total >= 1 was checked above
    return F.normalize(sums / (n_tpl if by_class else n_cls), dim=-1)


def zero_shot_head(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    batch_size: int = 256,
    params: Params | None = None,
) -> Tensor:
    r"""Zero-shot classifier weights: the prompt-ensemble text embedding of every class.

    With :math:`g_{c,m}` the text feature of template :math:`m` filled with class :math:`c`
    (:math:`M` templates),

    .. math::

        W_c = \frac{\bar g_c}{\lVert \bar g_c \rVert_2}, \qquad
        \bar g_c = \frac{1}{M} \sum_{m=1}^{M} \frac{g_{c,m}}{\lVert g_{c,m} \rVert_2},

    and zero-shot logits are :math:`s\,\hat f\,W^\top`. This is open_clip's
    ``build_zero_shot_classifier`` (which returns :math:`W^\top`), the head that CLIPood, Lipsum-FT,
    FT and WiSE-FT start from. Templates are open_clip's own lists
    (``open_clip.OPENAI_IMAGENET_TEMPLATES``, ``SIMPLE_IMAGENET_TEMPLATES``, callables) or any
    list of format strings such as ``"a photo of a {}."``. The ``C·M`` texts are encoded
    ``batch_size`` at a time (1000 classes × 80 templates never hold all activations at once),
    under :func:`torch.no_grad`, with the model in eval mode (each submodule's ``training`` flag is
    restored afterwards). Averages accumulate in float32 (float64 for a float64 model).

    Args:
        model: an open_clip model or any module with ``encode_text``; tokens are moved to the
            device of its first parameter.
        tokenizer: the model's tokenizer, ``tokenizer(list_of_str) -> [n, context_length]``.
        classnames: the :math:`C` class names, e.g. ``open_clip.IMAGENET_CLASSNAMES``.
        templates: the :math:`M` templates: format strings with exactly one ``{}`` (literal
            braces as ``{{``/``}}``) or callables.
        batch_size: texts per text-tower forward.
        params: optional (partial) tree of parameters to encode with instead of the module's own.

    Returns:
        ``[classes, dim]`` L2-normalised class embeddings, float32 (float64 for a float64 model).

    Raises:
        TypeError: on a model without ``encode_text``, a non-callable tokenizer, class names or
            templates of the wrong type.
        ValueError: on empty class names or templates, a str template without exactly one
            ``{}`` (two fields, ``{0}``, ``{name}`` or unbalanced braces), a non-positive
            ``batch_size`` or unknown ``params`` keys.

    Example:
        >>> class Toy(torch.nn.Module):  # "text feature" = (#characters, 1)
        ...     def encode_text(self, tokens):
        ...         return torch.cat([tokens, torch.ones_like(tokens)], 1).float()
        >>> count = lambda texts: torch.tensor([[len(t)] for t in texts])
        >>> zero_shot_head(Toy(), count, ["a"], ["{}", "{}.."])  # mean of (1,1)/√2 and (3,1)/√10
        tensor([[0.8507, 0.5257]])

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
        ICML 2021. Code: https://github.com/mlfoundations/open_clip (``zero_shot_classifier.py``);
        Nam et al., Lipsum-FT, ICLR 2024, https://github.com/cs-giung/lipsum-ft
    """
    return _grouped_text_means(
        "zero_shot_head",
        model,
        tokenizer,
        classnames,
        templates,
        by_class=True,
        batch_size=batch_size,
        params=params,
    )


def context_prototypes(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    batch_size: int = 256,
    params: Params | None = None,
) -> Tensor:
    r"""CAR-FT context prototypes: one embedding per template, averaged over the classes.

    With :math:`g_{c,m}` the text feature of template :math:`m` filled with class :math:`c`
    (:math:`C` classes),

    .. math::

        w_m = \frac{\bar g_m}{\lVert \bar g_m \rVert_2}, \qquad
        \bar g_m = \frac{1}{C} \sum_{c=1}^{C} \frac{g_{c,m}}{\lVert g_{c,m} \rVert_2}.

    CAR-FT's context distribution is then :math:`p_{ctx}(x) = \mathrm{softmax}(s\,\hat f\,W_{ctx}^\top)`
    (SPEC §5). Encoding is batched, gradient-free and in eval mode exactly as in
    :func:`zero_shot_head`.

    Args:
        model: an open_clip model or any module with ``encode_text``.
        tokenizer: the model's tokenizer.
        classnames: the :math:`C` class names.
        templates: the :math:`M` templates: format strings with one ``{}`` or callables
            (the 80 ``open_clip.OPENAI_IMAGENET_TEMPLATES`` in CAR-FT).
        batch_size: texts per text-tower forward.
        params: optional (partial) tree of parameters to encode with instead of the module's own.

    Returns:
        ``[templates, dim]`` L2-normalised context prototypes, float32 (float64 for a float64
        model).

    Raises:
        TypeError: as :func:`zero_shot_head`.
        ValueError: as :func:`zero_shot_head`.

    Example:
        >>> class Toy(torch.nn.Module):  # "text feature" = (#characters, 1)
        ...     def encode_text(self, tokens):
        ...         return torch.cat([tokens, torch.ones_like(tokens)], 1).float()
        >>> count = lambda texts: torch.tensor([[len(t)] for t in texts])
        >>> context_prototypes(Toy(), count, ["a", "abc"], ["{}"])  # (1,1)/√2 and (3,1)/√10
        tensor([[0.8507, 0.5257]])

    References:
        Mao et al., "Context-Aware Robust Fine-Tuning", IJCV 2023 (CAR-FT);
        prompts and tokenizer: https://github.com/mlfoundations/open_clip
    """
    return _grouped_text_means(
        "context_prototypes",
        model,
        tokenizer,
        classnames,
        templates,
        by_class=False,
        batch_size=batch_size,
        params=params,
    )
