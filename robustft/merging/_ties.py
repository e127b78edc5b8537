r"""TIES-merging: trim, elect sign, disjoint mean (Yadav et al., NeurIPS 2023), streamed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from robustft._checks import (
    check_choice,
    check_floating_tree,
    check_number,
    check_per_tensor_scalar,
    describe,
    fmt_keys,
)
from robustft._numerics import compute_dtype, plain_tensor
from robustft.merging._stream import Stream, apply_delta, chunks
from robustft.typing import Params, PerTensor, Scalar

__all__ = ["ties"]

_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def kept_count(density: float, n: int) -> int:
    r""":math:`k = \lceil \mathrm{density} \cdot n \rceil` clamped to ``[1, n]`` (``n >= 1``).

    The product is rounded down by a relative 1e-12 first, so ``0.2 * 10`` (or a
    ``2.0000000000000004``) counts as exactly 2.
    """
    k = math.ceil(density * n * (1.0 - 1e-12))
    return min(max(k, 1), n)


def kth_largest_magnitude(x: Tensor, k: int) -> float:
    """The exact ``k``-th largest ``|x|`` of a 1-d contiguous float32/float64 tensor (``k >= 1``).

    A radix select on the magnitudes' bit patterns (for non-negative floats the integer order is
    the float order): 16 bits per level, one histogram pass per level (2 for float32, 4 for
    float64), in chunks, so the extra memory is a few chunks -- never a sorted copy -- and the
    time a few elementwise passes (``torch.kthvalue`` copies the input and is ~10x slower on
    CPU for 150M elements).
    """
    int_dtype = _INT[x.dtype]
    bits = 32 if int_dtype == torch.int32 else 64
    sign_off = (1 << (bits - 1)) - 1
    prefix, rank = 0, k
    for level, shift in enumerate(range(bits - 16, -1, -16)):
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=x.device)
        for lo, hi in chunks(x.numel()):
            m = x[lo:hi].view(int_dtype) & sign_off
            if level:
                m = m[(m >> (shift + 16)) == prefix]
            digit = m >> shift
            if level:
                digit &= 0xFFFF
            hist += torch.bincount(digit, minlength=1 << 16)
        # the digit d holding the rank-th largest: the largest d with sum(hist[d:]) >= rank,
        # i.e. with below(d) = cum[d - 1] <= total - rank
        cum = hist.cumsum_(0)
        total = int(cum[-1])
        d = int(torch.searchsorted(cum, torch.tensor(total - rank, device=x.device), right=True))
        above = total - int(cum[d])
        rank -= above
        prefix = (prefix << 16) | d
    return float(torch.tensor(prefix, dtype=int_dtype).view(x.dtype))


def _count_dtype(n: int) -> torch.dtype:
    if n <= 255:
        return torch.uint8
    return torch.int16 if n <= 32767 else torch.int32


def ties(
    candidates: Sequence[Params],
    *,
    anchor: Params,
    density: Scalar = 0.2,
    scale: PerTensor[Scalar] = 1.0,
    trim: str = "global",
) -> dict[str, Tensor]:
    r"""TIES-merging: trim each task vector, elect a sign per entry, average the agreeing entries.

    With task vectors :math:`\tau_i = \theta_i - \theta_0`:

    1. **Trim**: :math:`\hat\tau_i` keeps the entries of :math:`\tau_i` whose magnitude is at
       least the :math:`k`-th largest, :math:`k = \lceil \mathrm{density}\cdot n\rceil`, over the
       whole tree flattened (``trim="global"``, the official code) or per tensor
       (``trim="per_tensor"``); the others become 0. Entries tied with the threshold are all
       kept (the official ``>=``).
    2. **Elect**: :math:`\gamma = \mathrm{sign}(\sum_i \hat\tau_i)` per entry; where the sum is
       exactly 0, :math:`\gamma` is the sign held by more entries of the whole tree (the
       official "majority" rule).
    3. **Disjoint mean** and scale:

    .. math::

        \tau_m = \frac{\sum_i \hat\tau_i\,[\mathrm{sign}(\hat\tau_i) = \gamma]}
            {\max\big(1, \sum_i [\mathrm{sign}(\hat\tau_i) = \gamma,\ \hat\tau_i \ne 0]\big)},
        \qquad \theta = \theta_0 + \lambda\,\tau_m .

    An entry with no agreeing non-zero entry gives 0. Difference from the official code: it keeps
    :math:`|\tau| \ge` the :math:`(\lfloor \mathrm{density}\cdot n\rfloor + 1)`-th largest
    magnitude, which is ours whenever :math:`\mathrm{density}\cdot n` is not an integer and
    one entry (and its ties) more when it is; ``density=1`` keeps everything (the official
    ``kthvalue(0)`` fails).

    The threshold is exact (a radix select on the magnitudes' bits, no sampling). Streaming, two
    passes: pass 1 loads each candidate, writes :math:`\tau_i` into one flat buffer (a tree's
    worth, in the compute dtype), finds its threshold and adds :math:`\hat\tau_i` to a running
    sum; the signs are then kept as int8. Pass 2 loads each candidate again and accumulates the
    agreeing entries and their count (uint8 for fewer than 256 candidates). Besides the anchor
    and the current candidate, at most about 2.5 trees are alive (``tau`` buffer + sum, then
    ``tau`` buffer + signs + agreeing sum + counts), whatever ``N``; the output is one more,
    after the buffers are freed. ``candidates`` must therefore be a sequence (a list or
    :func:`lazy`, which loads each candidate twice), not a one-shot iterator. Eager, under
    ``torch.no_grad``; plain tensors on one device.

    Args:
        candidates: :math:`\theta_1, \dots, \theta_N` (``N >= 1``), fine-tuned trees with the
            anchor's keys, shapes and dtypes.
        anchor: :math:`\theta_0`, the pre-trained tree, keyword-only.
        density: the fraction of entries kept, in ``(0, 1]`` (the paper's :math:`k = 20\%`).
        scale: :math:`\lambda`, a finite number, 0-d floating tensor or a dict of them with the
            anchor's keys (the paper uses 1 for the disjoint mean, tuned in ``[0.8, 1.8]``).
        trim: ``"global"`` (top-k over the whole tree, as the official code) or
            ``"per_tensor"`` (top-k within each tensor).

    Returns:
        A new tree with the anchor's keys, shapes and dtypes.

    Raises:
        TypeError: ``candidates`` not a sequence of floating trees, mismatched dtypes, sharded
            (``DTensor``) tensors, a bad ``density``/``scale``/``trim`` type.
        ValueError: no candidates, different keys or shapes, ``density`` outside ``(0, 1]``,
            an unknown ``trim``, tensors on several devices.

    >>> theta0 = {"w": torch.zeros(4)}
    >>> cands = [{"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}, {"w": torch.tensor([1.0, 2.0, -4.0, 0.1])}]
    >>> ties(cands, anchor=theta0, density=0.5)  # keeps {3, 2} and {-4, 2}: signs +, +, -, +
    {'w': tensor([ 3.,  2., -4.,  2.])}

    References:
        Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
        Code: https://github.com/prateeky2806/ties-merging
    """
    fn = "ties"
    check_floating_tree(fn, "anchor", anchor)
    stream = Stream(fn, candidates, anchor=anchor, passes=2)
    dens = check_number(fn, "density", density, low=0.0, high=1.0, low_inclusive=False)
    if not isinstance(trim, str):
        raise TypeError(f"{fn}: trim must be one of 'global', 'per_tensor', got {describe(trim)}")
    check_choice(fn, "trim", trim, ("global", "per_tensor"))
    lam = check_per_tensor_scalar(fn, "scale", scale, list(anchor))
    sharded = [k for k, v in anchor.items() if not plain_tensor(v)]
    if sharded:
        raise TypeError(
            f"{fn}: anchor must hold plain tensors (not DTensor or other subclasses): the global "
            f"top-k needs whole tensors, got {type(anchor[sharded[0]]).__name__} at keys "
            f"{fmt_keys(sharded)}; gather them with .full_tensor() first"
        )
    devices = sorted({str(v.device) for v in anchor.values()})
    if len(devices) > 1:
        raise ValueError(f"{fn}: anchor must be on one device, got tensors on {devices}")
    device = anchor[next(iter(anchor))].device if anchor else torch.device("cpu")
    acc = compute_dtype(*anchor.values())
    spans: dict[str, tuple[int, int]] = {}
    total = 0
    for k, a in anchor.items():
        spans[k] = (total, total + a.numel())
        total += a.numel()
    if trim == "global":
        segments = [(0, total, kept_count(dens, total))] if total else []
    else:
        segments = [(lo, hi, kept_count(dens, hi - lo)) for lo, hi in spans.values() if hi > lo]
    tiny = float(torch.nextafter(torch.zeros((), dtype=acc), torch.ones((), dtype=acc)))

    # the buffers live in a dict so that each can be freed as soon as its pass is over
    buf: dict[str, Tensor] = {}

    def fill(c: Params) -> Tensor:
        tau = buf["tau"]
        for k, a in anchor.items():
            lo, hi = spans[k]
            v, ck = tau[lo:hi].view(a.shape), c[k]
            if ck.dtype == acc and a.dtype == acc:
                torch.sub(ck, a, out=v)
            else:
                v.copy_(ck)
                v.sub_(a)
        return tau

    thresholds: list[list[float]] = []

    def trim_and_sum(i: int, c: Params) -> None:
        tau, summed = fill(c), buf["sum"]
        ts = []
        for lo, hi, k in segments:
            t = kth_largest_magnitude(tau[lo:hi], k)
            ts.append(t)
            for a, b in chunks(hi - lo):
                x = tau[lo + a : lo + b]
                x.masked_fill_(x.abs() < t, 0)
                summed[lo + a : lo + b].add_(x)
        thresholds.append(ts)

    def disjoint_sum(i: int, c: Params) -> None:
        tau, sign, merged, count = fill(c), buf["sign"], buf["merged"], buf["count"]
        for (lo, hi, _), t in zip(segments, thresholds[i]):
            floor = t if t > 0 else tiny  # agree: tau * sign >= t and > 0
            for a, b in chunks(hi - lo):
                x = tau[lo + a : lo + b]
                agree = x * sign[lo + a : lo + b] >= floor
                merged[lo + a : lo + b].add_(torch.where(agree, x, 0.0))
                count[lo + a : lo + b].add_(agree)

    with torch.no_grad():
        buf["tau"] = torch.empty(total, dtype=acc, device=device)
        buf["sum"] = torch.zeros(total, dtype=acc, device=device)
        n = stream.each(trim_and_sum)
        summed = buf.pop("sum")
        sign = buf["sign"] = torch.empty(total, dtype=torch.int8, device=device)
        for lo, hi in chunks(total):
            sign[lo:hi].copy_(torch.sign(summed[lo:hi]))
        del summed
        votes = torch.zeros((), dtype=torch.int64, device=device)
        for lo, hi in chunks(total):  # a whole-buffer int64 sum would widen a copy of it first
            votes += sign[lo:hi].sum(dtype=torch.int64)
        majority = torch.sign(votes).to(torch.int8)
        for lo, hi in chunks(total):
            s = sign[lo:hi]
            s.masked_fill_(s == 0, majority)
        del sign
        merged = buf["merged"] = torch.zeros(total, dtype=acc, device=device)
        buf["count"] = torch.zeros(total, dtype=_count_dtype(n), device=device)
        stream.each(disjoint_sum)
        count = buf.pop("count")
        buf.clear()  # tau and sign
        for lo, hi in chunks(total):
            merged[lo:hi].div_(count[lo:hi].clamp(min=1))
        del count
        delta = {k: merged[lo:hi].view(anchor[k].shape) for k, (lo, hi) in spans.items()}
        return apply_delta(anchor, delta, lam, fresh=True)
