"""The report of a run: markdown tables (mean ± std over seeds), the honest reading, the figures.

Everything here is computed from the results dict that :func:`robustft.demo._main.run` builds
(and writes as ``results.json``): nothing is hard-coded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.demo._reading import summarise

__all__ = ["figures", "markdown"]

PERCENT = {"id", "shifted", "worst", "ece", "base", "new", "H", "known", "pacc", "auroc", "fpr95",
           "hos", "noise", "blur", "translate", "invert", "colour"}  # fmt: skip


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
    lrs: Mapping[str, float] | None = None,
) -> str:
    """A markdown table, one row per method, ``mean ± std`` over seeds (``columns``: metric -> title)."""
    summary = summarise(rows)
    head = ["method", *(["lr"] if lrs is not None else []), *columns.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, per_metric in summary.items():
        seeds = len(rows[row])
        cells = [row]
        if lrs is not None:
            cells.append(f"{lrs[row]:g}" if row in lrs else "–")
        cells += [_cell(m, per_metric[m], seeds) for m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _points(metric: str, value: float) -> str:
    return f"{100 * value:+.1f} pts" if metric in PERCENT else f"{value:+.3f}"


def reading_table(claims: Sequence[Mapping[str, Any]]) -> str:
    """The honest reading as a markdown table."""
    lines = [
        "| paper | claim | here: a − b (mean ± std over seeds) | verdict |",
        "|---|---|---|---|",
    ]
    for c in claims:
        spread = _points(c["metric"], c["std"]).lstrip("+")
        evidence = f"{_points(c['metric'], c['mean'])} ± {spread}"
        lines.append(f"| {c['paper']} | {c['text']} | {evidence} | **{c['verdict']}** |")
    return "\n".join(lines)


def verdict_counts(claims: Sequence[Mapping[str, Any]]) -> str:
    """One line: how many claims got each verdict."""
    counts: dict[str, int] = {}
    for c in claims:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    return ", ".join(f"{v}: {n}" for v, n in counts.items())


def markdown(results: Mapping[str, Any], figure_dir: str | None = None) -> str:
    """The whole report; figures are linked from ``figure_dir`` when given."""
    shift, open_, universal = results["shift"], results["open"], results["universal"]
    p = results["preset"]
    seeds = p["seeds"]
    parts = [
        f"Seeds: {seeds} (mean ± sample std over seeds; the zero-shot rows do not depend on the "
        f"seed, except through thresholds set on each seed's validation split). Budget per supervised run: {p['steps']} steps, batch {p['batch_size']}; "
        f"learning-rate grid: each method's paper rate × "
        f"{', '.join(f'{m:g}' for m in p['lr_multipliers'])}, chosen on seed 0's validation "
        f"split. Pre-training: {p['pretrain_steps']} steps. Logit scale s = "
        f"{results['scale']:.1f}. Percentages, except NLL and the energy gap.",
        "## 1. Domain shift",
        table(
            shift["rows"],
            {"id": "ID", "shifted": "shifted (mean)", "worst": "worst shift", "ece": "ECE ↓",
             "nll": "NLL ↓", "energy_gap": "energy gap ↓"},
            shift["lrs"],
        ),
        "Accuracy on each test set:",
        table(shift["rows"], {"id": "clean", **{s: s for s in shift["shifts"]}}),
        "WiSE-FT sweep of FT (α = 0: zero-shot, α = 1: FT):",
        _sweep(shift["wise_curves"]["FT"]),
    ]  # fmt: skip
    if figure_dir is not None:
        parts.append(f"![ID vs shifted accuracy]({figure_dir}/shift.png)")
    parts += [
        "## 2. Open classes: base → new",
        table(open_["rows"], {"base": "base", "new": "new", "H": "H"}, open_["lrs"]),
    ]
    if figure_dir is not None:
        parts.append(f"![base, new and H]({figure_dir}/open.png)")
    u = universal
    parts += [
        "## 3. Universal unsupervised fine-tuning (UEO)",
        f"Target domain: {u['domain']}; unlabelled pool of {u['pool']['known']} known and "
        f"{u['pool']['unknown']} unknown images (seed 0). UEO's confidence weights separate "
        f"them with AUROC {100 * u['confidence_auroc']:.1f} %.",
        table(
            u["rows"],
            {"known": "known acc", "pacc": "per-class acc", "auroc": "AUROC (MSP, s = 1)",
             "fpr95": "FPR95 ↓", "hos": "HOS"},
            u["lrs"],
        ),
    ]  # fmt: skip
    if figure_dir is not None:
        parts.append(f"![MSP score histograms]({figure_dir}/universal.png)")
    claims = results["claims"]
    parts += [
        "## Honest reading",
        f"Each claim is checked on the paired per-seed differences of this run ({seeds} seeds): "
        "'reproduced' means the mean difference is in the claimed direction and larger than "
        "the standard deviation of the differences over seeds; 'within seed spread' means it "
        "is not larger; 'no difference' means below 0.1 points. Verdicts: "
        + verdict_counts(claims)
        + ".",
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
