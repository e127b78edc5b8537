"""Lipsum-FT's random texts: token generation and a pre-encoded bank.

The energy-gap diagnostic over a bank is :func:`robustft.metrics.energy_gap`.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft._checks import check_device, check_dtype, check_int, describe
from robustft._numerics import compute_dtype
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
    unwrap,
)
from robustft.typing import Device, Params

__all__ = ["RandomTextBank", "random_text_tokens", "token_vocabulary"]


def _vocabulary(fn: str, tokenizer: Tokenizer | None) -> tuple[int, int, int]:
    """``(vocab_size, sot, eot)`` of ``tokenizer``, or of open_clip's standard BPE vocabulary.

    Random bodies draw every id but SOT and EOT, so EOT is the largest id of every row (what
    argmax pooling needs) only when it is the vocabulary's last id: other layouts are rejected.
    """
    if tokenizer is None:
        return STANDARD_VOCAB_SIZE, STANDARD_SOT, STANDARD_EOT
    sot, eot = special_ids(fn, tokenizer)
    vocab = getattr(tokenizer, "vocab_size", None)
    if (
        not isinstance(vocab, int)
        or isinstance(vocab, bool)
        or vocab < 3
        or not 0 <= sot < vocab
        or eot != vocab - 1
        or sot == eot
    ):
        raise ValueError(
            f"{fn}: tokenizer must have an int vocab_size >= 3 whose last id is eot_token_id "
            f"and a distinct sot_token_id below it (open_clip's CLIP BPE layout: EOT = "
            f"vocab_size - 1 stays the largest id of every random row, so argmax pooling finds "
            f"it), got vocab_size={vocab!r}, sot_token_id={sot}, eot_token_id={eot}"
        )
    return vocab, sot, eot


def _check_token_ids(fn: str, vocabulary: Any, vocab: int, sot: int, eot: int) -> Tensor | None:
    """``vocabulary`` as a 1-D int64 CPU tensor of distinct body ids, or ``None`` (every id).

    Each id must be one the random bodies may hold: in ``[0, vocab)`` and neither SOT nor EOT
    (so EOT stays the largest id of every row).
    """
    if vocabulary is None:
        return None
    allowed = (
        f"a 1-D integer tensor or a sequence of ints: distinct token ids in [0, {vocab}) other "
        f"than sot {sot} and eot {eot}"
    )
    if isinstance(vocabulary, Tensor):
        if (
            vocabulary.is_floating_point()
            or vocabulary.is_complex()
            or vocabulary.dtype == torch.bool
        ):
            raise TypeError(f"{fn}: vocabulary must be {allowed}, got {describe(vocabulary)}")
        if vocabulary.ndim != 1:
            raise ValueError(f"{fn}: vocabulary must be {allowed}, got {describe(vocabulary)}")
        ids = vocabulary.detach().to(device="cpu", dtype=torch.int64)
    elif isinstance(vocabulary, Sequence) and not isinstance(vocabulary, (str, bytes)):
        bad = [
            v
            for v in vocabulary
            if isinstance(v, bool)
            or type(v).__name__ == "bool_"
            or not isinstance(v, numbers.Integral)
        ]
        if bad:
            raise TypeError(f"{fn}: vocabulary must be {allowed}, got an entry {describe(bad[0])}")
        ids = torch.tensor([int(v) for v in vocabulary], dtype=torch.int64)
    else:
        raise TypeError(f"{fn}: vocabulary must be {allowed}, got {describe(vocabulary)}")
    if ids.numel() == 0:
        raise ValueError(f"{fn}: vocabulary must hold at least one token id, got none")
    outside = ids[(ids < 0) | (ids >= vocab)]
    if outside.numel():
        raise ValueError(
            f"{fn}: vocabulary must be {allowed}, got id {int(outside[0])} outside the "
            f"tokenizer's vocabulary ({outside.numel()} such id(s))"
        )
    special = ids[(ids == sot) | (ids == eot)]
    if special.numel():
        which = "sot" if int(special[0]) == sot else "eot"
        raise ValueError(
            f"{fn}: vocabulary must be {allowed}, got the special id {int(special[0])} ({which}); "
            f"random bodies never hold SOT or EOT"
        )
    unique, counts = torch.unique(ids, return_counts=True)
    if unique.numel() != ids.numel():
        raise ValueError(
            f"{fn}: vocabulary must hold distinct ids (a repeated id would be drawn more often), "
            f"got id {int(unique[counts > 1][0])} {int(counts[counts > 1][0])} times"
        )
    return ids


def _signed(x: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: Tensor) -> Tensor:
    """SplitMix64's finaliser (Steele et al., OOPSLA 2014): a bijective avalanche of 64 bits."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _hash_stream(key: Tensor, n: int) -> Tensor:
    """``n`` uniform 53-bit integers (int64 >= 0) of the counter-based stream ``key``.

    Element ``i`` is ``mix(mix(mix(key + γ) + i + 1))`` with SplitMix64's finaliser ``mix`` and
    γ its golden-ratio increment, in wrapping int64 arithmetic: pure tensor ops, no generator, no
    host sync, traceable by dynamo (a unit-step counter, which inductor vectorises safely).
    """
    base = _mix(key + _GOLDEN)
    counters = torch.arange(1, n + 1, dtype=torch.int64, device=key.device)
    return _shr(_mix(_mix(base + counters)), 11)


