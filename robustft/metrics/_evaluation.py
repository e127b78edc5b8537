"""Streaming evaluation: per-sample scalars batch by batch, then every metric at once.

Memory is O(samples) scalars, never O(samples x classes): :meth:`Evaluation.update` reduces each
batch of logits to what the metrics need (label, argmax prediction, maximum softmax probability,
cross-entropy term, OOD score, and the group id when given) and copies those into growing buffers
it owns. Macro-F1 and per-class accuracy come from O(classes) counts of the labels and predictions
at :meth:`Evaluation.compute`, so deduplication and gathering across ranks stay per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from robustft import scores as _scores
from robustft._checks import (
    check_choice,
    check_device,
    check_group,
    check_int,
    check_labels,
    check_number,
    describe,
)
from robustft._numerics import compute_dtype, full_precision
from robustft.distributed import all_gather_cat, is_distributed
from robustft.metrics._classification import per_sample, reduce_accuracy, reduce_ece, reduce_nll
from robustft.metrics._open_set import reduce_open_set
from robustft.metrics._ranking import auroc, average_precision, fpr_at_tpr
from robustft.metrics._suite import (
    check_average_over,
    reduce_macro_f1,
    reduce_per_class_accuracy,
    reduce_worst_group,
)
from robustft.metrics._validate import check_logits_labels, check_scores, check_threshold
from robustft.typing import Device, Group, Scalar

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
        per_class_accuracy: mean per-class recall on the known-class samples
            (:func:`per_class_accuracy`); ``None`` like ``accuracy``.
        macro_f1: macro-F1 on the known-class samples (:func:`macro_f1`, averaged over the
            classes ``f1_average_over`` selects); ``None`` like ``accuracy``.
        worst_group_accuracy: the lowest accuracy over the groups of the known-class samples
            (:func:`worst_group_accuracy`); ``None`` unless :meth:`Evaluation.update` got
            ``groups`` and there are known-class samples.
        nll: mean cross-entropy on the known-class samples (:func:`nll`).
        ece: expected calibration error on the known-class samples (:func:`ece`).
        auroc: AUROC of the score with known-class samples as positives (:func:`auroc`);
            ``None`` unless both known- and unknown-class samples are present.
        aupr_in: average precision with the known-class samples as positives and the score as
            is (:func:`aupr_in`); ``None`` like ``auroc``.
        aupr_out: average precision with the unknown-class samples as positives and the score
            negated (:func:`aupr_out`); ``None`` like ``auroc``.
        fpr_at_tpr: fraction of unknown-class samples accepted at the threshold that accepts
            ``tpr`` of the known ones (:func:`fpr_at_tpr`); ``None`` like ``auroc``.
        os_star: OS* (:func:`open_set`); ``None`` without a threshold or like ``auroc``.
        unk: UNK (:func:`open_set`); ``None`` like ``os_star``.
        hos: HOS (:func:`open_set`); ``None`` like ``os_star``.
        num_known: number of known-class samples (over every rank of the group, duplicates
            removed when ``indices`` were given).
        num_unknown: number of unknown-class samples (likewise).
    """

    accuracy: Tensor | None
    per_class_accuracy: Tensor | None
    macro_f1: Tensor | None
    worst_group_accuracy: Tensor | None
    nll: Tensor | None
    ece: Tensor | None
    auroc: Tensor | None
    aupr_in: Tensor | None
    aupr_out: Tensor | None
    fpr_at_tpr: Tensor | None
    os_star: Tensor | None
    unk: Tensor | None
    hos: Tensor | None
    num_known: int
    num_unknown: int


