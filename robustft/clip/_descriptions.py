"""Class-description banks (CuPL, DRM): read, validate and encode ``{class: [description, ...]}``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft._checks import DuplicateKeyError, check_choice, describe, fmt_keys, unique_keys
from robustft.clip._common import (
    Tokenizer,
    check_batch_size,
    check_classnames,
    check_model,
    check_params,
    unwrap,
)
from robustft.clip._heads import encode_texts
from robustft.typing import Params

__all__ = ["DescriptionBank", "description_bank", "description_head", "load_descriptions"]

Descriptions = Mapping[str, "str | Sequence[str]"]
"""Per class name, one description (a str) or a list of them."""

_MATCH = ("name", "index", "order")


class DescriptionBank(NamedTuple):
    """Every description's text feature, per class, padded to the longest class.

    Attributes:
        features: ``[classes, max_descriptions, dim]`` L2-normalised text features; padding rows
            are 0.
        mask: ``[classes, max_descriptions]`` bool, ``True`` where a description is (each class's
            ``True`` entries come first, in the order of its list).
    """

    features: Tensor
    mask: Tensor


def _entries(fn: str, where: str, cls: str, value: Any) -> tuple[str, ...]:
    """One class's descriptions as a tuple of non-blank str (a bare str is one description)."""
    items: Sequence[Any]
    if isinstance(value, str):
        items = (value,)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise TypeError(
            f"{fn}: {where}descriptions of class {cls!r} must be a str or a list of str, got "
            f"{describe(value)}"
        )
    if len(items) == 0:
        raise ValueError(
            f"{fn}: {where}descriptions of class {cls!r} must hold at least one description, got []"
        )
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(
                f"{fn}: {where}descriptions of class {cls!r} must contain only str, got "
                f"{describe(item)} at position {i}"
            )
        if not item.strip():
            raise ValueError(
                f"{fn}: {where}descriptions of class {cls!r} must be non-blank, got {item!r} at "
                f"position {i}"
            )
    return tuple(items)


def _by_name(
    fn: str, where: str, descriptions: Mapping[Any, Any], names: list[str]
) -> dict[str, tuple[str, ...]]:
    """Validate a mapping keyed by class name; the result follows ``names`` (extra keys ignored)."""
    missing = sorted({c for c in names if c not in descriptions})
    if missing:
        unexpected = [str(k) for k in descriptions if k not in set(names)]
        extra = f", unexpected keys {fmt_keys(unexpected)}" if unexpected else ""
        raise ValueError(
            f"{fn}: {where}descriptions must have a key for every class name; missing classes "
            f"{fmt_keys(missing)}{extra}"
        )
    return {c: _entries(fn, where, c, descriptions[c]) for c in names}


def _check_descriptions(
    fn: str, descriptions: Any, classnames: Any
) -> tuple[list[str], list[tuple[str, ...]]]:
    """Class names and, in their order, each class's validated descriptions."""
    names = check_classnames(fn, classnames)
    if not isinstance(descriptions, Mapping):
        raise TypeError(
            f"{fn}: descriptions must be a mapping {{class name: [description, ...]}} (e.g. from "
            f"load_descriptions), got {describe(descriptions)}"
        )
    table = _by_name(fn, "", descriptions, names)
    return names, [table[c] for c in names]


