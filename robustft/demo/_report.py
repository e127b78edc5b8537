"""The report of a run: markdown tables (mean ± std over seeds), the honest reading, the figures.

Everything here is computed from the results dict that :func:`robustft.demo._main.run` builds
(and writes as ``results.json``): nothing is hard-coded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.demo._data import SHIFTS
from robustft.demo._grid import label
from robustft.demo._reading import summarise

__all__ = ["figures", "markdown"]

PERCENT = {"id", "shifted", "worst", "ece", "base", "new", "H", "known", "pacc", "auroc", "fpr95",
           "hos", *SHIFTS}  # fmt: skip


def _cell(metric: str, stats: Sequence[float], seeds: int) -> str:
    mean, std = stats
    if metric in PERCENT:
        mean, std, digits = 100 * mean, 100 * std, 1
    else:
        digits = 2 if metric == "energy_gap" else 3
    text = f"{mean:.{digits}f}"
    return text if seeds < 2 else f"{text} ± {std:.{digits}f}"


def table(
    rows: Mapping[str, Sequence[Mapping[str, float]]],
    columns: Mapping[str, str],
    points: Mapping[str, str] | None = None,
    change: Mapping[str, Sequence[float]] | None = None,
    not_moved: Sequence[str] = (),
) -> str:
    """A markdown table, one row per method, ``mean ± std`` over seeds (``columns``: metric -> title).

    ``points``: row -> its chosen grid point (a column); ``change``: row -> per-seed relative
    change of its weights from its start (a column, in %); a row in ``not_moved`` is marked
    "(did not move)".
    """
    summary = summarise(rows)
    head = [
        "method", *(["lr (λ)"] if points is not None else []),
        *(["moved"] if change is not None else []), *columns.values(),
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, per_metric in summary.items():
        seeds = len(rows[row])
        cells = [row + (" (did not move)" if row in not_moved else "")]
        if points is not None:
            cells.append(points.get(row, "–"))
        if change is not None:
            c = change.get(row)
            cells.append(f"{100 * sum(c) / len(c):.1f} %" if c else "–")
        cells += [_cell(m, per_metric[m], seeds) for m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _points(metric: str, value: float) -> str:
    return f"{100 * value:+.1f} pts" if metric in PERCENT else f"{value:+.3f}"


def reading_table(claims: Sequence[Mapping[str, Any]]) -> str:
    """The honest reading as a markdown table, with each verdict's one-sided p."""
    lines = [
        "| paper | claim | here: a − b (mean ± std over seeds) | p | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        spread = _points(c["metric"], c["std"]).lstrip("+")
        evidence = f"{_points(c['metric'], c['mean'])} ± {spread}"
        p = "–" if c["p"] is None else f"{c['p']:.3f}"
        verdict = f"**{c['verdict']}**" + (f" ({c['reason']})" if c.get("reason") else "")
        lines.append(f"| {c['paper']} | {c['text']} | {evidence} | {p} | {verdict} |")
    return "\n".join(lines)


def verdict_counts(claims: Sequence[Mapping[str, Any]]) -> str:
    """One line: how many claims got each verdict."""
    counts: dict[str, int] = {}
    for c in claims:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    return ", ".join(f"{v}: {n}" for v, n in counts.items())


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


_CHECKS: dict[str, tuple[str, str, Callable[[float], str]]] = {
    "scale": ("temperature", "logit scale s", lambda v: f"{v:.1f}"),
    "random_texts_seen": ("language", "Lipsum-FT's random texts made only of tokens seen in "
                          "pre-training", _percent),
    "participation_ratio": ("language", "participation ratio of the random texts' features",
                            lambda v: f"{v:.1f}"),
    "zero_shot_id": ("headroom", "zero-shot ID accuracy", _percent),
    "ft_gain_id": ("headroom", "FT's ID gain over zero-shot (chosen rate, mean over seeds)",
                   lambda v: f"{100 * v:+.1f} points"),
    "shifts_ft_loses": ("headroom", "shifts on which FT loses against zero-shot", str),
    "pool_mcm_auroc": ("unknowns", "zero-shot MCM AUROC of the unlabelled pool (known vs "
                       "unknown)", _percent),
}  # fmt: skip


def regime_table(regime: Mapping[str, Any]) -> str:
    """The toy's regime: each measured property, its target and whether it holds."""
    lines = ["| | property | this run | target | holds |", "|---|---|---|---|---|"]
    for key, (group, text, fmt) in _CHECKS.items():
        check = regime["checks"][key]
        value = fmt(check["value"])
        lines.append(
            f"| {group} | {text} | {value} | {check['target']} | "
            f"{'yes' if check['holds'] else '**no**'} |"
        )
    return "\n".join(lines)


def regime_section(results: Mapping[str, Any]) -> str:
    """The regime paragraph and table (also written alone as ``regime.md`` for the demo guide)."""
    r = results["regime"]
    return (
        "What the papers assume of CLIP, measured on this run's toy (scale "
        f"{results['scale']:.1f}; {r['seen_tokens']} distinct tokens occurred in pre-training "
        "captions; texts drawn from the whole vocabulary, as the official Lipsum-FT code draws "
        f"them, would be made of seen tokens {100 * r['random_texts_seen_full_vocabulary']:.1f} % "
        "of the time). FT loses against zero-shot on: "
        + (", ".join(r["lost_shifts"]) or "no shift")
        + ".\n\n"
        + regime_table(r)
    )


def margins_table(experiment: Mapping[str, Any]) -> str:
    """Each trained row's chosen grid point, and its validation margin over the runner-up."""
    n = experiment["val_size"]
    lines = [
        f"| row | chosen | val accuracy | margin over the runner-up ({n} val images) |",
        "|---|---|---|---|",
    ]
    for row, margin in experiment["margins"].items():
        point = experiment["points"][row]
        val = experiment["validation"][row][point]
        tie = " (tie: toward the paper's setting)" if margin == 0 else ""
        lines.append(
            f"| {row} | {point} | {100 * val:.1f} | {100 * margin:+.1f} pts "
            f"({round(margin * n):+d} images){tie} |"
        )
    return "\n".join(lines)


def markdown(results: Mapping[str, Any], figure_dir: str | None = None) -> str:
    """The whole report; figures are linked from ``figure_dir`` when given."""
    shift, open_, universal = results["shift"], results["open"], results["universal"]
    p = results["preset"]
    seeds = p["seeds"]
    d = results["data"]
    parts = [
        f"Seeds: {seeds} (mean ± sample std over seeds; the zero-shot rows do not depend on the "
        f"seed, except through thresholds set on each seed's validation split). Budget per "
        f"supervised run: {p['steps']} steps, batch {p['batch_size']}; UEO and its baselines: "
        f"{p['ueo_steps']} steps, batch 64. Learning-rate grid: each method's paper rate × "
        f"{', '.join(f'{m:g}' for m in p['lr_multipliers'])} (Lipsum-FT crossed with λ ∈ "
        f"{{{', '.join(f'{w:g}' for w in p['lipsum_weights'])}}}), chosen on seed 0's "
        f"validation split of {d['val']} images (train {d['train']}, test {d['test']} per "
        f"test set). Pre-training: {p['pretrain_steps']} steps. Logit scale s = "
        f"{results['scale']:.1f}. Percentages, except NLL and the energy gap. 'moved': the "
        "relative change of the trained weights from their start; a row below 1 % 'did not "
        "move' and never counts for or against a claim.",
        "## The toy's regime",
        regime_section(results),
        "## 1. Domain shift",
        table(
            shift["rows"],
            {"id": "ID", "shifted": "shifted (mean)", "worst": "worst shift", "ece": "ECE ↓",
             "nll": "NLL ↓", "energy_gap": "energy gap ↓"},
            shift["points"], shift["change"], shift["not_moved"],
        ),
        "Accuracy on each test set:",
        table(shift["rows"], {"id": "clean", **{s: s for s in shift["shifts"]}}),
        "Selection on validation (seed 0):",
        margins_table(shift),
        "WiSE-FT sweep of FT (α = 0: zero-shot, α = 1: FT):",
        _sweep(shift["wise_curves"]["FT"]),
    ]  # fmt: skip
    if figure_dir is not None:
        parts.append(f"![ID vs shifted accuracy]({figure_dir}/shift.png)")
    open_points = {row: label((pt[0], pt[1])) for row, pt in open_["points"].items()}
    parts += [
        "## 2. Open classes: base → new",
        table(
            open_["rows"], {"base": "base", "new": "new", "H": "H"}, open_points,
            open_["change"], open_["not_moved"],
        ),
    ]  # fmt: skip
    if figure_dir is not None:
        parts.append(f"![base, new and H]({figure_dir}/open.png)")
    u = universal
    parts += [
        "## 3. Universal unsupervised fine-tuning (UEO)",
        f"Target domain: {u['domain']}; unlabelled pool of {u['pool']['known']} known and "
        f"{u['pool']['unknown']} unknown images (seed 0); {u['steps']} SGD steps of batch 64. "
        f"UEO's confidence weights (the zero-shot MCM score) separate them with AUROC "
        f"{100 * u['confidence_auroc']:.1f} %; the oracle row's weights separate them "
        "perfectly.",
        table(
            u["rows"],
            {"known": "known acc", "pacc": "per-class acc", "auroc": "AUROC (MSP, s = 1)",
             "fpr95": "FPR95 ↓", "hos": "HOS"},
            u["points"], u["change"], u["not_moved"],
        ),
        "Selection on validation (seed 0, labelled target-domain images):",
        margins_table(u),
    ]  # fmt: skip
    if figure_dir is not None:
        parts.append(f"![MSP score histograms]({figure_dir}/universal.png)")
    claims = results["claims"]
    parts += [
        "## Honest reading",
        f"Each claim is checked with one-sided paired t-tests over the {seeds} seeds (α = 0.05; "
        "every seed's rows share its split and the test images): 'reproduced' means the test "
        "rejects 'a is no better than b' (for claims 'within 1 point': 'a is worse than b by 1 "
        "point or more'); 'refuted' means it rejects the opposite; 'inconclusive' means "
        "neither; 'not judged' means a compared row did not move from its start. p is the "
        "one-sided p of the verdict's test. Verdicts: " + verdict_counts(claims) + ".",
        reading_table(claims),
    ]
    return "\n\n".join(parts)


def _sweep(curve: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    lines = ["| α | ID | shifted |", "|---|---|---|"]
    for alpha, per_seed in curve.items():
        s = summarise({"x": per_seed})["x"]
        n = len(per_seed)
        lines.append(
            f"| {alpha} | {_cell('id', s['id'], n)} | {_cell('shifted', s['shifted'], n)} |"
        )
    return "\n".join(lines)


def figures(results: Mapping[str, Any], out: Path) -> list[Path]:
    """Write ``shift.png``, ``open.png`` and ``universal.png`` (matplotlib, Agg) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    shift = results["shift"]
    summary = summarise(shift["rows"])
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, (row, curve) in enumerate(shift["wise_curves"].items()):
        pts = [summarise({"x": per_seed})["x"] for per_seed in curve.values()]
        ax.plot([100 * p["id"][0] for p in pts], [100 * p["shifted"][0] for p in pts],
                "-", color=cmap(i), alpha=0.6, lw=1.5 if row == "FT" else 1.0)  # fmt: skip
    for i, (row, s) in enumerate(summary.items()):
        ax.errorbar(
            100 * s["id"][0], 100 * s["shifted"][0], xerr=100 * s["id"][1],
            yerr=100 * s["shifted"][1], fmt="o" if row in shift["wise_curves"] else "s",
            color=cmap(list(shift["wise_curves"]).index(row)) if row in shift["wise_curves"]
            else "k" if row == "zero-shot" else cmap(19 - i % 6),
            ms=5, capsize=2, label=row,
        )  # fmt: skip
    ax.set_xlabel("ID accuracy (%)")
    ax.set_ylabel("mean shifted accuracy (%)")
    ax.set_title("Domain shift: mean ± std over seeds; lines = WiSE-FT curves (α 0 → 1)")
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    paths.append(out / "shift.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    open_ = summarise(results["open"]["rows"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(open_)
    width = 0.27
    for k, metric in enumerate(("base", "new", "H")):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax.bar(xs, [100 * open_[n][metric][0] for n in names], width,
               yerr=[100 * open_[n][metric][1] for n in names], capsize=2, label=metric)  # fmt: skip
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Open classes: base, new (zero-shot head) and H; mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "open.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    hist = results["universal"]["scores_seed0"]
    fig, axes = plt.subplots(1, len(hist), figsize=(3.2 * len(hist), 3.2), sharey=True)
    for ax, (row, s) in zip(axes, hist.items(), strict=True):
        lo = min(min(s["known"]), min(s["unknown"]))
        hi = max(max(s["known"]), max(s["unknown"]))
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 30
        ax.hist(s["known"], bins=bins, alpha=0.6, density=True, label="known")
        ax.hist(s["unknown"], bins=bins, alpha=0.6, density=True, label="unknown")
        ax.set_title(row, fontsize=9)
        ax.set_xlabel("MSP at scale 1")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("density")
    fig.suptitle("Universal setting: test scores, known vs unknown (seed 0)", fontsize=10)
    fig.tight_layout()
    paths.append(out / "universal.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