class _Column:
    """A growing 1-d buffer owned by the evaluation (amortised O(1) append, never aliases input)."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data: Tensor | None = None
        self.size = 0

    def append(self, values: Tensor, device: torch.device) -> None:
        n = values.shape[0]
        data = self.data
        if data is None:
            data = torch.empty(n, dtype=values.dtype, device=device)
        elif values.dtype != data.dtype:  # a wider batch (float64 after float32): widen, exactly
            data = data.to(torch.promote_types(data.dtype, values.dtype))
        if self.size + n > data.shape[0]:
            grown = torch.empty(
                max(self.size + n, 2 * data.shape[0]), dtype=data.dtype, device=device
            )
            grown[: self.size].copy_(data[: self.size])
            data = grown
        data[self.size : self.size + n].copy_(values)  # a copy: the caller may reuse its buffer
        self.data, self.size = data, self.size + n

    def values(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.data is None:
            return torch.empty(0, dtype=dtype, device=device)
        return self.data[: self.size]


class _Gathered(NamedTuple):
    labels: Tensor  # int64
    prediction: Tensor  # int64 argmax
    confidence: Tensor  # logits' compute dtype
    nll_term: Tensor  # logits' compute dtype
    scores: Tensor  # scores' compute dtype
    groups: Tensor | None  # int64, when update() got groups
    classes: int

    def take(self, keep: Tensor) -> _Gathered:
        """The samples at positions ``keep``."""
        groups = None if self.groups is None else self.groups[keep]
        return _Gathered(
            self.labels[keep],
            self.prediction[keep],
            self.confidence[keep],
            self.nll_term[keep],
            self.scores[keep],
            groups,
            self.classes,
        )


def _comm_device(group: Any, fallback: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors; gloo (and others) take the tensors where they are."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _first_occurrences(indices: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of ``indices``, in order."""
    order = torch.sort(indices, stable=True).indices
    ranked = indices[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    return torch.sort(order[first]).values


class Evaluation:
    """Streaming evaluation over a loader: every metric of :mod:`robustft.metrics` in one pass.

    Call :meth:`update` once per batch with the model's logits over the :math:`C` known classes
    and the labels (any label outside ``[0, C)``, e.g. ``-1``, marks an unknown-class sample),
    then :meth:`compute` once. Per-sample OOD scores are computed batch by batch with ``score``
    unless you pass your own (e.g. :func:`robustft.scores.mcm` from CLIP features). Use one
    evaluation per evaluation set (ID, each shifted domain, ID + unknowns): every metric,
    ECE included, is then reported per set.

    **Memory.** :meth:`update` keeps no logits: it reduces each batch to the per-sample scalars
    the metrics need (label, argmax prediction, maximum softmax probability, cross-entropy term,
    score, and the group id when given), about 30 bytes per sample in float32, copied into
    buffers the evaluation owns on ``device`` (CPU by default, so accelerator memory stays free).
    1M samples of 1000 classes take ~30 MB instead of the 4 GB of their logits, and a caller that
    reuses one logits buffer for every batch cannot rewrite earlier batches. Macro-F1 and
    per-class accuracy are computed from the labels and predictions at :meth:`compute` (O(C)
    counts, never a C x C confusion matrix). The results equal the metric functions applied to
    the concatenated logits (same per-row kernels, same reductions).

    **Bad rows.** A row of logits without a finite maximum (NaN, ``+inf``, every class ``-inf``)
    is refused by :meth:`update` with a ``ValueError`` naming the row, as are NaN scores:
    ``argmax`` would otherwise "predict" the NaN's class and could count it as correct.

    **Across ranks.** With a ``group``, :meth:`compute` all-gathers every rank's per-sample
    scalars (uneven numbers allowed) before computing, so each rank gets the metrics of the whole
    evaluation set, equal to one process seeing all of it. It is a collective: every rank of the
    group must call it. ``torch.utils.data.DistributedSampler`` pads the dataset with repeated
    samples to even the ranks out; pass each sample's dataset index as ``indices=`` to
    :meth:`update` and every index is counted once (its first occurrence in rank order), which
    removes the padding exactly. ``group=None`` never communicates, even when a process group is
    initialised (so rank-0-only evaluation cannot hang); pass ``torch.distributed.group.WORLD``
    for all ranks.

    The metrics are those of :mod:`robustft.metrics`: :func:`accuracy`,
    :func:`per_class_accuracy`, :func:`macro_f1`, :func:`nll` and :func:`ece` on the known-class
    samples, and :func:`worst_group_accuracy` when :meth:`update` gets ``groups``;
    :func:`auroc`, :func:`aupr_in`, :func:`aupr_out` and :func:`fpr_at_tpr` with the scores as
    given (higher = known), when both kinds are present; :func:`open_set` when, in addition, a
    ``threshold`` is given. Undefined ones are ``None`` (see :class:`EvaluationResult`).

    This is the one stateful object of the package: it only holds evaluation outputs (never
    differentiated, compiled or checkpointed), so a class with ``update``/``compute`` keeps the
    loop short, as in torchmetrics, where a functional state would only be threaded through by
    hand. :meth:`reset` empties it.

    Args:
        score: the OOD score computed from each batch's logits when :meth:`update` gets no
            ``scores``: ``"msp"``, ``"max_logit"``, ``"energy"``, ``"entropy_score"`` (the
            functions of :mod:`robustft.scores` at their defaults) or a callable mapping
            ``[batch, classes]`` logits to ``[batch]`` scores, higher = known.
        threshold: the open-set threshold :math:`\\tau` on the score's scale (a real number or a
            0-d floating tensor, ``±inf`` allowed), or ``None`` for no open-set metrics.
        num_bins: ECE bins (:func:`ece`).
        tpr: the TPR at which :func:`fpr_at_tpr` is reported, in :math:`(0, 1]`.
        f1_average_over: the classes macro-F1 averages over (:func:`macro_f1`): ``"union"``
            (those in the labels or the predictions, scikit-learn's default) or ``"labels"``
            (those in the labels, as WILDS reports iWildCam).
        device: where the per-sample scalars are kept; ``None`` keeps them on the device the
            logits came on.
        group: a ``torch.distributed`` process group to gather over, or ``None`` (local only).

    Raises:
        TypeError: if an argument has the wrong type (``group`` not a process group or ``None``).
        ValueError: if ``score`` is an unknown name, ``threshold`` is NaN, ``num_bins < 1``,
            ``tpr`` is outside :math:`(0, 1]`, ``f1_average_over`` is neither ``"union"`` nor
            ``"labels"``, or ``device`` names no device.

    Example:
        >>> evaluation = Evaluation(score="msp", threshold=0.6)
        >>> evaluation.update(torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> evaluation.update(torch.tensor([[0.2, 0.0]]), torch.tensor([-1]))
        >>> result = evaluation.compute()
        >>> result.accuracy, result.macro_f1, result.auroc, result.aupr_out, result.hos
        (tensor(0.5000), tensor(0.3333), tensor(1.), tensor(1.), tensor(0.6667))
        >>> grouped = Evaluation()
        >>> logits = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
        >>> grouped.update(logits, torch.tensor([0, 0, 1]), groups=torch.tensor([5, 5, 9]))
        >>> grouped.compute().worst_group_accuracy
        tensor(0.)
    """

    def __init__(
        self,
        *,
        score: str | Callable[[Tensor], Tensor] = "msp",
        threshold: Scalar | None = None,
        num_bins: int = 15,
        tpr: float = 0.95,
        f1_average_over: str = "union",
        device: Device = "cpu",
        group: Group = None,
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
        self.f1_average_over = check_average_over(fn, "f1_average_over", f1_average_over)
        self.device = check_device(fn, "device", device)
        self.group = check_group(fn, group)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._labels = _Column()
        self._prediction = _Column()
        self._confidence = _Column()
        self._nll = _Column()
        self._scores = _Column()
        self._indices = _Column()
        self._groups = _Column()
        self._classes: int | None = None
        self._user_scores: bool | None = None
        self._has_indices: bool | None = None
        self._has_groups: bool | None = None
        self._where: torch.device | None = None

    @property
    def num_samples(self) -> int:
        """Number of samples collected on this rank (duplicate indices included)."""
        return self._labels.size

    def update(
        self,
        logits: Tensor,
        labels: Tensor,
        scores: Tensor | None = None,
        *,
        indices: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> None:
        """Add one batch: reduce it to per-sample scalars and copy those (the inputs are not kept).

        Args:
            logits: ``[batch, classes]`` logits over the known classes (the same number of
                classes every batch); every row with a finite maximum.
            labels: ``[batch]`` labels of any integer dtype; outside ``[0, classes)`` = unknown.
            scores: optional ``[batch]`` OOD scores (higher = known) replacing ``score``; pass
                them for every batch or for none. No NaN (``±inf`` allowed).
            indices: optional ``[batch]`` integer dataset indices of the samples; with them each
                index is counted once in :meth:`compute` (e.g. to drop the repeated samples
                ``DistributedSampler`` pads with). Pass them for every batch or for none.
            groups: optional ``[batch]`` integer group ids (a region, a domain; any integers)
                for :func:`worst_group_accuracy`. Pass them for every batch or for none.

        Raises:
            TypeError: if a tensor has the wrong dtype.
            ValueError: if the shapes do not match each other or earlier batches, a row of
                ``logits`` has no finite maximum, the scores contain NaN, or ``scores`` /
                ``indices`` / ``groups`` is given for some batches and not others. A failed
                update stores nothing.

        Example:
            >>> evaluation = Evaluation()
            >>> evaluation.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, -1]))
            >>> evaluation.num_samples
            2
        """
        fn = "Evaluation.update"
        labels, batch, classes = check_logits_labels(fn, logits, labels)
        if self._classes is not None and classes != self._classes:
            raise ValueError(
                f"{fn}: logits must have {self._classes} classes like the earlier batches, got "
                f"shape {tuple(logits.shape)}"
            )
        for name, value, before in (
            ("scores", scores, self._user_scores),
            ("indices", indices, self._has_indices),
            ("groups", groups, self._has_groups),
        ):
            if before is not None and (value is not None) != before:
                had = "with" if before else "without"
                raise ValueError(
                    f"{fn}: {name} must be given for every batch or for none; earlier batches "
                    f"came {had} {name}, got {name}={describe(value)}"
                )
        if indices is not None:
            indices = check_labels(fn, "indices", indices, batch=batch)
        if groups is not None:
            groups = check_labels(fn, "groups", groups, batch=batch)
        given = scores is not None
        logits = logits.detach()
        if scores is None:
            with torch.no_grad(), full_precision(logits):
                scores = self._score_fn(logits)
            name = "the score function's output"
        else:
            name = "scores"
        check_scores(fn, scores, batch, name=name)
        prediction, _, confidence, nll_term = per_sample(logits, labels)
        device = logits.device if self.device is None else self.device
        self._labels.append(labels, device)
        self._prediction.append(prediction, device)
        self._confidence.append(confidence, device)
        self._nll.append(nll_term, device)
        self._scores.append(scores.detach().to(compute_dtype(scores)), device)
        if indices is not None:
            self._indices.append(indices, device)
        if groups is not None:
            self._groups.append(groups, device)
        self._classes, self._user_scores = classes, given
        self._has_indices, self._where = indices is not None, device
        self._has_groups = groups is not None

    def _local(self) -> _Gathered:
        where = self.device or self._where or torch.device("cpu")
        floats = self._confidence.data.dtype if self._confidence.data is not None else None
        dtype = floats or torch.float32
        sdtype = self._scores.data.dtype if self._scores.data is not None else torch.float32
        return _Gathered(
            self._labels.values(torch.long, where),
            self._prediction.values(torch.long, where),
            self._confidence.values(dtype, where),
            self._nll.values(dtype, where),
            self._scores.values(sdtype, where),
            self._groups.values(torch.long, where) if self._has_groups else None,
            self._classes or 0,
        )

    def _gathered(self) -> tuple[_Gathered, Tensor | None]:
        """This rank's scalars and, with a group, every rank's (rank order); plus the indices."""
        fn = "Evaluation.compute"
        local = self._local()
        where = local.labels.device
        indices = self._indices.values(torch.long, where) if self._has_indices else None
        if self.group is None or not is_distributed(self.group):
            if local.labels.numel() == 0:
                raise ValueError(f"{fn}: update() must have added samples first, got 0 samples")
            return local, indices
        comm = _comm_device(self.group, where)
        n = local.labels.numel()
        f64 = int(local.confidence.dtype == torch.float64)
        s64 = int(local.scores.dtype == torch.float64)
        user = -1 if self._user_scores is None else int(self._user_scores)
        has_idx = -1 if self._has_indices is None else int(self._has_indices)
        has_grp = -1 if self._has_groups is None else int(self._has_groups)
        meta = [n, self._classes or -1, f64, s64, user, has_idx, has_grp]
        metas = all_gather_cat(torch.tensor([meta], device=comm), self.group).tolist()
        active = [m for m in metas if m[0] > 0]
        if not active:
            raise ValueError(
                f"{fn}: update() must have added samples on some rank first, got 0 samples on "
                f"every rank of the group"
            )
        for column, what in (
            (1, "every rank must see the same number of classes"),
            (
                4,
                "every rank must pass scores to update(), or none may (mixing its own scores "
                "with the score function's would rank incomparable numbers)",
            ),
            (5, "every rank must pass indices to update(), or none may"),
            (6, "every rank must pass groups to update(), or none may"),
        ):
            seen = sorted({m[column] for m in active})
            if len(seen) > 1:
                detail = f", got {seen} across ranks" if column == 1 else ""
                raise ValueError(f"{fn}: {what}{detail}")
        classes = active[0][1]
        dtype = torch.float64 if any(m[2] for m in active) else torch.float32
        sdtype = torch.float64 if any(m[3] for m in active) else torch.float32
        wide = torch.promote_types(dtype, sdtype)
        with_idx, with_grp = bool(active[0][5] == 1), bool(active[0][6] == 1)
        none = torch.empty(0, dtype=torch.long, device=where)
        ints = [local.labels, local.prediction]
        if with_idx:
            ints.append(indices if indices is not None else none)
        if with_grp:
            ints.append(local.groups if local.groups is not None else none)
        packed_i = torch.stack([t.to(comm) for t in ints], dim=1)
        floats = [local.confidence, local.nll_term, local.scores]
        packed_f = torch.stack([t.to(comm, wide) for t in floats], dim=1)
        gi = all_gather_cat(packed_i, self.group).to(where)
        gf = all_gather_cat(packed_f, self.group).to(where)
        out = _Gathered(
            gi[:, 0],
            gi[:, 1],
            gf[:, 0].to(dtype),
            gf[:, 1].to(dtype),
            gf[:, 2].to(sdtype),
            gi[:, -1] if with_grp else None,
            classes,
        )
        return out, (gi[:, 2] if with_idx else None)

    def compute(self) -> EvaluationResult:
        """Every metric over the samples collected (on every rank of ``group``).

        Returns:
            :class:`EvaluationResult`; its tensors are 0-d, in at least float32.

        Raises:
            ValueError: if no sample was collected (on any rank), or ranks saw different numbers
                of classes, or some passed ``scores`` (``indices``, ``groups``) and others not.
        """
        data, indices = self._gathered()
        if indices is not None:
            keep = _first_occurrences(indices)
            if keep.numel() != indices.numel():
                data = data.take(keep)
        labels, prediction, confidence, nll_term, scores, groups, classes = data
        dtype = confidence.dtype
        known = (labels >= 0) & (labels < classes)
        correct = known & (prediction == labels)
        n_known = int(known.sum())
        n_unknown = labels.numel() - n_known
        acc = pacc = f1 = worst = loss = cal = None
        if n_known:
            lk, pk, ck = labels[known], prediction[known], correct[known]
            acc = reduce_accuracy(ck, dtype)
            pacc = reduce_per_class_accuracy(lk, pk, classes, dtype)
            f1 = reduce_macro_f1(lk, pk, classes, dtype, self.f1_average_over)
            if groups is not None:
                worst = reduce_worst_group(ck, groups[known], dtype)
            loss = reduce_nll(nll_term[known])
            cal = reduce_ece(ck, confidence[known], self.num_bins)
        area = pr_in = pr_out = fpr = os_star = unk = hos = None
        if n_known and n_unknown:
            area = auroc(scores, known)
            pr_in = average_precision(scores, known, n_known)
            pr_out = average_precision(-scores, ~known, n_unknown)
            fpr = fpr_at_tpr(scores, known, tpr=self.tpr)
            if self.threshold is not None:
                os_star, unk, hos = reduce_open_set(
                    labels, correct, scores, self.threshold, classes, dtype
                )
        return EvaluationResult(
            accuracy=acc,
            per_class_accuracy=pacc,
            macro_f1=f1,
            worst_group_accuracy=worst,
            nll=loss,
            ece=cal,
            auroc=area,
            aupr_in=pr_in,
            aupr_out=pr_out,
            fpr_at_tpr=fpr,
            os_star=os_star,
            unk=unk,
            hos=hos,
            num_known=n_known,
            num_unknown=n_unknown,
        )