def load_descriptions(
    path: str | os.PathLike[str],
    classnames: Sequence[str],
    *,
    match: Literal["name", "index", "order"] = "name",
) -> dict[str, tuple[str, ...]]:
    r"""Read a class-description file (CuPL / DRM layout) and check it against the class names.

    The file is a JSON object mapping each class to its descriptions: a list of strings (CuPL,
    DRM's ``prompts/fmow_cd.json``) or a single string (DRM's ``imagenet_cd.json`` and
    ``iwildcam_cd.json``, one description per class). Descriptions are used verbatim as text
    prompts, without a template, as CuPL and DRM encode them. ``match`` says how keys name
    classes:

    - ``"name"``: the keys are the class names (extra keys are ignored, so one file serves a
      subset of its classes);
    - ``"index"``: the keys are ``"0"`` … ``"C-1"``, class positions (DRM's
      ``prompts/iwildcam_cd.json``);
    - ``"order"``: the :math:`i`-th key belongs to the :math:`i`-th class whatever it says, which is
      how DRM's own code reads every file (``cd_data[list(cd_data)[i]]``) — needed for its
      ``result_cd_iwildcam.json``, keyed by Latin species names while the dataset's class names
      are English; the file must hold exactly one entry per class.

    Args:
        path: the JSON file (UTF-8).
        classnames: the :math:`C` class names, in label order.
        match: ``"name"`` (default), ``"index"`` or ``"order"``.

    Returns:
        ``{class name: (description, ...)}`` for every class, in the order of ``classnames``; a
        single-string entry becomes a 1-tuple.

    Raises:
        TypeError: on class names that are not a sequence of str, a ``path`` that is not a str or
            path, or a class entry that is not a str or a list of str.
        ValueError: on an unknown ``match``, invalid JSON, a top level that is not an object, a
            repeated key, a missing class, a wrong set or number of keys for ``"index"`` /
            ``"order"``, an empty list or a blank description. Messages name the file and the
            class.
        OSError: if the file cannot be read.

    Example:
        >>> import json, pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "cd.json"
        >>> _ = p.write_text(json.dumps({"cat": ["whiskers", "a tail"], "dog": "a wet nose"}))
        >>> load_descriptions(p, ["dog", "cat"])
        {'dog': ('a wet nose',), 'cat': ('whiskers', 'a tail')}

    References:
        Pratt et al., "What does a platypus look like? Generating customized prompts for
        zero-shot image classification" (CuPL), ICCV 2023, https://github.com/sarahpratt/CuPL;
        Li et al., "Dual Risk Minimization: Towards Next-Level Robustness in Fine-tuning
        Zero-Shot Models", NeurIPS 2024, https://github.com/vaynexie/DRM
        (``concept_description/``, ``prompts/``, ``src/models/zeroshot.py``).
    """
    fn = "load_descriptions"
    names = check_classnames(fn, classnames)
    check_choice(fn, "match", match, _MATCH)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {describe(path)}")
    where = f"{os.fspath(path)}: "
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKeyError as err:
        raise ValueError(
            f"{fn}: {where}keys must be unique, got {err.key!r} more than once"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{fn}: {where}must be valid JSON, got {err.msg} at line {err.lineno} column "
            f"{err.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{fn}: {where}must hold a JSON object {{class: [description, ...]}}, got "
            f"{type(data).__name__}"
        )
    if match == "name":
        return _by_name(fn, where, data, names)
    if match == "index":
        expected = [str(i) for i in range(len(names))]
        if set(data) != set(expected):
            raise ValueError(
                f"{fn}: {where}keys must be the class positions '0' ... '{len(names) - 1}' with "
                f'match="index"; missing {fmt_keys(set(expected) - set(data))}, unexpected '
                f"{fmt_keys(set(data) - set(expected))}"
            )
        return {c: _entries(fn, where, c, data[str(i)]) for i, c in enumerate(names)}
    if len(data) != len(names):
        raise ValueError(
            f'{fn}: {where}must hold one entry per class with match="order", got {len(data)} '
            f"entries for {len(names)} classes"
        )
    return {c: _entries(fn, where, c, v) for c, v in zip(names, data.values(), strict=True)}


def _encode(
    fn: str,
    model: Any,
    tokenizer: Any,
    descriptions: Any,
    classnames: Any,
    batch_size: Any,
    params: Any,
) -> tuple[list[int], Iterator[tuple[Tensor, Tensor, Tensor]]]:
    """Validate, then stream ``(class ids, description ids, normalised features)`` per batch.

    Texts run in class-major order, ``batch_size`` at a time, under ``no_grad`` and in eval mode;
    features are in :func:`compute_dtype` of the model's output (at least float32).
    """
    check_model(fn, model, "encode_text", wrapper_ok=True)
    inner = unwrap(model)  # no gradient, so nothing for DDP to synchronise
    _, table = _check_descriptions(fn, descriptions, classnames)
    check_batch_size(fn, batch_size)
    if not callable(tokenizer):
        raise TypeError(f"{fn}: tokenizer must be callable on a list of str, got {tokenizer!r}")
    tree = check_params(fn, inner, params)
    flat = [(c, k, text) for c, texts in enumerate(table) for k, text in enumerate(texts)]

    def stream() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        texts = [text for _, _, text in flat]
        for idx, feats in encode_texts(inner, tree, tokenizer, texts, batch_size):
            cls = torch.tensor([flat[i][0] for i in idx], device=feats.device)
            pos = torch.tensor([flat[i][1] for i in idx], device=feats.device)
            yield cls, pos, feats

    return [len(texts) for texts in table], stream()


