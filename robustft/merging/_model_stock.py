r"""Model Stock: per-tensor interpolation towards the candidates' mean (Jang et al., ECCV 2024)."""

from __future__ import annotations

from collections.abc import Iterable, Sized

import torch
from torch import Tensor

from robustft._checks import check_floating_tree
from robustft._numerics import plain_tensor
from robustft.merging._stream import Deltas, Stream, apply_delta
from robustft.typing import Params

__all__ = ["model_stock"]


def model_stock(candidates: Iterable[Params], *, anchor: Params) -> dict[str, Tensor]:
    r"""Model Stock: move from the anchor towards the candidates' mean by their angle, per tensor.

    For every tensor, with task vectors :math:`\tau_i = \theta_i - \theta_0`:

    .. math::

        \cos\phi = \frac{2}{N(N-1)} \sum_{i<j} \frac{\langle \tau_i, \tau_j\rangle}
            {\|\tau_i\|\,\|\tau_j\|}, \qquad
        t = \frac{N \cos\phi}{1 + (N-1)\cos\phi}, \qquad
        \theta = t\,\frac{1}{N}\sum_{i=1}^{N}\theta_i + (1 - t)\,\theta_0 .

    Nearly orthogonal task vectors (:math:`\cos\phi \approx 0`) stay near the anchor; parallel
    ones (:math:`\cos\phi = 1`, e.g. identical candidates) give the plain mean. Computed as
    :math:`\theta_0 + t\cdot\frac1N\sum_i\tau_i` in at least float32, returned in the anchor's
    dtypes.

    Edge cases (documented choices): a task vector that is zero on a tensor has no direction,
    and its cosines with the others count as 0 (what ``torch.nn.functional.cosine_similarity``
    gives; the official code divides by :math:`\|\tau_i\|\|\tau_j\| + 10^{-8}`, the same at
    0). So a tensor that no candidate changed (a frozen layer) gives :math:`t = 0` and stays
    :math:`\theta_0`, which is also the mean. :math:`t` is not clipped: a negative mean cosine
    gives :math:`t < 0`. When the normalised task vectors cancel (:math:`1 + (N-1)\cos\phi = 0`,
    e.g. two opposite task vectors, which a one-element tensor such as ``logit_scale`` gives
    whenever two candidates moved it in opposite directions) the formula divides by 0; we return
    :math:`\theta_0` for that tensor (:math:`t = 0`) whenever :math:`1 + (N-1)\cos\phi \le
    \sqrt{\epsilon}` of the compute dtype (``3.5e-4`` in float32), so that rounding near the
    pole cannot extrapolate by :math:`|t| \sim 10^{7}`.

    Streaming: one pass, each candidate read once (a list, a generator or :func:`lazy`); besides
    the anchor and the current candidate, two accumulator trees (the sums of :math:`\tau_i` and
    of :math:`\tau_i / \|\tau_i\|`) and one buffer of the largest tensor's size are alive. The
    mean pairwise cosine comes from :math:`\|\sum_i u_i\|^2 - \sum_i \|u_i\|^2 = 2\sum_{i<j}
    \langle u_i, u_j\rangle` with :math:`u_i = \tau_i / \|\tau_i\|`, so no pair is revisited.
    Works on ``DTensor`` trees (the norms are global). Computed under ``torch.no_grad``.

    Args:
        candidates: :math:`\theta_1, \dots, \theta_N`, ``N >= 2`` fine-tuned trees with the
            anchor's keys, shapes and dtypes (the paper uses 2, fine-tuned from the same
            pre-trained weights with different seeds).
        anchor: :math:`\theta_0`, the pre-trained tree, keyword-only.

    Returns:
        A new tree with the anchor's keys, shapes and dtypes.

    Raises:
        TypeError: a non-iterable ``candidates``, non-floating or mismatched dtypes.
        ValueError: fewer than 2 candidates, different keys or shapes.

    >>> theta0 = {"w": torch.tensor([0.0, 0.0])}
    >>> model_stock([{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}], anchor=theta0)
    {'w': tensor([0., 0.])}
    >>> model_stock([{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0])}], anchor=theta0)
    {'w': tensor([2., 2.])}

    References:
        Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
        Code: https://github.com/naver-ai/model-stock
    """
    fn = "model_stock"
    check_floating_tree(fn, "anchor", anchor)
    stream = Stream(fn, candidates, anchor=anchor)
    if isinstance(candidates, Sized) and len(candidates) < 2:
        raise ValueError(
            f"{fn}: candidates must hold at least 2 trees (N >= 2), got {len(candidates)}"
        )
    total: dict[str, Tensor] = {}  # sum of tau_i
    units: dict[str, Tensor] = {}  # sum of tau_i / |tau_i|
    unit_sq: dict[str, Tensor] = {}  # sum of |u_i|^2 (1 per non-zero tau_i)
    deltas = Deltas()

    def sq_norm(x: Tensor) -> Tensor:  # a sum of squares (no norm-then-square rounding)
        if not plain_tensor(x):  # DTensor: an unevenly sharded tensor cannot be flattened
            return (x * x).sum()
        flat = x.reshape(-1)
        return flat @ flat

    def visit(i: int, c: Params) -> None:
        for k, a in anchor.items():
            d = deltas.of(c[k], a)  # a reused buffer: rewritten in place below
            if k in total:
                total[k].add_(d)
            else:
                total[k] = d.clone()
            norm = torch.linalg.vector_norm(d)
            # u = d / |d|, a division (x / |x| is exactly +-1); a zero d stays 0 (divided by 1)
            u = d.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
            if k in units:
                units[k].add_(u)
                unit_sq[k] += sq_norm(u)
            else:
                units[k] = u.clone()
                unit_sq[k] = sq_norm(u)

    with torch.no_grad():
        n = stream.each(visit)
        if n < 2:
            raise ValueError(f"{fn}: candidates must hold at least 2 trees (N >= 2), got {n}")
        t: dict[str, Tensor] = {}
        for k in anchor:
            u = units.pop(k)
            sq = sq_norm(u)
            cos = (sq - unit_sq.pop(k)) / (n * (n - 1))
            den = 1 + (n - 1) * cos
            ok = den > torch.finfo(den.dtype).eps ** 0.5
            safe = torch.where(ok, den, torch.ones_like(den))
            t[k] = torch.where(ok, n * cos / safe, torch.zeros_like(cos)) / n
            del u
        return apply_delta(anchor, total, t)
