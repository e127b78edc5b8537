"""The report of every job: metrics per set of weights and set, the shift summary, the energy gap.

:class:`Report` evaluates each set of weights a job produces on the validation split, every
evaluation, shift and out-of-distribution set, and measures its energy gap to the pre-trained
model on held-out random texts; :func:`summarise` adds the mean and worst accuracy over the
shift sets, and :func:`summary_tables` renders ``summary.md``. Weight files are read here too,
checked against the run (:func:`load_weights`) and written with the run's facts in their metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from robustft import clip, metrics
from robustft.recipes import _checkpoint as ckpt
from robustft.recipes import _runfolder as run
from robustft.recipes._config import RunConfig
from robustft.recipes._evaluate import format_summary, threshold_at_tpr
from robustft.recipes._prepare import Prepared, held_out_vocabulary, zero_shot_tree
from robustft.recipes._runfolder import RunError

__all__ = [
    "GAP_IMAGES",
    "HELDOUT_TEXTS",
    "HELDOUT_TEXT_SEED",
    "Report",
    "evaluate_tree",
    "load_weights",
    "summarise",
    "summary_tables",
    "weights_metadata",
    "write_results",
]

HELDOUT_TEXT_SEED = 987_654_321
"""Seed of the held-out random texts of every run's energy gap. Lipsum-FT's training texts of step
``t`` are drawn with seed ``seed * 1_000_003 + t``, which never reaches it for seeds and steps
below ~987."""
HELDOUT_TEXTS = 1000
"""Random texts of the energy-gap diagnostic (length ``--lipsum-length``, tokens from
``--lipsum-vocabulary`` when given)."""
GAP_IMAGES = 512
"""Images of an evaluation set the energy gap is measured on when there is no validation split."""


def weights_metadata(config: RunConfig, prep: Prepared, kind: str) -> dict[str, str]:
    """What every exported weight file records: its job, the classes and the preprocessing."""
    return {
        "robustft": json.dumps(
            {
                "kind": kind,
                "method": config.method,
                "model": config.model,
                "pretrained": config.pretrained,
                "classes": prep.facts["classes"],
                "preprocess": prep.facts["preprocess"],
            }
        )
    }


def write_results(out: Path, title: str, payload: Mapping[str, Any]) -> str:
    """Write ``results.json`` and ``summary.md`` (atomically); return the summary's tables."""
    text = summary_tables(payload)
    run.write_json(out / "results.json", payload)
    run.atomic_write(out / "summary.md", f"# {title}\n\n{text}\n")
    return text


class Report:
    """The results of a job: every set of weights it evaluates, then the summary."""

    def __init__(self, prep: Prepared, config: RunConfig):
        self.prep, self.config = prep, config
        self.results: dict[str, dict[str, Any]] = {}
        self.gaps: dict[str, dict[str, Any] | None] = {}

    def add(self, name: str, tree: Mapping[str, Tensor]) -> None:
        """Evaluate ``tree`` on every set (and its energy gap) under ``name``."""
        self.results[name], self.gaps[name] = evaluate_tree(self.prep, self.config, tree)

    def payload(self) -> dict[str, Any]:
        """``{"results": {weights: {set: metrics}}, "summary": {weights: {...}}}``."""
        return {
            "results": self.results,
            "summary": summarise(self.results, self.gaps, self.config),
        }


def summarise(
    results: Mapping[str, Mapping[str, Any]],
    gaps: Mapping[str, Mapping[str, Any] | None],
    config: RunConfig,
) -> dict[str, dict[str, Any]]:
    """Per set of weights: mean and worst accuracy over the ``--shift`` sets (the numbers CLIPood
    and Lipsum-FT tabulate) and the energy gap to the zero-shot model on held-out random texts."""
    out: dict[str, dict[str, Any]] = {}
    for weights, sets in results.items():
        gap = gaps.get(weights)
        row: dict[str, Any] = {
            "energy_gap": None if gap is None else gap["value"],
            "energy_gap_set": None if gap is None else gap["set"],
        }
        accs = {
            n: sets[n]["accuracy"]
            for n in config.shift
            if sets.get(n, {}).get("accuracy") is not None
        }
        if accs:
            worst = min(accs, key=accs.__getitem__)
            row.update(
                shift_mean_accuracy=sum(accs.values()) / len(accs),
                shift_worst_accuracy=accs[worst],
                shift_worst_set=worst,
            )
        out[weights] = row
    return out


