"""The one protocol every trained row follows: a learning-rate grid chosen on validation, then seeds.

Each method runs at its paper's configuration (:data:`robustft.recipes.METHOD_DEFAULTS`: optimiser,
weight decay, schedule, warm-up, what trains, λ/β/γ in the paper's units). Only the learning rate
is re-chosen for the miniature, the same way for every method: the grid is the method's paper
learning rate times :attr:`~robustft.demo._bench.Preset.lr_multipliers`; every grid point runs
on seed 0, each table row keeps the grid point with the best validation accuracy of *its own*
weights (the last iterate, or the run's average; ties go to the smaller rate), and seeds
1, 2, ... run that rate only. Test sets are never looked at before the rates are fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

from robustft.demo._bench import Bench, Tree, fit

__all__ = ["GridResult", "RunSpec", "grid_lrs", "run_grid", "select"]


class RunSpec(NamedTuple):
    """A trained method of an experiment.

    Attributes:
        method: the :mod:`robustft.recipes` method name.
        rows: table row -> which weights of the run it reports: ``"last"`` or ``"averaged"``.
        paper_lr: the paper's learning rate (the grid's unit).
        overrides: configuration fields set on top of the paper's defaults.
    """

    method: str
    rows: dict[str, str]
    paper_lr: float = 1e-5
    overrides: Mapping[str, Any] = {}


class GridResult(NamedTuple):
    """What :func:`run_grid` returns.

    Attributes:
        trees: row -> the row's classifier tree on every seed (seed order).
        lrs: row -> the chosen learning rate.
        validation: row -> {learning rate: seed-0 validation accuracy}.
        runs: ``(run, lr, seed)`` -> ``{"last": tree, "averaged": tree | None}`` of every run.
        seconds: run name -> training seconds summed over its runs.
    """

    trees: dict[str, list[Tree]]
    lrs: dict[str, float]
    validation: dict[str, dict[float, float]]
    runs: dict[tuple[str, float, int], dict[str, Tree | None]]
    seconds: dict[str, float]


def grid_lrs(spec: RunSpec, multipliers: Sequence[float]) -> list[float]:
    """The grid of ``spec``: its paper rate times each multiplier (6 significant digits)."""
    return [float(f"{spec.paper_lr * m:.6g}") for m in multipliers]


def select(scores: Mapping[float, float]) -> float:
    """The learning rate with the best score; ties go to the smaller rate."""
    return min(scores, key=lambda lr: (-scores[lr], lr))


def run_grid(
    bench: Bench,
    specs: Mapping[str, RunSpec],
    *,
    inputs: Callable[[str, int], dict[str, Any]],
    validate: Callable[[Tree, int], float],
    full_grid: Collection[str] = (),
    log: Callable[[str], None] = print,
) -> GridResult:
    """Run every spec on the grid (seed 0), choose each row's rate on validation, run the seeds.

    Args:
        bench: the benchmark.
        specs: run name -> :class:`RunSpec`.
        inputs: ``(run name, seed) -> keyword arguments of`` :func:`robustft.demo._bench.fit`
            (images, labels, classnames, head, and the confidence for the unsupervised ones).
        validate: ``(tree, seed) -> validation accuracy`` on that seed's validation split.
        full_grid: runs that also run every grid point on seeds >= 1 (soup ingredients).
        log: progress lines.
    """
    seeds = range(bench.preset.seeds)
    runs: dict[tuple[str, float, int], dict[str, Tree | None]] = {}
    seconds: dict[str, float] = {}

    def launch(name: str, lr: float, seed: int) -> None:
        spec = specs[name]
        result = fit(bench, spec.method, lr=lr, seed=seed, **inputs(name, seed), **spec.overrides)
        runs[name, lr, seed] = {"last": result.last, "averaged": result.averaged}
        seconds[name] = seconds.get(name, 0.0) + result.seconds

    lrs: dict[str, float] = {}
    validation: dict[str, dict[float, float]] = {}
    for name, spec in specs.items():
        grid = grid_lrs(spec, bench.preset.lr_multipliers)
        for lr in grid:
            launch(name, lr, 0)
        for row, which in spec.rows.items():
            scores = {}
            for lr in grid:
                weights = runs[name, lr, 0][which]
                assert weights is not None, (name, which)
                scores[lr] = validate(weights, 0)
            validation[row], lrs[row] = scores, select(scores)
        chosen = ", ".join(f"{row} {lrs[row]:g}" for row in spec.rows)
        log(f"  {name:<12} grid {len(grid)} x seed 0: {seconds[name]:5.1f} s; lr: {chosen}")
    for name, spec in specs.items():
        grid = grid_lrs(spec, bench.preset.lr_multipliers)
        needed = set(grid) if name in full_grid else {lrs[row] for row in spec.rows}
        for seed in seeds[1:]:
            for lr in sorted(needed):
                launch(name, lr, seed)
    trees: dict[str, list[Tree]] = {}
    for name, spec in specs.items():
        for row, which in spec.rows.items():
            picked = [runs[name, lrs[row], seed][which] for seed in seeds]
            trees[row] = [t for t in picked if t is not None]
    return GridResult(trees, lrs, validation, runs, seconds)
