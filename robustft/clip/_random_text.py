"""Lipsum-FT's random texts: token generation, a pre-encoded bank, and the energy-gap metric."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft._checks import check_floating, check_int, describe
from robustft.clip._common import (
    STANDARD_CONTEXT_LENGTH,
    STANDARD_EOT,
    STANDARD_SOT,
    STANDARD_VOCAB_SIZE,
    Tokenizer,
    call_method,
    check_batch_size,
    check_model,
    check_params,
    eval_mode,
    model_device,
    special_ids,
)
from robustft.losses import energy_gap
from robustft.tree import accumulation_dtype
from robustft.typing import Scalar

__all__ = ["RandomTextBank", "energy_gap_metric", "random_text_tokens"]


def _vocabulary(fn: str, tokenizer: Tokenizer | None) -> tuple[int, int, int]:
    """``(vocab_size, sot, eot)`` of ``tokenizer``, or of open_clip's standard BPE vocabulary."""
    if tokenizer is None:
        return STANDARD_VOCAB_SIZE, STANDARD_SOT, STANDARD_EOT
    sot, eot = special_ids(fn, tokenizer)
    vocab = getattr(tokenizer, "vocab_size", None)
    if not isinstance(vocab, int) or not (0 <= sot < vocab and 0 <= eot < vocab) or sot == eot:
        raise ValueError(
            f"{fn}: tokenizer must have an int vocab_size containing distinct sot_token_id and "
            f"eot_token_id, got vocab_size={vocab!r}, sot_token_id={sot}, eot_token_id={eot}"
        )
    return vocab, sot, eot


def _check_generator(fn: str, generator: Any) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got {describe(generator)}"
        )
    return generator


