"""Streaming evaluation: collect logits, labels and scores batch by batch, then every metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from robustft import scores as _scores
from robustft._checks import check_choice, check_floating, check_int, check_number, describe
from robustft.distributed import all_gather_cat, is_distributed
from robustft.metrics._classification import accuracy, ece, nll
from robustft.metrics._open_set import open_set
from robustft.metrics._ranking import auroc, fpr_at_tpr
from robustft.metrics._validate import check_logits_labels, check_threshold, metric_dtype
from robustft.typing import Scalar

__all__ = ["Evaluation", "EvaluationResult"]

_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "msp": _scores.msp,
    "max_logit": _scores.max_logit,
    "energy": _scores.energy,
    "entropy_score": _scores.entropy_score,
}


class EvaluationResult(NamedTuple):
    """Every metric of an :class:`Evaluation`; a field is ``None`` where it is undefined.

    Tensors are 0-d, in at least float32.

    Attributes:
        accuracy: top-1 accuracy on the known-class samples (:func:`accuracy`); ``None`` without
            known-class samples.
        nll: mean cross-entropy on the known-class samples (:func:`nll`).
        ece: expected calibration error on the known-class samples (:func:`ece`).
        auroc: AUROC of the score with known-class samples as positives (:func:`auroc`);
            ``None`` unless both known- and unknown-class samples are present.
        fpr_at_tpr: fraction of unknown-class samples accepted at the threshold that accepts
            ``tpr`` of the known ones (:func:`fpr_at_tpr`); ``None`` like ``auroc``.
        os_star: OS* (:func:`open_set`); ``None`` without a threshold or like ``auroc``.
        unk: UNK (:func:`open_set`); ``None`` like ``os_star``.
        hos: HOS (:func:`open_set`); ``None`` like ``os_star``.
        num_known: number of known-class samples (over every rank of the group).
        num_unknown: number of unknown-class samples (over every rank of the group).
    """

    accuracy: Tensor | None
    nll: Tensor | None
    ece: Tensor | None
    auroc: Tensor | None
    fpr_at_tpr: Tensor | None
    os_star: Tensor | None
    unk: Tensor | None
    hos: Tensor | None
    num_known: int
    num_unknown: int


def _comm_device(group: Any, fallback: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors; gloo (and others) take the tensors where they are."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


class Evaluation:
    """Streaming evaluation over a loader: accuracy, NLL, ECE, AUROC, FPR@TPR and open-set scores.

    Call :meth:`update` once per batch with the model's logits over the :math:`C` known classes
    and the labels (any label outside ``[0, C)``, e.g. ``-1``, marks an unknown-class sample),
    then :meth:`compute` once. The batches are detached and kept on ``device`` (CPU by default,
    so GPU memory stays free); per-sample OOD scores are computed batch by batch with ``score``
    unless you pass your own (e.g. :func:`robustft.scores.mcm` from CLIP features).

    With a ``group``, :meth:`compute` all-gathers every rank's samples (uneven numbers allowed)
    before computing, so each rank gets the metrics of the whole evaluation set, equal to one
    process seeing all of it. It is a collective: every rank of the group must call it. Mind that
    ``torch.utils.data.DistributedSampler`` pads the dataset with repeated samples to even the
    ranks out, which then count twice. ``group=None`` never communicates, even when a process
    group is initialised (so rank-0-only evaluation cannot hang); pass
    ``torch.distributed.group.WORLD`` for all ranks.

    The metrics are the functions of :mod:`robustft.metrics`, applied to the concatenation:
    :func:`accuracy`, :func:`nll` and :func:`ece` on the known-class samples; :func:`auroc` and
    :func:`fpr_at_tpr` with the known-class samples as positives, when both kinds are present;
    :func:`open_set` when, in addition, a ``threshold`` is given. Undefined ones are ``None``.

    This is the one stateful object of the package: it only holds lists of evaluation outputs
    (never differentiated, compiled or checkpointed), so a class with ``update``/``compute``
    keeps the loop short, as in torchmetrics, where a functional state would only be threaded
    through by hand. :meth:`reset` empties it.

    Args:
        score: the OOD score computed from each batch's logits when :meth:`update` gets no
            ``scores``: ``"msp"``, ``"max_logit"``, ``"energy"``, ``"entropy_score"`` (the
            functions of :mod:`robustft.scores` at their defaults) or a callable mapping
            ``[batch, classes]`` logits to ``[batch]`` scores, higher = known.
        threshold: the open-set threshold :math:`\\tau` on the score's scale, or ``None`` for no
            open-set metrics.
        num_bins: ECE bins (:func:`ece`).
        tpr: the TPR at which :func:`fpr_at_tpr` is reported, in :math:`(0, 1]`.
        device: where the batches are kept; ``None`` keeps them on the device they came on.
        group: a ``torch.distributed`` process group to gather over, or ``None`` (local only).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if ``score`` is an unknown name, ``threshold`` is NaN, ``num_bins < 1`` or
            ``tpr`` is outside :math:`(0, 1]`.

    Example:
        >>> evaluation = Evaluation(score="msp", threshold=0.6)
        >>> evaluation.update(torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> evaluation.update(torch.tensor([[0.2, 0.0]]), torch.tensor([-1]))
        >>> result = evaluation.compute()
        >>> result.accuracy, result.auroc, result.hos
        (tensor(0.5000), tensor(1.), tensor(0.6667))
    """

    def __init__(
        self,
        *,
        score: str | Callable[[Tensor], Tensor] = "msp",
        threshold: Scalar | None = None,
        num_bins: int = 15,
        tpr: float = 0.95,
        device: torch.device | str | None = "cpu",
        group: Any = None,
    ) -> None:
        fn = "Evaluation"
        if isinstance(score, str):
            check_choice(fn, "score", score, tuple(_SCORES))
            self._score_fn = _SCORES[score]
        elif callable(score):
            self._score_fn = score
        else:
            raise TypeError(
                f"{fn}: score must be one of {', '.join(map(repr, _SCORES))} or a callable, "
                f"got {describe(score)}"
            )
        self.threshold = None if threshold is None else check_threshold(fn, threshold)
        self.num_bins = check_int(fn, "num_bins", num_bins, low=1)
        self.tpr = check_number(fn, "tpr", tpr, low=0.0, high=1.0, low_inclusive=False)
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(
                f"{fn}: device must be a torch.device, a str or None, got {describe(device)}"
            )
        self.device = None if device is None else torch.device(device)
        self.group = group
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._logits: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._scores: list[Tensor] = []
        self._classes: int | None = None
        self._user_scores: bool | None = None

    @property
    def num_samples(self) -> int:
        """Number of samples collected on this rank."""
        return sum(t.shape[0] for t in self._labels)

    def update(self, logits: Tensor, labels: Tensor, scores: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            logits: ``[batch, classes]`` logits over the known classes (the same number of
                classes every batch).
            labels: ``[batch]`` integer labels; outside ``[0, classes)`` = unknown class.
            scores: optional ``[batch]`` OOD scores (higher = known) replacing ``score``; pass
                them for every batch or for none.

        Raises:
            TypeError: if a tensor has the wrong dtype.
            ValueError: if the shapes do not match each other or earlier batches, or ``scores``
                is given for some batches and not others.
        """
        fn = "Evaluation.update"
        batch, classes = check_logits_labels(fn, logits, labels)
        if self._classes is not None and classes != self._classes:
            raise ValueError(
                f"{fn}: logits must have {self._classes} classes like the earlier batches, got "
                f"shape {tuple(logits.shape)}"
            )
        given = scores is not None
        if self._user_scores is not None and given != self._user_scores:
            had = "with" if self._user_scores else "without"
            raise ValueError(
                f"{fn}: scores must be given for every batch or for none; earlier batches came "
                f"{had} scores, got scores={describe(scores)}"
            )
        logits = logits.detach()
        if scores is None:
            with torch.no_grad():
                scores = self._score_fn(logits)
            name = "the score function's output"
        else:
            name = "scores"
        check_floating(fn, name, scores)
        if scores.shape != (batch,):
            raise ValueError(
                f"{fn}: {name} must have shape ({batch},) (the batch size), got shape "
                f"{tuple(scores.shape)}"
            )
        device = logits.device if self.device is None else self.device
        self._logits.append(logits.to(device, metric_dtype(logits)))
        self._labels.append(labels.detach().to(device, torch.long))
        self._scores.append(scores.detach().to(device, metric_dtype(scores)))
        self._classes, self._user_scores = classes, given

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenate this rank's batches and, with a group, every rank's (rank order)."""
        fn = "Evaluation.compute"
        if self.device is not None:
            device = self.device
        else:
            device = self._logits[0].device if self._logits else torch.device("cpu")
        classes = self._classes or 0
        if self._logits:
            logits, labels = torch.cat(self._logits), torch.cat(self._labels)
            scores = torch.cat(self._scores)
            dtype = torch.promote_types(logits.dtype, scores.dtype)
        else:
            logits = torch.zeros(0, classes, device=device)
            labels = torch.zeros(0, dtype=torch.long, device=device)
            scores = torch.zeros(0, device=device)
            dtype = torch.float32
        if self.group is None or not is_distributed(self.group):
            if labels.numel() == 0:
                raise ValueError(f"{fn}: no samples were collected; call update() first")
            return logits, labels, scores
        comm = _comm_device(self.group, device)
        user = -1 if self._user_scores is None else int(self._user_scores)
        meta = [labels.numel(), self._classes or -1, int(dtype == torch.float64), user]
        metas = all_gather_cat(torch.tensor([meta], device=comm), self.group).tolist()
        seen = sorted({m[1] for m in metas if m[0] > 0})
        if not seen:
            raise ValueError(f"{fn}: no samples were collected on any rank; call update() first")
        if len(seen) > 1:
            raise ValueError(
                f"{fn}: every rank must see the same number of classes, got {seen} across ranks"
            )
        if len({m[3] for m in metas if m[0] > 0}) > 1:
            raise ValueError(
                f"{fn}: every rank must pass scores to update(), or none may (mixing its own "
                f"scores with the score function's would rank incomparable numbers)"
            )
        classes = seen[0]
        dtype = torch.float64 if any(m[2] for m in metas) else torch.float32
        if logits.numel() == 0 and labels.numel() == 0:
            logits = torch.zeros(0, classes, device=device)
        out = [
            all_gather_cat(t.to(comm, d), self.group).to(device)
            for t, d in ((logits, dtype), (labels, torch.long), (scores, dtype))
        ]
        return out[0], out[1], out[2]

    def compute(self) -> EvaluationResult:
        """Every metric over the samples collected (on every rank of ``group``).

        Returns:
            :class:`EvaluationResult`; its tensors are 0-d, in at least float32.

        Raises:
            ValueError: if no sample was collected (on any rank), if ranks saw different numbers
                of classes or some passed scores and others not, or if a metric rejects its
                input (e.g. NaN scores).
        """
        logits, labels, scores = self._gathered()
        classes = logits.shape[1]
        known = (labels >= 0) & (labels < classes)
        n_known = int(known.sum())
        n_unknown = labels.numel() - n_known
        acc = loss = cal = area = fpr = None
        if n_known:
            z, y = logits[known], labels[known]
            acc, loss, cal = accuracy(z, y), nll(z, y), ece(z, y, num_bins=self.num_bins)
        os_star = unk = hos = None
        if n_known and n_unknown:
            area = auroc(scores, known)
            fpr = fpr_at_tpr(scores, known, tpr=self.tpr)
            if self.threshold is not None:
                os_star, unk, hos = open_set(logits, labels, scores, threshold=self.threshold)
        return EvaluationResult(acc, loss, cal, area, fpr, os_star, unk, hos, n_known, n_unknown)
