"""Evaluation of exported classifiers over named sets: every metric of robustft.metrics, exact across ranks.

A classifier is a tree ``{"visual.*": ..., "head": [classes, dim]}``; it is loaded into one
evaluation replica of the visual tower per process and run under ``torch.no_grad`` over each
set. Under torchrun rank ``r`` of ``W`` evaluates the samples ``r, r + W, r + 2W, ...`` (no
padding: with fewer samples than ranks, some ranks have none) and
:class:`robustft.metrics.Evaluation` gathers every rank's per-sample scalars with their dataset
indices: the metrics equal a single process's. Every rank reaches the same collectives in the
same order whatever its share, an empty one included, and a failure that depends only on the
data (an empty set) is raised by every rank alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from robustft import metrics, scores
from robustft.recipes._nets import FrozenClassifier
from robustft.recipes._runtime import Runtime, autocast, quiet_worker

__all__ = ["Evaluator", "format_summary", "score_function", "threshold_at_tpr"]

METRICS = (
    "accuracy",
    "per_class_accuracy",
    "macro_f1",
    "nll",
    "ece",
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr_at_tpr",
    "os_star",
    "unk",
    "hos",
)


def score_function(name: str, scale: float) -> Callable[[Tensor], Tensor]:
    """The OOD score of a run (higher = known) from ``[batch, classes]`` logits at scale ``scale``.

    ``"mcm"`` is the maximum softmax probability of the cosines (logits / s) at temperature 1,
    UEO's and MCM's score; the others are :mod:`robustft.scores` on the logits.
    """
    if name == "mcm":
        return lambda z: scores.msp(z / scale)
    if name == "msp":
        return scores.msp
    if name == "energy":
        return scores.energy
    if name == "max_logit":
        return scores.max_logit
    raise ValueError(f"score_function: name must be msp, mcm, energy or max_logit, got {name!r}")


def threshold_at_tpr(known_scores: Tensor, tpr: float) -> float:
    r"""The open-set threshold accepting a fraction ``tpr`` of the known samples.

    :math:`\tau` = the :math:`\lceil \text{tpr}\cdot n\rceil`-th highest score, so
    ``score >= τ`` accepts at least ``tpr`` of them.

    >>> threshold_at_tpr(torch.tensor([0.9, 0.2, 0.5, 0.7]), 0.75)
    0.5
    """
    ordered = known_scores.flatten().sort(descending=True).values
    k = max(1, math.ceil(tpr * len(ordered)))
    return float(ordered[k - 1])


class Evaluator:
    """Evaluates classifier trees on named datasets with one replica of the visual tower.

    Args:
        visual: the pre-trained visual tower (copied once; its weights are replaced per call).
        scale: the logit scale of the classifiers.
        runtime: the run's runtime (device, ranks, precision).
        batch_size: evaluation batch per rank.
        workers: DataLoader workers.
        score: the OOD score name (:func:`score_function`).
    """

    def __init__(
        self,
        visual: nn.Module,
        scale: float,
        runtime: Runtime,
        *,
        batch_size: int = 256,
        workers: int = 0,
        score: str = "msp",
    ):
        self.replica = FrozenClassifier(visual, torch.zeros(1, 1), scale).to(runtime.device)
        self.scale = scale
        self.runtime = runtime
        self.batch_size = batch_size
        self.workers = workers
        self.score = score_function(score, scale)

    def load(self, classifier: Mapping[str, Tensor]) -> None:
        """Put a classifier tree's weights into the replica."""
        visual = {k[len("visual.") :]: v for k, v in classifier.items() if k.startswith("visual.")}
        with torch.no_grad():
            own = dict(self.replica.visual.named_parameters())
            missing = sorted(set(own) - set(visual))
            if missing:
                raise ValueError(
                    f"Evaluator.load: classifier must hold every visual tensor, missing {missing[:5]}"
                )
            for name, p in own.items():
                p.copy_(visual[name])
            self.replica.head = nn.Parameter(
                classifier["head"].detach().to(self.runtime.device).clone(), requires_grad=False
            )

    def _loader(self, dataset: Dataset[Any], shard: bool) -> DataLoader[Any]:
        """The set's batches, or with ``shard`` under several ranks this rank's strided share
        (``rank, rank + world, ...``; empty when the set has fewer samples than ranks)."""
        rt = self.runtime
        n = len(dataset)  # type: ignore[arg-type]
        order = range(rt.rank, n, rt.world) if shard and rt.world > 1 else range(n)
        return DataLoader(
            _Indexed(dataset),
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.workers,
            pin_memory=rt.device.type == "cuda",
            worker_init_fn=quiet_worker if self.workers else None,
        )

    def outputs(self, dataset: Dataset[Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Features ``[n, dim]``, logits ``[n, classes]`` (float32, CPU) and labels ``[n]`` of the
        whole set, on this process (``n`` may be 0)."""
        classes, dim = self.replica.head.shape
        fs, zs, ys = [torch.empty(0, dim)], [torch.empty(0, classes)], [torch.empty(0).long()]
        for images, labels, _ in self._loader(dataset, shard=False):
            with autocast(self.runtime):
                f, z = self.replica(images.to(self.runtime.device, non_blocking=True))
            fs.append(f.float().cpu())
            zs.append(z.float().cpu())
            ys.append(labels)
        return torch.cat(fs), torch.cat(zs), torch.cat(ys)

    def logits_and_labels(self, dataset: Dataset[Any]) -> tuple[Tensor, Tensor]:
        """``[n, classes]`` float32 logits and ``[n]`` labels of the whole set (this process)."""
        _, logits, labels = self.outputs(dataset)
        return logits, labels

    def features_and_labels(self, dataset: Dataset[Any]) -> tuple[Tensor, Tensor]:
        """``[n, dim]`` normalised float32 image features and ``[n]`` labels (this process)."""
        features, _, labels = self.outputs(dataset)
        return features, labels

    def _mask(self, classes: Sequence[int] | None) -> Tensor | None:
        """``0`` on ``classes`` and ``-inf`` elsewhere (``None``: every class counts)."""
        if classes is None:
            return None
        mask = torch.full((self.replica.head.shape[0],), -math.inf, device=self.runtime.device)
        mask[torch.as_tensor(list(classes), dtype=torch.long, device=mask.device)] = 0.0
        return mask

    def _compute(self, evaluation: metrics.Evaluation, threshold: float | None) -> dict[str, Any]:
        result = evaluation.compute()
        out: dict[str, Any] = {name: _number(getattr(result, name)) for name in METRICS}
        out["fpr95"] = out.pop("fpr_at_tpr")  # at Evaluation's default TPR of 0.95
        out["num_known"], out["num_unknown"] = result.num_known, result.num_unknown
        out["threshold"] = threshold
        return out

    def evaluate_logits(
        self, logits: Tensor, labels: Tensor, *, threshold: float | None = None
    ) -> dict[str, Any]:
        """Every metric of logits this process already holds for a whole set (no communication)."""
        evaluation = metrics.Evaluation(score=self.score, threshold=threshold, device="cpu")
        evaluation.update(logits, labels)
        return self._compute(evaluation, threshold)

    @torch.no_grad()
    def evaluate(
        self,
        dataset: Dataset[Any],
        *,
        threshold: float | None = None,
        classes: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Every metric on one set, across ranks (a collective under torchrun).

        ``classes`` restricts the prediction to those class indices (the other logits are set to
        ``-inf``), as the ImageNet-R/-A protocols score 200 of the 1000 classes; ``None`` keeps all.
        A rank whose share is empty (fewer samples than ranks) takes part in the same
        collectives; the metrics are those of one process.

        Raises:
            ValueError: on every rank, if the set has no sample.
        """
        if len(dataset) == 0:  # type: ignore[arg-type]  # every rank alike, before any collective
            raise ValueError("Evaluator.evaluate: the set must hold at least one image, got none")
        group = self.runtime.group if self.runtime.world > 1 else None
        evaluation = metrics.Evaluation(
            score=self.score, threshold=threshold, device="cpu", group=group
        )
        mask = self._mask(classes)
        for images, labels, indices in self._loader(dataset, shard=True):
            with autocast(self.runtime):
                _, z = self.replica(images.to(self.runtime.device, non_blocking=True))
            z = z.float() if mask is None else z.float() + mask
            evaluation.update(z, labels.to(z.device), indices=indices.to(z.device))
        return self._compute(evaluation, threshold)

    def run(
        self,
        classifier: Mapping[str, Tensor],
        sets: Mapping[str, Dataset[Any]],
        *,
        threshold: float | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Load ``classifier`` and evaluate it on every set; ``{set name: metrics}``."""
        self.load(classifier)
        return {name: self.evaluate(ds, threshold=threshold) for name, ds in sets.items()}


def _number(value: Tensor | None) -> float | None:
    return None if value is None else float(value)


class _Indexed(Dataset[tuple[Any, int, int]]):
    def __init__(self, dataset: Dataset[Any]):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = self.dataset[index]
        return image, int(label), index


def format_summary(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A markdown table: one row per (weights, set), accuracy, ECE, NLL and open-set metrics in %."""
    cols = ["accuracy", "per_class_accuracy", "macro_f1", "ece", "nll", "auroc", "fpr95", "hos"]
    head = "| weights | set | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for weights, sets in results.items():
        for name, m in sets.items():
            cells = []
            for c in cols:
                v = m.get(c)
                cells.append("–" if v is None else (f"{v:.3f}" if c == "nll" else f"{100 * v:.1f}"))
            lines.append(f"| {weights} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
