r"""Fisher-weighted merging: the diagonal Fisher of a model, and the Fisher-weighted average of trees."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from robustft import tree
from robustft._checks import (
    check_choice,
    check_floating_tree,
    check_group,
    check_int,
    check_labels,
    check_number,
    check_tensor,
    describe,
    fmt_keys,
)
from robustft._modules import eval_mode
from robustft._numerics import compute_dtype, full_precision
from robustft.distributed import all_reduce_sum
from robustft.merging._stream import Stream
from robustft.typing import Group, Params

__all__ = ["fisher_diagonal", "fisher_merge"]

_LABELS = ("empirical", "sampled", "expected")
_HINT = (
    "integer and bool buffers (e.g. BatchNorm's num_batches_tracked) cannot be merged: leave them "
    "out (robustft.tree.partition) and copy them yourself"
)

Forward = Callable[[Params, Tensor], Tensor]
"""A functional forward ``(params, inputs) -> outputs`` (the model side, not a second tree)."""


# ------------------------------------------------------------------ fisher_diagonal


def _forward(fn: str, model: object, params: Params) -> tuple[Forward, Any]:
    """The functional forward and the context it runs in (eval mode for a module)."""
    if isinstance(model, nn.Module):
        known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        known |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ValueError(
                f"{fn}: params must name parameters or buffers of model, got unknown keys "
                f"{fmt_keys(unknown)}"
            )

        def call(p: Params, x: Tensor) -> Tensor:
            out: Tensor = functional_call(model, dict(p), (x,))
            return out

        return call, eval_mode(model)
    if callable(model):
        return model, contextlib.nullcontext()
    raise TypeError(
        f"{fn}: model must be a torch.nn.Module or a callable (params, inputs) -> outputs, got "
        f"{describe(model)}"
    )


def _check_logits(fn: str, out: object, what: str) -> Tensor:
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError(
            f"{fn}: model must return floating-point logits [batch, classes] {what}, got "
            f"{describe(out)}"
        )
    if out.ndim != 2:
        raise ValueError(
            f"{fn}: model must return logits of shape [batch, classes] {what}, got shape "
            f"{tuple(out.shape)}"
        )
    return out


def _categorical(fn: str) -> Callable[[Tensor, Tensor], Tensor]:
    """log p(y | x) of a categorical model with logits ``out``: ``log_softmax(out)[y]``.

    Labels are clamped into range here (values cannot be read under ``vmap``) and checked
    eagerly against the number of classes once the chunk is done.
    """

    def log_likelihood(out: Tensor, y: Tensor) -> Tensor:
        _check_logits(fn, out, "for the default log-likelihood")
        logp = torch.log_softmax(out.to(compute_dtype(out)), dim=-1)
        idx = y.clamp(0, out.shape[-1] - 1).unsqueeze(-1)
        return logp.gather(-1, idx).sum()

    return log_likelihood


def _user(fn: str, ll: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def log_likelihood(out: Tensor, y: Tensor) -> Tensor:
        value = ll(out, y)
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() != 1:
            raise ValueError(
                f"{fn}: log_likelihood must return one floating-point log-likelihood per sample "
                f"(shape [batch] or a 0-d tensor for a batch of one), got {describe(value)}"
            )
        return value.sum()

    return log_likelihood


def _split(fn: str, i: int, batch: object, need_targets: bool) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        if need_targets:
            raise TypeError(
                f"{fn}: batches must yield (inputs, targets) pairs with labels='empirical', got "
                f"a bare tensor at batch {i}"
            )
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        check_tensor(fn, f"inputs of batch {i}", inputs)
        check_tensor(fn, f"targets of batch {i}", targets)
        if inputs.ndim == 0 or targets.ndim == 0 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"{fn}: inputs and targets of batch {i} must share their leading (batch) size, got "
                f"shapes {tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        return inputs, targets
    raise TypeError(
        f"{fn}: batches must yield (inputs, targets) pairs (a DataLoader's batches), got "
        f"{describe(batch)} at batch {i}"
    )


def fisher_diagonal(
    model: nn.Module | Forward,
    params: Params,
    batches: Iterable[Sequence[Tensor] | Tensor],
    *,
    log_likelihood: Callable[[Tensor, Tensor], Tensor] | None = None,
    labels: Literal["empirical", "sampled", "expected"] = "empirical",
    generator: torch.Generator | None = None,
    num_batches: int | None = None,
    chunk_size: int | None = 8,
    floor: float = 0.0,
    group: Group = None,
) -> dict[str, Tensor]:
    r"""The diagonal Fisher information of a model at ``params``, from per-sample gradients.

    .. math::

        F_k = \max\Big(\frac{1}{N} \sum_{n=1}^{N} \mathbb{E}_{y}\big[
            \big(\partial_{\theta_k} \log p_\theta(y \mid x_n)\big)^2\big],\ \text{floor}\Big)

    over the :math:`N` samples of ``batches``, for every tensor :math:`\theta_k` of ``params``.
    ``labels`` chooses the distribution of :math:`y`:

    - ``"empirical"`` (default, SPEC §8): the dataset's label :math:`y_n` -- the *empirical*
      Fisher, the mean squared per-sample gradient of the log-likelihood of the given targets;
    - ``"sampled"``: one :math:`y \sim p_\theta(\cdot \mid x_n)` per sample (the true Fisher,
      Monte Carlo; the WiSE-FT code's estimator), drawn with ``generator``;
    - ``"expected"``: the exact expectation :math:`\sum_c p_\theta(c \mid x_n)(\partial \log
      p_\theta(c \mid x_n))^2` (the true Fisher; the Fisher-merging code's estimator) -- ``C``
      per-sample gradients per sample, affordable for few classes only.

    Per-sample gradients come from :func:`torch.func.vmap` over :func:`torch.func.grad` of a
    :func:`torch.func.functional_call`, ``chunk_size`` samples at a time: peak memory is about
    ``chunk_size`` gradient-sized trees (``chunk_size * |params| * 4`` bytes; 8 x 86M
    parameters of a ViT-B/16 vision tower is 2.8 GB) plus the activations of ``chunk_size``
    samples. The model runs in **eval mode** (dropout off, BatchNorm on running statistics: the
    Fisher of the deployed model, and per-sample gradients that match a loop over samples); each
    submodule's mode is restored afterwards. Only ``params`` (any subset of the model's
    parameters and buffers, e.g. the visual tower's) are differentiated; the rest of the module
    is used as is and gets no gradient. ``params`` are read, never modified.

    Args:
        model: a ``torch.nn.Module`` returning outputs for a batch of inputs (for the default
            log-likelihood: logits ``[batch, classes]``), called as ``functional_call(model,
            params, (inputs,))``; or a callable ``(params, inputs) -> outputs`` for anything
            else, e.g. an open_clip model and a zero-shot head::

                lambda p, x: 100 * clip.image_features(model, p, x) @ head.T

        params: the tree at which the Fisher is taken, keyed like ``model.named_parameters()``
            (floating-point tensors; a subset is fine).
        batches: an iterable of ``(inputs, targets)`` pairs, e.g. a ``DataLoader``: ``inputs``
            ``[batch, ...]``, ``targets`` ``[batch, ...]`` (class indices of any integer dtype
            for the default log-likelihood). With ``labels="sampled"``/``"expected"`` the targets
            are not used and a batch may be the inputs tensor alone.
        log_likelihood: ``(outputs, targets) -> [batch]`` per-sample log-likelihoods; called on
            one sample at a time (a batch of one). ``None``: the categorical log-likelihood
            ``log_softmax(outputs)[targets]``. A per-sample loss (``-log p``, e.g.
            ``F.cross_entropy(..., reduction="none")``) gives the same Fisher: the gradient is
            squared. Only with ``labels="empirical"``.
        labels: ``"empirical"``, ``"sampled"`` or ``"expected"`` (see above).
        generator: the ``torch.Generator`` of the ``"sampled"`` labels (on the outputs'
            device), for a reproducible Fisher; ``None`` uses the global generator.
        num_batches: use at most this many batches (``None``: all of them).
        chunk_size: samples per ``vmap`` call (``None``: a whole batch at once).
        floor: the lower bound applied to every entry of the result (``>= 0``).
        group: under data parallelism, each rank passes its shard of the data; the sums and
            the sample count are all-reduced over ``group`` (``None``: the default group when
            one is initialised), so every rank returns the Fisher of the global data. Every
            rank reaches the same collectives, whatever its number of batches.

    Returns:
        A new tree with ``params``' keys and shapes in :func:`compute_dtype` of each tensor
        (float32 for bf16/fp16/float32 parameters, float64 for float64), on ``params``' devices.

    Raises:
        TypeError: a bad ``model``, ``params``, ``log_likelihood``, ``generator`` or
            ``group``, a batch that is not an ``(inputs, targets)`` pair of tensors, non-integer
            class labels, or outputs that are not ``[batch, classes]`` floating-point logits.
        ValueError: keys of ``params`` that ``model`` does not have, an unknown ``labels``, a
            ``log_likelihood`` or ``generator`` with a ``labels`` that does not use it, bad
            ``num_batches``/``chunk_size``/``floor``, class labels outside ``[0, classes)``, a
            ``log_likelihood`` that does not return one value per sample, or no samples at all.

    >>> model = torch.nn.Linear(2, 3, bias=False)
    >>> params = {"weight": torch.zeros(3, 2)}  # uniform predictions: p = 1/3 for every class
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 2])
    >>> fisher_diagonal(model, params, [(x, y)])["weight"]  # (1{c=y} - 1/3)^2 x^2, averaged
    tensor([[0.2222, 0.2222],
            [0.0556, 0.2222],
            [0.0556, 0.8889]])

    References:
        Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
        Code: https://github.com/mmatena/model_merging (``fisher.py``: the expected Fisher).
        Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022.
        Code: https://github.com/mlfoundations/wise-ft (``src/models/fisher.py``: sampled
        labels, one sample per step).
    """
    fn = "fisher_diagonal"
    check_floating_tree(fn, "params", params, hint=_HINT)
    if len(params) == 0:
        raise ValueError(f"{fn}: params must hold at least one tensor, got an empty tree")
    call, mode = _forward(fn, model, params)
    check_choice(fn, "labels", labels, _LABELS)
    if log_likelihood is not None and not callable(log_likelihood):
        raise TypeError(
            f"{fn}: log_likelihood must be None or a callable (outputs, targets) -> [batch], got "
            f"{describe(log_likelihood)}"
        )
    if log_likelihood is not None and labels != "empirical":
        raise ValueError(
            f"{fn}: log_likelihood is only used with labels='empirical' (sampled and expected "
            f"labels need the categorical model of the logits), got labels={labels!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be None or a torch.Generator, got {describe(generator)}"
        )
    if generator is not None and labels != "sampled":
        raise ValueError(
            f"{fn}: generator is only used with labels='sampled', got labels={labels!r}"
        )
    if num_batches is not None:
        num_batches = check_int(fn, "num_batches", num_batches, low=1)
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, low=1)
    floor = check_number(fn, "floor", floor, low=0.0)
    check_group(fn, group)
    if not isinstance(batches, Iterable) or isinstance(batches, (Tensor, Mapping, str)):
        raise TypeError(
            f"{fn}: batches must be an iterable of (inputs, targets) pairs (e.g. a DataLoader), "
            f"got {describe(batches)}"
        )

    default = log_likelihood is None
    ll = _categorical(fn) if default else _user(fn, log_likelihood)  # type: ignore[arg-type]
    point = {k: v.detach() for k, v in params.items()}
    acc = {
        k: torch.zeros(v.shape, dtype=compute_dtype(v), device=v.device) for k, v in point.items()
    }

    def sample(p: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = call(p, x.unsqueeze(0))
        return ll(out, y.unsqueeze(0)), out.detach() if isinstance(out, Tensor) else out

    per_sample = vmap(grad(sample, has_aux=True), in_dims=(None, 0, 0), randomness="different")

    def fold(x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        grads, outs = per_sample(point, x, y)
        for k, g in grads.items():
            sq = g.to(acc[k].dtype).square()
            if weight is not None:
                sq.mul_(weight.to(sq.dtype).view((-1,) + (1,) * (sq.ndim - 1)))
            acc[k].add_(sq.sum(0))
        return outs

    count = 0
    with torch.no_grad(), mode, full_precision(*point.values()):
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            inputs, targets = _split(fn, i, batch, need_targets=labels == "empirical")
            if default and targets is not None and labels == "empirical":
                targets = check_labels(fn, f"targets of batch {i}", targets)
            n = inputs.shape[0]
            step = n if chunk_size is None else chunk_size
            for s in range(0, n, max(step, 1)):
                x = inputs[s : s + step]
                if labels == "empirical":
                    y = targets[s : s + step]  # type: ignore[index]
                    outs = fold(x, y, None)
                    if default:
                        classes = outs.shape[-1]
                        if bool((y < 0).any()) or bool((y >= classes).any()):
                            raise ValueError(
                                f"{fn}: targets of batch {i} must be class indices in "
                                f"[0, {classes}) for the default log-likelihood, got values "
                                f"outside it"
                            )
                    continue
                logits = _check_logits(fn, call(point, x), "with labels=" + repr(labels))
                probs = torch.softmax(logits.to(compute_dtype(logits)), dim=-1)
                if labels == "sampled":
                    if generator is not None and generator.device != probs.device:
                        raise ValueError(
                            f"{fn}: generator must be on the outputs' device {probs.device}, "
                            f"got a generator on {generator.device}"
                        )
                    y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                    fold(x, y, None)
                else:
                    for c in range(probs.shape[-1]):
                        y = torch.full((x.shape[0],), c, dtype=torch.int64, device=probs.device)
                        fold(x, y, probs[:, c])
            count += n
        device = next(iter(acc.values())).device
        total = all_reduce_sum(
            torch.tensor(float(count), dtype=torch.float64, device=device), group
        )
        if float(total) == 0:
            raise ValueError(f"{fn}: batches must yield at least one sample, got none")
        out = {}
        for k, a in acc.items():
            f = all_reduce_sum(a, group).div_(float(total))
            out[k] = f.clamp_min_(floor) if floor > 0 else f
    return out


# ------------------------------------------------------------------ fisher_merge


def _check_weights(fn: str, weights: object, n: int | None) -> list[float] | None:
    """``None``, or the weights normalised to sum 1 (checked against ``n`` when it is known)."""
    if weights is None:
        return None
    if isinstance(weights, (Mapping, str, Tensor)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"{fn}: weights must be None or a sequence of non-negative numbers, got "
            f"{describe(weights)}"
        )
    if n is not None and len(weights) != n:
        raise ValueError(
            f"{fn}: weights must have one entry per candidate ({n}), got {len(weights)}"
        )
    w = [check_number(fn, f"weights[{i}]", v, low=0.0) for i, v in enumerate(weights)]
    total = math.fsum(w)
    if not total > 0:
        raise ValueError(f"{fn}: weights must have a positive sum, got {list(weights)!r}")
    return [v / total for v in w]


class _Fishers:
    """The Fisher trees, read in step with the candidates (a sequence or a one-shot iterable)."""

    def __init__(self, fn: str, fishers: object, n: int | None) -> None:
        if isinstance(fishers, (Mapping, str, bytes, Tensor)) or not isinstance(fishers, Iterable):
            raise TypeError(
                f"{fn}: fishers must be an iterable of parameter trees, one per candidate (a "
                f"list, a generator or merging.lazy(load, sources)), got {describe(fishers)}"
            )
        if n is not None and isinstance(fishers, Sized) and len(fishers) != n:
            raise ValueError(
                f"{fn}: fishers must hold one Fisher tree per candidate ({n}), got {len(fishers)}"
            )
        self.fn, self.n = fn, n
        self.seq = fishers if isinstance(fishers, Sequence) else None
        self.it: Iterator[Params] | None = None if self.seq is not None else iter(fishers)

    def get(self, i: int, like: Params) -> Params:
        fn = self.fn
        if self.seq is not None:
            f = self.seq[i] if i < len(self.seq) else None
        else:
            assert self.it is not None
            f = next(self.it, None)
        if f is None:
            raise ValueError(f"{fn}: fishers must hold one Fisher tree per candidate, got {i}")
        check_floating_tree(fn, f"fishers[{i}]", f)
        tree.check_same_structure(
            like, f, what=fn, names=(f"candidates[{i}]", f"fishers[{i}]"), dtypes=False
        )
        bad = [k for k, v in f.items() if not bool(torch.all((v >= 0) & (v < math.inf)))]
        if bad:
            raise ValueError(
                f"{fn}: fishers[{i}] must hold finite non-negative values, got negative, NaN or "
                f"infinite entries at keys {fmt_keys(bad)}"
            )
        return f

    def finish(self, n: int) -> None:
        if self.seq is not None:
            extra = len(self.seq) > n
        else:
            assert self.it is not None
            extra = next(self.it, None) is not None
        if extra:
            raise ValueError(
                f"{self.fn}: fishers must hold one Fisher tree per candidate ({n}), got more"
            )


def fisher_merge(
    candidates: Iterable[Params],
    *,
    fishers: Iterable[Params],
    weights: Sequence[float] | None = None,
    floor: float = 1e-8,
    normalize: bool = False,
) -> dict[str, Tensor]:
    r"""Fisher-weighted averaging: each entry averaged with its candidates' Fisher information.

    .. math::

        \theta_j = \frac{\sum_{i=1}^{N} c_i\, \tilde F_{i,j}\, \theta_{i,j}}
                        {\sum_{i=1}^{N} c_i\, \tilde F_{i,j}}, \qquad
        \tilde F_{i,j} = \max(F_{i,j}, \text{floor}), \qquad
        c_i = \frac{w_i}{\sum_l w_l} \Big/ \big(\lVert F_i \rVert_2 \text{ if normalize}\big)

    elementwise, for every tensor, with :math:`F_i` the diagonal Fisher of candidate
    :math:`\theta_i` (:func:`fisher_diagonal`) and :math:`w_i` its weight. Where the
    denominator is 0 (every weighted Fisher is 0: possible with ``floor=0``) the entry falls back
    to the weighted mean :math:`\sum_i w_i \theta_{i,j} / \sum_i w_i`; with ``floor > 0`` the
    floor already turns entries without information into that mean. Equal Fishers give the
    weighted mean; a single candidate (or a single positive weight) is returned exactly.

    **Fisher-weighted WiSE-FT**: the zero-shot and the fine-tuned model with weights
    :math:`(1 - \alpha, \alpha)` -- ``fisher_merge([theta0, theta_ft], fishers=[f0, f_ft],
    weights=[1 - alpha, alpha])`` -- is :func:`wise` with each entry's :math:`\alpha` tilted
    toward the model that is more certain of it (plain ``wise`` when the Fishers are equal).

    The floor follows the authors' code: the WiSE-FT code applies ``max(F, floor)`` to both
    models with ``floor = 1e-8`` (our default); the Fisher-merging code defaults to
    ``fisher_floor=1e-6`` on the first ("target") model only and divides each model's weight by
    the L2 norm of its whole Fisher (``normalize_fishers``: here ``normalize=True``; a Fisher
    that is all zero is left unnormalised).

    Streamed like every merge: candidates and Fishers are read once, in step, as a list, a
    generator or :func:`lazy`, and each pair is dropped before the next is loaded; besides them
    two accumulator trees are alive (three with ``floor=0``, ``normalize=True`` or a floor too
    small for the compute dtype: the fallback mean), in at least float32, and the result is
    returned in the candidates' dtype. Eager: each Fisher's values are checked (finite,
    non-negative) as it arrives.

    Args:
        candidates: ``N >= 1`` trees with the same keys, shapes and floating dtypes (e.g. the
            zero-shot and the fine-tuned model, or models fine-tuned on different tasks).
        fishers: keyword-only, one Fisher tree per candidate, in the same order: the same keys
            and shapes as the candidates (any floating dtype, e.g. float32 for bf16 models),
            finite and non-negative.
        weights: ``N`` non-negative numbers with a positive sum (normalised here), e.g.
            ``[1 - alpha, alpha]``; ``None``: equal weights.
        floor: the lower bound of every Fisher entry (``>= 0``; the WiSE-FT code's ``1e-8``).
        normalize: divide each candidate's weight by the global L2 norm of its Fisher.

    Returns:
        A new tree (inputs untouched) with the candidates' keys, shapes and dtypes.

    Raises:
        TypeError: non-iterable ``candidates``/``fishers``, a non-sequence ``weights``,
            non-floating trees, candidates of different dtypes, a non-number weight or floor, a
            non-bool ``normalize``, or ``fishers`` passed positionally.
        ValueError: no candidates, a different number of Fishers or weights, mismatched keys or
            shapes, negative, NaN or infinite Fisher entries, negative or non-finite weights or
            a zero weight sum, a negative or non-finite floor.

    >>> theta0 = {"w": torch.tensor([0.0, 0.0])}  # zero-shot
    >>> theta_ft = {"w": torch.tensor([1.0, 1.0])}  # fine-tuned
    >>> f0 = {"w": torch.tensor([1.0, 3.0])}  # the zero-shot model is surer of the second entry
    >>> f_ft = {"w": torch.tensor([1.0, 1.0])}
    >>> fisher_merge([theta0, theta_ft], fishers=[f0, f_ft], weights=[0.5, 0.5])  # Fisher WiSE-FT
    {'w': tensor([0.5000, 0.2500])}

    References:
        Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
        Code: https://github.com/mmatena/model_merging (``merging.py``).
        Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (Fisher-weighted
        WiSE-FT). Code: https://github.com/mlfoundations/wise-ft
    """
    fn = "fisher_merge"
    stream = Stream(fn, candidates)
    n = len(candidates) if isinstance(candidates, Sized) else None
    source = _Fishers(fn, fishers, n)
    w = _check_weights(fn, weights, n)
    floor = check_number(fn, "floor", floor, low=0.0)
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: normalize must be a bool, got {describe(normalize)}")
    live = None if w is None else [i for i, v in enumerate(w) if v > 0]
    only = live[0] if live is not None and len(live) == 1 else (0 if n == 1 else None)
    out: dict[str, Tensor] = {}
    acc: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    dtypes: dict[str, torch.dtype] = {}

    def visit(i: int, c: Params) -> None:
        f = source.get(i, c)
        if w is not None and i >= len(w):
            raise ValueError(f"{fn}: weights must have one entry per candidate, got {len(w)}")
        wi = 1.0 if w is None else w[i]
        if i == 0:
            dtypes.update((k, v.dtype) for k, v in c.items())
        if only is not None:
            if i == only:
                out.update((k, v.detach().clone()) for k, v in c.items())
            return
        if wi == 0:
            return
        coef = wi
        if normalize:
            norm = float(tree.norm(f))
            coef = wi / norm if norm > 0 else wi
        for k, theta in c.items():
            if k not in acc:
                dtype = compute_dtype(theta, f[k])
                # den >= floor * max_i c_i >= floor / N with normalised weights: the floor keeps
                # it positive unless it is too small for the dtype (or normalize rescales c_i)
                fallback = normalize or not (floor >= torch.finfo(dtype).tiny * 2**24)
                num = torch.zeros(theta.shape, dtype=dtype, device=theta.device)
                acc[k] = (num, torch.zeros_like(num), torch.zeros_like(num) if fallback else None)
            num, den, mean = acc[k]
            t = theta.detach().to(device=num.device, dtype=num.dtype)
            weighted = torch.clamp_min(f[k].detach().to(num.device, num.dtype), floor).mul_(coef)
            den.add_(weighted)
            num.addcmul_(weighted, t)
            if mean is not None:
                mean.add_(t, alpha=wi)

    with torch.no_grad():
        count = stream.each(visit)
        source.finish(count)
        if w is not None and len(w) != count:
            raise ValueError(
                f"{fn}: weights must have one entry per candidate ({count}), got {len(w)}"
            )
        if only is not None:
            return out
        total = 1.0 if w is not None else float(count)  # the weights' sum (normalised: 1)
        for k in list(acc):
            num, den, mean = acc.pop(k)
            if mean is None:
                merged = num.div_(den)
            else:
                merged = torch.where(
                    den > 0, num / torch.where(den > 0, den, 1.0), mean.div_(total)
                )
            out[k] = merged.to(dtypes[k])
    return out