def _check_key(fn: str, key: Any, device: torch.device) -> Tensor | None:
    if key is None:
        return None
    if isinstance(key, Tensor):
        if key.ndim != 0 or key.is_floating_point() or key.is_complex() or key.dtype == torch.bool:
            raise TypeError(
                f"{fn}: key must be an int or a 0-d integer tensor (e.g. the step counter), "
                f"got {describe(key)}"
            )
        return key.to(device=device, dtype=torch.int64)
    k = check_int(fn, "key", key)
    if not -(1 << 63) <= k < 1 << 63:
        raise ValueError(f"{fn}: key must fit in int64, got {k}")
    return torch.tensor(k, dtype=torch.int64, device=device)


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
    device: Device = None,
    vocabulary: Tensor | Sequence[int] | None = None,
) -> Tensor:
    r"""Lipsum-FT's random texts: ``[SOT, r_1..r_L, EOT, 0, ...]`` with uniform random token ids.

    Each body token is drawn independently and uniformly from a set :math:`\mathcal V` of ids:
    by default every id of the vocabulary except the start and end tokens,

    .. math::

        r_{n,l} \sim \mathcal U(\mathcal V), \qquad
        \mathcal V = \{0, \dots, V-1\} \setminus \{\mathrm{SOT}, \mathrm{EOT}\},

    which for open_clip's standard BPE vocabulary (:math:`V = 49408`, SOT 49406, EOT 49407) is
    the range ``[0, 49406)`` of the official code (SPEC §4), or the ids given as ``vocabulary``
    (e.g. :func:`token_vocabulary` of a corpus of texts). The padding id 0 may occur in the body
    as in the official code. EOT is the largest id of every row, so argmax pooling finds it: the
    function accepts only tokenizers whose EOT is the vocabulary's last id (open_clip's CLIP BPE
    tokenizers), and rejects any other layout rather than break that promise.

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
        vocabulary: ``[K]`` the ids :math:`\mathcal V` the body tokens are drawn from, uniformly:
            distinct, each in ``[0, V)`` and neither SOT nor EOT (a 1-D integer tensor or a
            sequence of ints, in any order). ``None`` (default) draws from every id but SOT and
            EOT, with the same generator draws as before this argument existed. With a
            vocabulary, each token is ``vocabulary[i]`` for ``i`` uniform on ``[0, K)`` (one
            ``torch.randint`` of the same shape).

    Returns:
        ``[num_texts, context_length]`` int64 token ids.

    Raises:
        TypeError: on non-int sizes, a tokenizer without special-token ids, a non-generator, a
            ``device`` that is not a str or ``torch.device``, or a ``vocabulary`` that is not a
            1-D integer tensor or a sequence of ints.
        ValueError: if ``num_texts < 1``, ``length < 1``, ``length + 2 > context_length``, a
            tokenizer whose EOT is not its last id, a ``device`` string naming no device, or a
            ``vocabulary`` that is empty, not 1-D, repeats an id, or holds an id outside
            ``[0, V)`` or a special one.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> t = random_text_tokens(2, length=3, context_length=7, generator=g)
        >>> t[:, 0].tolist(), t[:, 4].tolist(), t[:, 5:].tolist()
        ([49406, 49406], [49407, 49407], [[0, 0], [0, 0]])
        >>> bool((t[:, 1:4] < 49406).all())
        True
        >>> t = random_text_tokens(2, length=3, context_length=7, vocabulary=[7, 11], generator=g)
        >>> sorted(set(t[:, 1:4].flatten().tolist()) - {7, 11})
        []

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
    device = check_device(fn, "device", device)
    ids = _check_token_ids(fn, vocabulary, vocab, sot, eot)
    where = generator.device if generator is not None else device
    if ids is None:
        body = torch.randint(0, vocab - 2, (num_texts, length), generator=generator, device=where)
        lo, hi = sorted((sot, eot))
        body = body + (body >= lo).long()  # skip the smaller special id ...
        body = body + (body >= hi).long()  # ... then the larger: uniform over the other V - 2 ids
    else:
        pick = torch.randint(0, len(ids), (num_texts, length), generator=generator, device=where)
        body = ids.to(pick.device)[pick]
    if device is not None:
        body = body.to(device)
    out = torch.zeros(num_texts, context_length, dtype=torch.long, device=body.device)
    out[:, 0] = sot
    out[:, 1 : length + 1] = body
    out[:, length + 1] = eot
    return out


@functools.lru_cache(maxsize=1)
def _standard_tokenizer() -> Tokenizer:
    """open_clip's standard BPE tokenizer, built once (imported on first use, never at import)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer: Tokenizer = SimpleTokenizer()
    return tokenizer