def description_head(
    model: nn.Module,
    tokenizer: Tokenizer,
    descriptions: Descriptions,
    classnames: Sequence[str],
    *,
    batch_size: int = 256,
    params: Params | None = None,
) -> Tensor:
    r"""Classifier weights from class descriptions: each class's description ensemble.

    With :math:`g_{c,k}` the text feature of the :math:`k`-th of the :math:`K_c` descriptions of
    class :math:`c`,

    .. math::

        W_c = \frac{\bar g_c}{\lVert \bar g_c \rVert_2}, \qquad
        \bar g_c = \frac{1}{K_c} \sum_{k=1}^{K_c} \frac{g_{c,k}}{\lVert g_{c,k} \rVert_2},

    the average :func:`zero_shot_head` takes over templates, here over a class's own
    descriptions (their number may differ between classes); logits are :math:`s\,\hat f\,W^\top`.
    This is CuPL's classifier and DRM's concept-description head (``get_zeroshot_classifier``,
    whose head also multiplies by :math:`s` and normalises the image features). Descriptions are
    encoded verbatim (no template), ``batch_size`` texts at a time, under :func:`torch.no_grad`,
    with the model in eval mode (each submodule's ``training`` flag is restored afterwards);
    averages accumulate in float32 (float64 for a float64 model).

    Args:
        model: an open_clip model or any module with ``encode_text``; tokens are moved to the
            device of its first parameter.
        tokenizer: the model's tokenizer, ``tokenizer(list_of_str) -> [n, context_length]``.
        descriptions: ``{class name: [description, ...]}`` (a single str counts as one
            description), e.g. from :func:`load_descriptions`; keys beyond ``classnames`` are
            ignored.
        classnames: the :math:`C` class names, in label order.
        batch_size: texts per text-tower forward.
        params: optional (partial) tree of parameters to encode with instead of the module's own.

    Returns:
        ``[classes, dim]`` L2-normalised class embeddings, float32 (float64 for a float64 model).

    Raises:
        TypeError: on a model without ``encode_text``, a non-callable tokenizer, class names that
            are not a sequence of str, ``descriptions`` that is not a mapping, or a class entry
            that is not a str or list of str.
        ValueError: on empty class names, a class without a key, an empty list or blank
            description, a non-positive ``batch_size`` or unknown ``params`` keys.

    Example:
        >>> class Toy(torch.nn.Module):  # "text feature" = (#characters, 1)
        ...     def encode_text(self, tokens):
        ...         return torch.cat([tokens, torch.ones_like(tokens)], 1).float()
        >>> count = lambda texts: torch.tensor([[len(t)] for t in texts])
        >>> description_head(Toy(), count, {"a": ["x", "xyz"]}, ["a"])  # (1,1)/√2 and (3,1)/√10
        tensor([[0.8507, 0.5257]])

    References:
        Pratt et al., CuPL, ICCV 2023, https://github.com/sarahpratt/CuPL;
        Li et al., "Dual Risk Minimization", NeurIPS 2024, https://github.com/vaynexie/DRM
        (``src/models/zeroshot.py``).
    """
    counts, batches = _encode(
        "description_head", model, tokenizer, descriptions, classnames, batch_size, params
    )
    sums: Tensor | None = None
    for cls, _, feats in batches:
        if sums is None:
            sums = feats.new_zeros(len(counts), feats.shape[-1])
        sums.index_add_(0, cls, feats)
    assert sums is not None  # every class holds at least one description
    n = torch.tensor(counts, dtype=sums.dtype, device=sums.device)
    return F.normalize(sums / n[:, None], dim=-1)


def description_bank(
    model: nn.Module,
    tokenizer: Tokenizer,
    descriptions: Descriptions,
    classnames: Sequence[str],
    *,
    batch_size: int = 256,
    params: Params | None = None,
) -> DescriptionBank:
    r"""Every description's normalised text feature, per class, padded, with a mask.

    .. math::

        B_{c,k} = \frac{g_{c,k}}{\lVert g_{c,k} \rVert_2} \;(k \le K_c), \qquad
        B_{c,k} = 0,\; M_{c,k} = \text{False} \;(K_c < k \le K_{\max})

    for losses and scores that need each description rather than the class average
    (:func:`description_head` is the renormalised masked mean of this bank over :math:`k`).
    Encoding is batched, gradient-free and in eval mode exactly as in :func:`description_head`.

    Args:
        model: an open_clip model or any module with ``encode_text``.
        tokenizer: the model's tokenizer.
        descriptions: ``{class name: [description, ...]}`` (a single str counts as one).
        classnames: the :math:`C` class names, in label order.
        batch_size: texts per text-tower forward.
        params: optional (partial) tree of parameters to encode with instead of the module's own.

    Returns:
        :class:`DescriptionBank` ``(features [classes, max_descriptions, dim], mask [classes,
        max_descriptions])``, features float32 (float64 for a float64 model).

    Raises:
        TypeError: as :func:`description_head`.
        ValueError: as :func:`description_head`.

    Example:
        >>> class Toy(torch.nn.Module):  # "text feature" = (#characters, 1)
        ...     def encode_text(self, tokens):
        ...         return torch.cat([tokens, torch.ones_like(tokens)], 1).float()
        >>> count = lambda texts: torch.tensor([[len(t)] for t in texts])
        >>> bank = description_bank(Toy(), count, {"a": ["x", "xyz"], "b": "y"}, ["a", "b"])
        >>> bank.mask
        tensor([[ True,  True],
                [ True, False]])
        >>> bank.features[1]
        tensor([[0.7071, 0.7071],
                [0.0000, 0.0000]])

    References:
        Pratt et al., CuPL, ICCV 2023, https://github.com/sarahpratt/CuPL;
        Li et al., "Dual Risk Minimization", NeurIPS 2024, https://github.com/vaynexie/DRM
    """
    counts, batches = _encode(
        "description_bank", model, tokenizer, descriptions, classnames, batch_size, params
    )
    bank: Tensor | None = None
    for cls, pos, feats in batches:
        if bank is None:
            bank = feats.new_zeros(len(counts), max(counts), feats.shape[-1])
        bank[cls, pos] = feats
    assert bank is not None  # every class holds at least one description
    mask = (
        torch.arange(max(counts), device=bank.device)[None, :]
        < torch.tensor(counts, device=bank.device)[:, None]
    )
    return DescriptionBank(bank, mask)
