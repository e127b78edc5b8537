"""The one protocol every trained row follows: a grid chosen on validation, then seeds.

Each method runs at its paper's configuration (:data:`robustft.recipes.METHOD_DEFAULTS`: optimiser,
weight decay, schedule, warm-up, what trains, λ/β/γ in the paper's units). The learning rate is
re-chosen for the miniature the same way for every method: the grid is the method's paper
learning rate times :attr:`~robustft.demo._bench.Preset.lr_multipliers`. A method whose paper
sweeps its regulariser's weight (Lipsum-FT's λ) crosses that grid with the weights. Every grid
point runs on seed 0; each table row keeps the grid point with the best validation accuracy of
*its own* weights (the last iterate, the run's average, or the run's best checkpoint on
validation, as the row's paper reports it); **ties go to the paper's own setting** (the point
nearest to the paper's learning rate and weight, in log scale), and each row records its
*margin*: how much better its point was than the runner-up. Seeds 1, 2, ... run the chosen point
only. Test sets are never looked at before the points are fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

from robustft.demo._bench import Bench, Tree, fit

__all__ = ["GridResult", "Point", "RunSpec", "grid_points", "run_grid", "select"]

Point = tuple[float, float | None]
"""A grid point: ``(learning rate, regulariser weight or None for the method's default)``."""


class RunSpec(NamedTuple):
    """A trained method of an experiment.

    Attributes:
        method: the :mod:`robustft.recipes` method name.
        rows: table row -> which weights of the run it reports: ``"last"``, ``"averaged"`` or
            ``"best"`` (the checkpoint with the best validation accuracy, checked every
            ``preset.eval_every`` steps).
        paper_lr: the paper's learning rate (the grid's unit).
        overrides: configuration fields set on top of the paper's defaults.
        weights: the regulariser weights (``reg_weight``) crossed with the learning rates, or
            ``()`` for the method's default weight only.
        paper_weight: the paper's weight (ties go toward it).
    """

    method: str
    rows: dict[str, str]
    paper_lr: float = 1e-5
    overrides: Mapping[str, Any] = {}
    weights: tuple[float, ...] = ()
    paper_weight: float | None = None


class GridResult(NamedTuple):
    """What :func:`run_grid` returns.

    Attributes:
        trees: row -> the row's classifier tree on every seed (seed order).
        points: row -> the chosen grid point ``(lr, weight)``.
        validation: row -> {point label: seed-0 validation accuracy}.
        margins: row -> the chosen point's validation accuracy minus the runner-up's (0: a tie,
            broken toward the paper's setting).
        runs: ``(run, point, seed)`` -> ``{"last", "averaged", "best"}`` trees of every run.
        seconds: run name -> training seconds summed over its runs.
    """

    trees: dict[str, list[Tree]]
    points: dict[str, Point]
    validation: dict[str, dict[str, float]]
    margins: dict[str, float]
    runs: dict[tuple[str, Point, int], dict[str, Tree | None]]
    seconds: dict[str, float]


def grid_points(spec: RunSpec, multipliers: Sequence[float]) -> list[Point]:
    """The grid of ``spec``: its paper rate times each multiplier (6 significant digits),
    crossed with its weights."""
    lrs = [float(f"{spec.paper_lr * m:.6g}") for m in multipliers]
    weights: Sequence[float | None] = spec.weights or (None,)
    return [(lr, w) for w in weights for lr in lrs]


def label(point: Point) -> str:
    """``"3e-05"`` or ``"3e-05, λ 1"``: a grid point as the tables show it."""
    lr, weight = point
    return f"{lr:g}" if weight is None else f"{lr:g}, λ {weight:g}"


def select(scores: Mapping[Point, float], paper: Point) -> Point:
    """The point with the best score; ties go to the point nearest the paper's ``paper``.

    Nearness is the distance in log scale of the learning rate, then of the weight; a remaining
    tie (two points equally far) goes to the smaller rate.

    Example:
        >>> select({(1e-5, None): 0.9, (3e-5, None): 0.9, (1e-4, None): 0.8}, (3e-5, None))
        (3e-05, None)
    """

    def far(value: float | None, reference: float | None) -> float:
        if value is None or reference is None:
            return 0.0
        return abs(math.log(value / reference))

    return min(
        scores,
        key=lambda p: (-scores[p], far(p[0], paper[0]), far(p[1], paper[1]), p[0], p[1] or 0.0),
    )


def run_grid(
    bench: Bench,
    specs: Mapping[str, RunSpec],
    *,
    inputs: Callable[[str, int], dict[str, Any]],
    validate: Callable[[Tree, int], float],
    full_grid: Collection[str] = (),
    log: Callable[[str], None] = print,
    on_chosen: Callable[[dict[str, Point]], None] | None = None,
) -> GridResult:
    """Run every spec on its grid (seed 0), choose each row's point on validation, run the seeds.

    Args:
        bench: the benchmark.
        specs: run name -> :class:`RunSpec`.
        inputs: ``(run name, seed) -> keyword arguments of`` :func:`robustft.demo._bench.fit`
            (images, labels, classnames, head, and the confidence for the unsupervised ones).
        validate: ``(tree, seed) -> validation accuracy`` on that seed's validation split.
        full_grid: runs that also run every grid point on seeds >= 1 (soup ingredients).
        log: progress lines.
        on_chosen: called with the chosen points (row -> point) as soon as they are fixed,
            before the seeds run (another experiment that reuses them can start).
    """
    seeds = range(bench.preset.seeds)
    runs: dict[tuple[str, Point, int], dict[str, Tree | None]] = {}
    seconds: dict[str, float] = {}

    def launch(name: str, point: Point, seed: int) -> None:
        spec = specs[name]
        lr, weight = point
        extra: dict[str, Any] = dict(spec.overrides)
        if weight is not None:
            extra["reg_weight"] = weight
        check: Callable[[Any], float] | None = None
        if "best" in spec.rows.values():
            extra.update(select="best", eval_every=bench.preset.eval_every)

            def check(theta: Any, seed: int = seed) -> float:
                return validate(theta, seed)

        result = fit(
            bench, spec.method, lr=lr, seed=seed, validate=check, **inputs(name, seed), **extra
        )
        runs[name, point, seed] = {
            "last": result.last, "averaged": result.averaged, "best": result.best,
        }  # fmt: skip
        seconds[name] = seconds.get(name, 0.0) + result.seconds

    points: dict[str, Point] = {}
    validation: dict[str, dict[str, float]] = {}
    margins: dict[str, float] = {}
    for name, spec in specs.items():
        grid = grid_points(spec, bench.preset.lr_multipliers)
        for point in grid:
            launch(name, point, 0)
        for row, which in spec.rows.items():
            scores = {}
            for point in grid:
                weights = runs[name, point, 0][which]
                assert weights is not None, (name, which)
                scores[point] = validate(weights, 0)
            chosen = select(scores, (spec.paper_lr, spec.paper_weight))
            others = [v for p, v in scores.items() if p != chosen]
            points[row] = chosen
            validation[row] = {label(p): v for p, v in scores.items()}
            margins[row] = scores[chosen] - max(others) if others else math.inf
        chosen_text = ", ".join(f"{row} {label(points[row])}" for row in spec.rows)
        log(
            f"  {name:<12} grid {len(grid)} x seed 0: {seconds[name]:5.1f} s; chosen: {chosen_text}"
        )
    if on_chosen is not None:
        on_chosen(dict(points))
    for name, spec in specs.items():
        grid = grid_points(spec, bench.preset.lr_multipliers)
        needed = set(grid) if name in full_grid else {points[row] for row in spec.rows}
        for seed in seeds[1:]:
            for point in sorted(needed, key=lambda p: (p[0], p[1] or 0.0)):
                launch(name, point, seed)
    trees: dict[str, list[Tree]] = {}
    for name, spec in specs.items():
        for row, which in spec.rows.items():
            picked = [runs[name, points[row], seed][which] for seed in seeds]
            trees[row] = [t for t in picked if t is not None]
    return GridResult(trees, points, validation, margins, runs, seconds)