_CHUNK = 4096  # texts tokenised per call: the [texts, context] id matrix stays small


def token_vocabulary(texts: Sequence[str], tokenizer: Tokenizer | None = None) -> Tensor:
    r"""The sorted distinct token ids of ``texts``: a vocabulary for :func:`random_text_tokens`.

    Each text is tokenised as the model sees it (``[SOT, t_1..t_n, EOT, 0, ...]``, a text longer
    than the context truncated by the tokenizer) and its body :math:`t_1..t_n` kept; the result is

    .. math::

        \mathcal V = igcup_j \{t_{j,1}, \dots, t_{j,n_j}\} \setminus \{\mathrm{SOT}, \mathrm{EOT}\},

    sorted. Special tokens and the padding after EOT are excluded by position, not by value: id 0
    is both the padding and a BPE token (``!`` inside a word), kept when a text's body holds it.
    Pass the result as ``vocabulary=`` to
    :func:`random_text_tokens` or :meth:`RandomTextBank.from_model` to draw Lipsum-FT's random
    texts from the tokens of a corpus (e.g. the class names and captions of a domain) instead of
    the whole vocabulary.

    Args:
        texts: the texts (a non-empty sequence of str).
        tokenizer: an open_clip CLIP BPE tokenizer (``open_clip.get_tokenizer(name)``), the one
            the random texts will be drawn for; ``None`` means open_clip's standard BPE tokenizer
            (``open_clip.tokenizer.SimpleTokenizer``, the one place :mod:`robustft.clip` imports
            open_clip, on the first call only).

    Returns:
        ``[K]`` int64 ids, sorted ascending, distinct, each in ``[0, vocab_size)`` and neither
        SOT nor EOT.

    Raises:
        TypeError: ``texts`` is not a sequence of str (a bare str is refused), or a tokenizer
            without special-token ids or that returns no integer ``[texts, context]`` tensor.
        ValueError: no text, texts that hold no token (all blank), a tokenizer whose EOT is not
            its last id, or a tokenized row that is not ``[SOT, ..., EOT, ...]`` or holds an id
            outside the vocabulary.

    Example:
        >>> token_vocabulary(["a photo of a dog.", "a dog"]).tolist()  # a photo of dog .
        [269, 320, 539, 1125, 1929]

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024. Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "token_vocabulary"
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{fn}: texts must be a sequence of str, got {describe(texts)}")
    if len(texts) == 0:
        raise ValueError(f"{fn}: texts must hold at least one text, got none")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{fn}: texts must contain only str, got {describe(bad[0])}")
    if tokenizer is None:
        tokenizer = _standard_tokenizer()
    vocab, sot, eot = _vocabulary(fn, tokenizer)
    found = torch.zeros(vocab, dtype=torch.bool)
    for start in range(0, len(texts), _CHUNK):
        rows = tokenizer(list(texts[start : start + _CHUNK]))
        if (
            not isinstance(rows, Tensor)
            or rows.ndim != 2
            or rows.is_floating_point()
            or rows.is_complex()
            or rows.dtype == torch.bool
        ):
            raise TypeError(
                f"{fn}: tokenizer must return an integer [texts, context_length] tensor, got "
                f"{describe(rows)}"
            )
        rows = rows.to(device="cpu", dtype=torch.int64)
        is_eot = rows == eot
        if not bool((rows[:, 0] == sot).all()) or not bool(is_eot.any(dim=1).all()):
            raise ValueError(
                f"{fn}: tokenizer must lay every text out as [SOT, tokens, EOT, padding] "
                f"(open_clip's CLIP BPE layout, sot_token_id={sot}, eot_token_id={eot}), got a "
                f"row that does not start with SOT or holds no EOT"
            )
        end = is_eot.long().argmax(dim=1, keepdim=True)  # the first EOT of each row
        where = torch.arange(rows.shape[1]).unsqueeze(0)
        body = rows[(where >= 1) & (where < end) & (rows != sot)]
        outside = body[(body < 0) | (body >= vocab)]
        if outside.numel():
            raise ValueError(
                f"{fn}: tokenizer must return ids in [0, vocab_size={vocab}), got {int(outside[0])}"
            )
        found[body] = True
    ids = found.nonzero().squeeze(1)
    if ids.numel() == 0:
        raise ValueError(
            f"{fn}: texts must hold at least one token, got {len(texts)} text(s) without any "
            f"(blank)"
        )
    return ids


class RandomTextBank(NamedTuple):
    r"""A bank of pre-encoded random texts for Lipsum-FT's regulariser and energy-gap diagnostic.

    The text tower is frozen during Lipsum-FT, so the features of random texts never change:
    encode :math:`N` of them once (:meth:`from_model`) and draw the step's :math:`M` rows with
    :meth:`sample` instead of running the text tower on :math:`M` fresh texts every step; the
    bank's cost per step is a row gather.

    **Not the same estimator as fresh texts.** Fresh texts every step give an unbiased estimate of
    the regulariser's expectation over *all* random texts. Rows sampled from one fixed bank are
    unbiased only for *that bank's* average, so training minimises the bank's objective; it equals
    the paper's estimator only on average over banks. The gap shrinks with the bank size: use a
    large bank (10,000+ texts) or refresh it periodically (:meth:`from_model` with a new
    generator), and measure the energy-gap diagnostic (:func:`robustft.metrics.energy_gap`) on
    held-out random texts, never on the training bank, whose gap training drives down directly.

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
        device: Device = None,
        params: Params | None = None,
        vocabulary: Tensor | Sequence[int] | None = None,
    ) -> RandomTextBank:
        """Draw ``num_texts`` random texts (:func:`random_text_tokens`) and encode them once.

        Encoding runs ``batch_size`` texts at a time under :func:`torch.no_grad` with the model in
        eval mode (each submodule's flag restored afterwards). The row width is the model's
        ``context_length`` when it has one. A ``DistributedDataParallel`` is unwrapped (no
        gradient); draw every rank's bank from the same seed so that ranks agree.

        Args:
            model: the frozen open_clip model (or any module with ``encode_text``).
            num_texts: bank size :math:`N` (10,000 for the paper's energy-gap diagnostic; large
                banks keep the fixed-bank objective close to the paper's, see the class notes).
            length: body tokens per text (8 in Lipsum-FT).
            tokenizer: source of the vocabulary and special ids; ``None`` means open_clip's
                standard BPE vocabulary.
            generator: CPU random generator for the tokens (reproducible banks).
            batch_size: texts per text-tower forward.
            dtype: dtype of the stored features; default the text tower's output dtype.
            device: device of the stored features; default the model's device.
            params: optional (partial) tree of text-tower parameters to encode with.
            vocabulary: ``[K]`` the token ids the random bodies are drawn from, uniformly (see
                :func:`random_text_tokens`); ``None``: every id but SOT and EOT.

        Returns:
            The bank, features ``[num_texts, dim]`` and tokens ``[num_texts, context_length]``.

        Raises:
            TypeError: on a model without ``encode_text`` (or FSDP-managed), or arguments of the
                wrong type (``dtype`` not a floating dtype, ``device`` not a str or device).
            ValueError: on non-positive sizes, a vocabulary larger than the model's, a tokenizer
                whose EOT is not its last id, a ``device`` string naming no device, or a
                ``vocabulary`` that is empty, repeats an id or holds an id that is special or
                outside the tokenizer's vocabulary.

        Example:
            >>> class Toy(torch.nn.Module):  # "text feature" = (first body token, 1)
            ...     def encode_text(self, tokens):
            ...         return torch.stack([tokens[:, 1].float(), torch.ones(len(tokens))], 1)
            >>> bank = RandomTextBank.from_model(Toy(), 3, generator=torch.Generator().manual_seed(0))
            >>> bank.features.shape, bank.tokens.shape
            (torch.Size([3, 2]), torch.Size([3, 77]))
        """
        fn = "RandomTextBank.from_model"
        check_model(fn, model, "encode_text", wrapper_ok=True)
        check_int(fn, "num_texts", num_texts, low=1)
        check_batch_size(fn, batch_size)
        if dtype is not None:
            check_dtype(fn, "dtype", dtype)
        device = check_device(fn, "device", device)
        tree = check_params(fn, model, params)
        inner = unwrap(model)
        vocab, sot, eot = _vocabulary(fn, tokenizer)
        ids = _check_token_ids(fn, vocabulary, vocab, sot, eot)
        model_vocab = getattr(inner, "vocab_size", None)
        if isinstance(model_vocab, int) and vocab > model_vocab:
            raise ValueError(
                f"{fn}: the tokenizer's vocabulary ({vocab} ids) must fit the model's "
                f"vocab_size, got model.vocab_size={model_vocab}; pass the model's tokenizer"
            )
        ctx = getattr(inner, "context_length", None)
        tokens = random_text_tokens(
            num_texts,
            length=length,
            context_length=ctx if isinstance(ctx, int) else None,
            generator=generator,
            tokenizer=tokenizer,
            vocabulary=ids,
        )
        run_device = model_device(inner)
        chunks = []
        with torch.no_grad(), eval_mode(inner):
            for start in range(0, num_texts, batch_size):
                batch = tokens[start : start + batch_size].to(run_device)
                feats = call_method(inner, "encode_text", tree, batch)
                out = F.normalize(feats.to(compute_dtype(feats.dtype)), dim=-1)
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
        key: int | Tensor | None = None,
        replacement: bool = True,
    ) -> Tensor:
        r"""Draw the step's :math:`M` text features, uniformly over the bank's rows.

        With replacement (the default) the :math:`M` row indices are i.i.d. uniform on
        :math:`\{0, \dots, N-1\}`, exactly as :math:`M` fresh random texts are i.i.d. draws of the
        text distribution: :math:`O(M)` work per call, whatever the bank size, and
        :math:`M > N` is allowed. ``replacement=False`` draws a uniformly random :math:`M`-subset
        (distinct rows, each with marginal probability :math:`M/N`) at :math:`O(N)` cost per call
        (a permutation or a top-:math:`M` of :math:`N` random keys).

        The randomness comes from one of three sources:

        - ``key`` (an int or a 0-d integer tensor, e.g. ``seed * 10**6 + step``): a counter-based
          stream (SplitMix64 of the key and the draw index) computed with tensor ops on the
          bank's device. The same key gives the same rows; a step counter held in a tensor
          compiles once with ``torch.compile(fullgraph=True)`` and never recompiles. Use this
          inside compiled steps.
        - ``generator``: a :class:`torch.Generator` (on the bank's device) for reproducible eager
          runs. Dynamo cannot trace generator arguments (torch 2.14), so a call with a generator
          breaks a compiled graph: use ``key`` there.
        - neither: torch's global generator (compiles; reproducible through ``torch.manual_seed``).

        The indices are drawn on the bank's device with no host sync.

        Args:
            num_samples: :math:`M` (80 in Lipsum-FT).
            generator: random generator for reproducible eager draws.
            key: counter-based key for reproducible, compilable draws (not with ``generator``).
            replacement: i.i.d. rows (default, :math:`O(M)`) or distinct rows (:math:`O(N)`).

        Returns:
            ``[num_samples, dim]`` rows of :attr:`features`.

        Raises:
            ValueError: if ``num_samples < 1``, ``num_samples > N`` without replacement, or both
                ``generator`` and ``key`` are given.
            TypeError: on a non-int ``num_samples``, a non-generator, a ``key`` that is neither an
                int nor a 0-d integer tensor, or a non-bool ``replacement``.

        Example:
            >>> bank = RandomTextBank(torch.eye(4), torch.zeros(4, 10, dtype=torch.long))
            >>> rows = bank.sample(4, key=0, replacement=False)
            >>> sorted(rows.argmax(1).tolist())  # all four rows, each once
            [0, 1, 2, 3]
            >>> torch.equal(bank.sample(3, key=7), bank.sample(3, key=7))
            True
        """
        fn = "RandomTextBank.sample"
        check_int(fn, "num_samples", num_samples, low=1)
        _check_generator(fn, generator)
        if not isinstance(replacement, bool):
            raise TypeError(f"{fn}: replacement must be a bool, got {describe(replacement)}")
        device = self.features.device
        seed = _check_key(fn, key, device)
        if seed is not None and generator is not None:
            raise ValueError(
                f"{fn}: generator and key must not both be given (one source of randomness), "
                f"got both"
            )
        n = self.features.shape[0]
        if not replacement and num_samples > n:
            raise ValueError(
                f"{fn}: num_samples must be at most the bank size {n} without replacement, "
                f"got {num_samples}"
            )
        if seed is not None:
            if replacement:
                idx = torch.remainder(_hash_stream(seed, num_samples), n)
            else:
                idx = torch.topk(_hash_stream(seed, n), num_samples, sorted=False).indices
        else:
            where = generator.device if generator is not None else device
            if replacement:
                idx = torch.randint(0, n, (num_samples,), generator=generator, device=where)
            else:
                idx = torch.randperm(n, generator=generator, device=where)[:num_samples]
            idx = idx.to(device)
        return self.features.index_select(0, idx)