def random_text_tokens(
    num_texts: int,
    *,
    length: int = 8,
    context_length: int | None = None,
    generator: torch.Generator | None = None,
    tokenizer: Tokenizer | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Lipsum-FT's random texts: ``[SOT, r_1..r_L, EOT, 0, ...]`` with uniform random token ids.

    Each body token is drawn independently and uniformly from every id of the vocabulary except
    the start and end tokens,

    .. math::

        r_{n,l} \sim \mathcal U\big(\{0, \dots, V-1\} \setminus \{\mathrm{SOT}, \mathrm{EOT}\}\big),

    which for open_clip's standard BPE vocabulary (:math:`V = 49408`, SOT 49406, EOT 49407) is
    the range ``[0, 49406)`` of the official code (SPEC §4). The padding id 0 may occur in the body
    as in the official code; EOT stays the largest id of every row, so argmax pooling finds it.

    Args:
        num_texts: how many texts :math:`N`.
        length: body tokens per text :math:`L` (8 in Lipsum-FT).
        context_length: row width; defaults to ``tokenizer.context_length`` when a tokenizer is
            given, else 77.
        generator: random generator (on ``device``) for reproducible draws; the global one if
            ``None``.
        tokenizer: takes ``vocab_size``, ``sot_token_id`` and ``eot_token_id`` from it
            (``open_clip.get_tokenizer(name)``); ``None`` means open_clip's standard BPE
            vocabulary.
        device: device of the result (default: the generator's device, else the default device).

    Returns:
        ``[num_texts, context_length]`` int64 token ids.

    Raises:
        TypeError: on non-int sizes, a tokenizer without special-token ids or a non-generator.
        ValueError: if ``num_texts < 1``, ``length < 1`` or ``length + 2 > context_length``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> t = random_text_tokens(2, length=3, context_length=7, generator=g)
        >>> t[:, 0].tolist(), t[:, 4].tolist(), t[:, 5:].tolist()
        ([49406, 49406], [49407, 49407], [[0, 0], [0, 0]])
        >>> bool((t[:, 1:4] < 49406).all())
        True

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024. Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "random_text_tokens"
    check_int(fn, "num_texts", num_texts, low=1)
    check_int(fn, "length", length, low=1)
    vocab, sot, eot = _vocabulary(fn, tokenizer)
    if context_length is None:
        tok_len = getattr(tokenizer, "context_length", None)
        context_length = tok_len if isinstance(tok_len, int) else STANDARD_CONTEXT_LENGTH
    check_int(fn, "context_length", context_length, low=3)
    if length + 2 > context_length:
        raise ValueError(
            f"{fn}: length must be at most context_length - 2 = {context_length - 2} "
            f"(room for SOT and EOT), got {length}"
        )
    _check_generator(fn, generator)
    where = generator.device if generator is not None else device
    body = torch.randint(0, vocab - 2, (num_texts, length), generator=generator, device=where)
    if device is not None:
        body = body.to(device)
    lo, hi = sorted((sot, eot))
    body = body + (body >= lo).long()  # skip the smaller special id ...
    body = body + (body >= hi).long()  # ... then the larger one: uniform over the other V - 2 ids
    out = torch.zeros(num_texts, context_length, dtype=torch.long, device=body.device)
    out[:, 0] = sot
    out[:, 1 : length + 1] = body
    out[:, length + 1] = eot
    return out


class RandomTextBank(NamedTuple):
    r"""A bank of pre-encoded random texts for Lipsum-FT's regulariser and energy-gap metric.

    The text tower is frozen during Lipsum-FT, so the features of random texts never change:
    encode :math:`N` of them once (:meth:`from_model`) and draw the step's :math:`M` rows with
    :meth:`sample` instead of running the text tower on :math:`M` fresh texts every step. Both
    estimate the same expectation over random texts; the bank's cost per step is a row gather.

    Attributes:
        features: ``[texts, dim]`` L2-normalised text features of the random texts.
        tokens: ``[texts, context_length]`` their token ids (kept for inspection and re-encoding).

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024. Code: https://github.com/cs-giung/lipsum-ft
    """

    features: Tensor
    tokens: Tensor

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        num_texts: int,
        *,
        length: int = 8,
        tokenizer: Tokenizer | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        params: Mapping[str, Tensor] | None = None,
    ) -> RandomTextBank:
        """Draw ``num_texts`` random texts (:func:`random_text_tokens`) and encode them once.

        Encoding runs ``batch_size`` texts at a time under :func:`torch.no_grad` with the model in
        eval mode (each submodule's flag restored afterwards). The row width is the model's
        ``context_length`` when it has one.

        Args:
            model: the frozen open_clip model (or any module with ``encode_text``).
            num_texts: bank size :math:`N` (10,000 for the paper's energy-gap diagnostic).
            length: body tokens per text (8 in Lipsum-FT).
            tokenizer: source of the vocabulary and special ids; ``None`` means open_clip's
                standard BPE vocabulary.
            generator: CPU random generator for the tokens (reproducible banks).
            batch_size: texts per text-tower forward.
            dtype: dtype of the stored features; default the text tower's output dtype.
            device: device of the stored features; default the model's device.
            params: optional (partial) tree of text-tower parameters to encode with.

        Returns:
            The bank, features ``[num_texts, dim]`` and tokens ``[num_texts, context_length]``.

        Raises:
            TypeError: on a model without ``encode_text`` or arguments of the wrong type.
            ValueError: on non-positive sizes or a vocabulary larger than the model's.
        """
        fn = "RandomTextBank.from_model"
        check_model(fn, model, "encode_text")
        check_int(fn, "num_texts", num_texts, low=1)
        check_batch_size(fn, batch_size)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{fn}: dtype must be a floating torch.dtype or None, got {dtype!r}")
        tree = check_params(fn, model, params)
        vocab, _, _ = _vocabulary(fn, tokenizer)
        model_vocab = getattr(model, "vocab_size", None)
        if isinstance(model_vocab, int) and vocab > model_vocab:
            raise ValueError(
                f"{fn}: the tokenizer's vocabulary ({vocab} ids) must fit the model's "
                f"vocab_size, got model.vocab_size={model_vocab}; pass the model's tokenizer"
            )
        ctx = getattr(model, "context_length", None)
        tokens = random_text_tokens(
            num_texts,
            length=length,
            context_length=ctx if isinstance(ctx, int) else None,
            generator=generator,
            tokenizer=tokenizer,
        )
        run_device = model_device(model)
        chunks = []
        with torch.no_grad(), eval_mode(model):
            for start in range(0, num_texts, batch_size):
                batch = tokens[start : start + batch_size].to(run_device)
                feats = call_method(model, "encode_text", tree, batch)
                out = F.normalize(feats.to(accumulation_dtype(feats.dtype)), dim=-1)
                chunks.append(out.to(device=device, dtype=dtype or feats.dtype))
        return cls(features=torch.cat(chunks), tokens=tokens)

    @property
    def num_texts(self) -> int:
        """Number of texts :math:`N` in the bank."""
        return int(self.features.shape[0])

    def sample(
        self,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
        replacement: bool = False,
    ) -> Tensor:
        r"""Draw the step's :math:`M` text features, uniformly over the bank's rows.

        Without replacement (the default) the :math:`M` rows are distinct, a uniformly random
        :math:`M`-subset, like :math:`M` fresh random texts (which collide with negligible
        probability); every row has marginal probability :math:`M/N`. With ``replacement=True``
        rows are drawn i.i.d. uniform (:math:`M > N` allowed). The indices are drawn on the
        generator's device (the features' device without a generator) with no host sync.

        Args:
            num_samples: :math:`M` (80 in Lipsum-FT).
            generator: random generator for reproducible draws; the global one if ``None``.
            replacement: draw with replacement.

        Returns:
            ``[num_samples, dim]`` rows of :attr:`features` (no copy of the bank).

        Raises:
            ValueError: if ``num_samples < 1``, or ``num_samples > N`` without replacement.
            TypeError: on a non-int ``num_samples`` or a non-generator.

        Example:
            >>> bank = RandomTextBank(torch.eye(4), torch.zeros(4, 10, dtype=torch.long))
            >>> rows = bank.sample(4, generator=torch.Generator().manual_seed(0))
            >>> sorted(rows.argmax(1).tolist())  # all four rows, each once
            [0, 1, 2, 3]
        """
        fn = "RandomTextBank.sample"
        check_int(fn, "num_samples", num_samples, low=1)
        _check_generator(fn, generator)
        n = self.features.shape[0]
        if not replacement and num_samples > n:
            raise ValueError(
                f"{fn}: num_samples must be at most the bank size {n} without replacement, "
                f"got {num_samples}"
            )
        where = generator.device if generator is not None else self.features.device
        if replacement:
            idx = torch.randint(0, n, (num_samples,), generator=generator, device=where)
        else:
            idx = torch.randperm(n, generator=generator, device=where)[:num_samples]
        return self.features.index_select(0, idx.to(self.features.device))


def energy_gap_metric(
    features: Tensor,
    reference: Tensor,
    bank: RandomTextBank | Tensor,
    *,
    logit_scale: Scalar = 100.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Lipsum-FT's energy gap (Eq. 6) over every text of a random-text bank.

    The diagnostic version of :func:`robustft.losses.energy_gap`: the same per-image quantity,
    averaged over all :math:`N` texts of the bank instead of the step's :math:`M`,

    .. math::

        \mathrm{EG}_b = \frac{1}{2N} \sum_{n=1}^{N}
            \big(s\,\langle \hat f_b - \hat f^0_b, \hat t_n \rangle\big)^2 ,

    where :math:`\hat f_b`, :math:`\hat f^0_b` are the normalised image features of the fine-tuned
    and the pre-trained model on the same images (from :func:`image_features` and
    :func:`frozen_copy_features`) and :math:`\hat t_n` the bank's text features. Pass
    ``logit_scale=1.0`` for the scale-free form; the default :math:`s = 100` matches the training
    regulariser's units. Evaluated under :func:`torch.no_grad` (a metric); to train, use
    ``losses.energy_gap(f, f0, bank.sample(80))``. Lower is closer to the zero-shot model.

    Args:
        features: ``[batch, dim]`` image features of the fine-tuned model.
        reference: ``[batch, dim]`` image features of the pre-trained model on the same images.
        bank: a :class:`RandomTextBank` or its ``[texts, dim]`` text features.
        logit_scale: :math:`s > 0`.
        reduction: ``"mean"`` over the batch, ``"sum"`` or ``"none"`` (per image ``[batch]``).

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"``.

    Raises:
        TypeError: if ``bank`` is neither a bank nor a floating tensor, or as
            :func:`robustft.losses.energy_gap`.
        ValueError: as :func:`robustft.losses.energy_gap` (shapes, scale, reduction).

    Example:
        >>> bank = RandomTextBank(torch.eye(2), torch.zeros(2, 4, dtype=torch.long))
        >>> f, f0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> energy_gap_metric(f, f0, bank, logit_scale=1.0)  # (1² + 1²) / (2·2)
        tensor(0.5000)

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024, Eq. 6. Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "energy_gap_metric"
    if isinstance(bank, RandomTextBank):
        texts = bank.features
    elif isinstance(bank, Tensor):
        texts = check_floating(fn, "bank", bank, ndim=2)
    else:
        raise TypeError(
            f"{fn}: bank must be a RandomTextBank or a [texts, dim] floating tensor, "
            f"got {describe(bank)}"
        )
    with torch.no_grad():
        return energy_gap(features, reference, texts, logit_scale=logit_scale, reduction=reduction)