def summary_tables(payload: Mapping[str, Any]) -> str:
    """The markdown of ``summary.md``: every metric per (weights, set), then the shift summary
    and the energy gap per set of weights."""
    text = format_summary(payload["results"])
    summary = payload.get("summary") or {}
    if summary:
        lines = [
            "",
            "| weights | shift mean acc | shift worst acc (set) | energy gap |",
            "|---|---|---|---|",
        ]
        for w, row in summary.items():
            mean, worst = row.get("shift_mean_accuracy"), row.get("shift_worst_accuracy")
            gap = row.get("energy_gap")
            mean_text = "–" if mean is None else f"{100 * mean:.1f}"
            worst_text = "–" if worst is None else f"{100 * worst:.1f} ({row['shift_worst_set']})"
            gap_text = "–" if gap is None else f"{gap:.4g}"
            lines.append(f"| {w} | {mean_text} | {worst_text} | {gap_text} |")
        text += "\n" + "\n".join(lines)
    return text


def _bank(prep: Prepared, config: RunConfig) -> Tensor:
    """``[texts, dim]`` the held-out random texts of the energy gap (encoded once per job), drawn
    from ``--lipsum-vocabulary``'s tokens when given, as Lipsum-FT's training texts are."""
    if "bank" not in prep.cache:
        g = torch.Generator().manual_seed(HELDOUT_TEXT_SEED)
        bank = clip.RandomTextBank.from_model(
            prep.bundle.model,
            HELDOUT_TEXTS,
            length=config.lipsum_length,
            tokenizer=prep.bundle.tokenizer,
            generator=g,
            device=prep.runtime.device,
            vocabulary=held_out_vocabulary(prep, config),
        )
        prep.cache["bank"] = bank.features.float().cpu()
    bank_features: Tensor = prep.cache["bank"]
    return bank_features


def _gap_set(prep: Prepared) -> tuple[str, Dataset[Any]] | None:
    """The images the energy gap is measured on: the validation split, else the first
    ``GAP_IMAGES`` of the first evaluation set."""
    if prep.data.val is not None:
        return "val", prep.data.val
    for name, ds in prep.data.evals.items():
        return name, Subset(ds, list(range(min(GAP_IMAGES, len(ds)))))  # type: ignore[arg-type]
    return None


def evaluate_tree(
    prep: Prepared, config: RunConfig, tree: Mapping[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Metrics of ``tree`` on the validation split, every evaluation set and every OOD set, and
    its energy gap; the open-set threshold accepts ``config.tpr`` of the validation knowns (no
    threshold without a labelled validation split)."""
    ev = prep.evaluator
    gap_set = _gap_set(prep)
    if gap_set is not None and "f0" not in prep.cache:  # the pre-trained tower's features
        ev.load(zero_shot_tree(prep.bundle, prep.head))
        prep.cache["f0"] = ev.features_and_labels(gap_set[1])[0]
    ev.load(tree)
    threshold = None
    out: dict[str, Any] = {}
    features = None
    if prep.data.val is not None:  # one pass: the threshold, the split's metrics, the gap
        features, logits, labels = ev.outputs(prep.data.val)
        threshold = threshold_at_tpr(ev.score(logits[labels >= 0]), config.tpr)
        out["val"] = ev.evaluate_logits(logits, labels, threshold=threshold)
    for name, ds in prep.data.evals.items():
        out[name] = ev.evaluate(ds, threshold=threshold, classes=_present(config, ds))
    for name, ds in prep.data.ood.items():
        out[f"ood:{name}"] = ev.evaluate(ds, threshold=threshold)
    if gap_set is not None:
        if features is None:
            features = ev.features_and_labels(gap_set[1])[0]
        gap = metrics.energy_gap(
            features,
            reference_features=prep.cache["f0"],
            text_features=_bank(prep, config),
            logit_scale=prep.scale,
        )
        return out, {"value": float(gap), "set": gap_set[0], "texts": HELDOUT_TEXTS}
    return out, None


def _present(config: RunConfig, dataset: Dataset[Any]) -> list[int] | None:
    """The class indices with a folder in an evaluation set, when ``eval_classes="present"``."""
    if config.eval_classes != "present":
        return None
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return sorted({int(t) for t in targets if t >= 0})


def load_weights(prep: Prepared, config: RunConfig, path: Path) -> dict[str, Tensor]:
    """A classifier file, checked against the run: the model's shapes and, when the file records
    them, the run's classes and preprocessing."""
    like = zero_shot_tree(prep.bundle, prep.head)
    meta = ckpt.read_metadata(path).get("robustft")
    if meta:
        saved = json.loads(meta)
        change = run.classes_change(
            saved.get("classes", prep.facts["classes"]), prep.facts["classes"]
        )
        if change:
            raise RunError(
                f"weights {str(path)!r} were trained on other classes than this run's: {change}"
            )
    return ckpt.load_tree(path, prep.runtime.device, like=like)
