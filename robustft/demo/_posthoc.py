"""Post-hoc methods: tree arithmetic on fine-tuned classifiers (WiSE-FT, TPGM, model soups).

None of them trains the network again: they combine the zero-shot tree ``bench.theta0`` and
fine-tuned trees (FT's, plus extra FT runs for the soups) with :mod:`robustft.merging` and
:mod:`robustft.projections`, choosing what they must on the held-out known-class validation split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustft import merging, metrics, projections
from robustft.demo._finetune import Bench, Tree, logits
from robustft.demo._methods import finetune

__all__ = ["WISE_ALPHAS", "soups", "tpgm", "wise_ft", "wise_sweep"]

WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SOUP_LR_FACTORS = (0.5, 2.0, 1.0, 0.25, 4.0)  # the extra FT runs: learning rate × factor, new seed


def wise_ft(bench: Bench, ft_theta: Tree) -> dict[str, Tree]:
    """WiSE-FT at α = 0.5: the midpoint of the zero-shot and the FT trees, head included."""
    return {"WiSE-FT (α = 0.5)": merging.wise(ft_theta, anchor=bench.theta0, alpha=0.5)}


def wise_sweep(bench: Bench, ft_theta: Tree) -> dict[float, Tree]:
    """WiSE-FT over :data:`WISE_ALPHAS` (α = 0 is zero-shot, α = 1 is FT)."""
    return {a: merging.wise(ft_theta, anchor=bench.theta0, alpha=a) for a in WISE_ALPHAS}


def tpgm(bench: Bench, ft_theta: Tree) -> dict[str, Tree]:
    """TPGM, post hoc: learn one L2 radius per tensor on the validation cross-entropy, project."""
    val_x, val_y = bench.data.val_x, bench.data.val_y

    def val_loss(projected: Tree) -> torch.Tensor:
        return F.cross_entropy(logits(bench, projected, val_x), val_y)

    projected, _ = projections.tpgm(
        ft_theta,
        val_loss,
        anchor=bench.theta0,
        norm="l2",
        steps=bench.budget.tpgm_steps,
        lr=1e-2,
    )
    return {"TPGM": projected}


def soups(bench: Bench, ft_theta: Tree) -> dict[str, Tree]:
    """Uniform and greedy soups of FT runs with different learning rates and seeds.

    The ingredients are the FT run and ``soup_size - 1`` more FT runs (learning rate × 0.5, 2,
    1, ...; a new batch-order seed each). The greedy soup adds them best-first while the
    validation accuracy strictly improves (the official rule).
    """
    runs = [ft_theta]
    for seed, factor in enumerate(SOUP_LR_FACTORS[: bench.budget.soup_size - 1], start=1):
        runs.append(finetune(bench, seed=seed, lr=bench.budget.lr * factor)[0])
    val_x, val_y = bench.data.val_x, bench.data.val_y

    def val_accuracy(params: Tree) -> float:
        with torch.no_grad():
            return float(metrics.accuracy(logits(bench, params, val_x), val_y))

    greedy, kept = merging.greedy_soup(runs, val_accuracy)
    n = len(runs)
    return {
        f"uniform soup ({n} runs)": merging.uniform_soup(runs),
        f"greedy soup ({len(kept)} of {n})": greedy,
    }
