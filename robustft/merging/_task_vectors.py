r"""Task vectors and task arithmetic: :math:`\theta_0 + \lambda \sum_i (\theta_i - \theta_0)`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import check_floating_tree, check_per_tensor_scalar
from robustft.merging._stream import Deltas, Stream, apply_delta
from robustft.typing import Params, PerTensor, Scalar

__all__ = ["task_arithmetic", "task_vector"]


def task_vector(params: Params, *, anchor: Params) -> dict[str, Tensor]:
    r"""The task vector of a fine-tuned tree: its difference from the pre-trained weights.

    .. math:: \tau = \theta - \theta_0

    Args:
        params: :math:`\theta`, the fine-tuned tree of floating-point tensors.
        anchor: :math:`\theta_0`, the pre-trained tree, keyword-only (same keys, shapes, dtypes).

    Returns:
        A new tree with ``params``' keys, shapes and dtypes (differentiable in both).

    Raises:
        TypeError: non-trees, non-floating tensors, differing dtypes, ``anchor`` positional.
        ValueError: different keys or shapes.

    >>> task_vector({"w": torch.tensor([3.0, 1.0])}, anchor={"w": torch.tensor([1.0, 1.0])})
    {'w': tensor([2., 0.])}

    References:
        Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
        Code: https://github.com/mlfoundations/task_vectors
    """
    check_floating_tree("task_vector", "params", params)
    check_floating_tree("task_vector", "anchor", anchor)
    tree.check_same_structure(anchor, params, what="task_vector", names=("anchor", "params"))
    out = tree.sub(params, anchor)
    return {k: out[k] for k in params}


def task_arithmetic(
    candidates: Iterable[Params], *, anchor: Params, scale: PerTensor[Scalar] = 1.0
) -> dict[str, Tensor]:
    r"""Task arithmetic: add the scaled sum of the candidates' task vectors to the anchor.

    .. math:: \theta = \theta_0 + \lambda \sum_{i=1}^{N} (\theta_i - \theta_0)

    with one :math:`\lambda` for every tensor or one per tensor (e.g. a LiNeS schedule from
    :func:`depth_schedule`). The sum of task vectors is accumulated in at least float32 (each
    difference :math:`\theta_i - \theta_0` is formed in that dtype too, never rounded to bf16),
    and the result is returned in the anchor's dtypes.

    Streaming: each candidate is read once, as it arrives, and dropped before the next is loaded;
    besides the anchor and that candidate, one accumulator tree (in the compute dtype) and one
    buffer of the largest tensor's size are alive. ``candidates`` may be a list, a generator or
    :func:`lazy`. Computed under ``torch.no_grad`` (a post-hoc merge).

    Args:
        candidates: :math:`\theta_1, \dots, \theta_N` (``N >= 1``), fine-tuned trees with the
            anchor's keys, shapes and dtypes.
        anchor: :math:`\theta_0`, the pre-trained tree, keyword-only.
        scale: :math:`\lambda`, a finite number, a 0-d floating tensor, or a dict of them with the
            anchor's keys. The paper tunes it on validation data (about 0.3--0.5 for 8 tasks);
            ``1/N`` gives the uniform soup.

    Returns:
        A new tree with the anchor's keys, shapes and dtypes.

    Raises:
        TypeError: a non-iterable ``candidates``, non-floating or mismatched dtypes, a bad
            ``scale``.
        ValueError: no candidates, different keys or shapes, a non-finite ``scale`` or a dict
            with other keys.

    >>> theta0 = {"w": torch.tensor([1.0, 1.0])}
    >>> cands = [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([1.0, 3.0])}]
    >>> task_arithmetic(cands, anchor=theta0, scale=0.5)
    {'w': tensor([1.5000, 2.0000])}

    References:
        Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
        Code: https://github.com/mlfoundations/task_vectors
    """
    fn = "task_arithmetic"
    check_floating_tree(fn, "anchor", anchor)
    stream = Stream(fn, candidates, anchor=anchor)
    lam = check_per_tensor_scalar(fn, "scale", scale, list(anchor))
    total: dict[str, Tensor] = {}
    deltas = Deltas()

    def visit(i: int, c: Params) -> None:
        for k, a in anchor.items():
            if k in total:
                total[k].add_(deltas.of(c[k], a))
            else:
                total[k] = deltas.of(c[k], a, fresh=True)

    with torch.no_grad():
        stream.each(visit)
        return apply_delta(anchor, total, lam)
