"""metrics.Evaluation at scale: O(samples) memory and a compute() near the scalar metrics' cost.

Issue 13's figures, for 1M samples x 1000 classes fed in batches of 1000:

* peak memory allocated over the whole evaluation (every update and compute) <= 5 % of the
  logits' total size (4 GB in float32): the evaluation keeps per-sample scalars, not logits;
* ``compute()`` time <= 2x the same metrics computed directly on the per-sample scalars
  (accuracy, per-class accuracy, macro-F1, worst-group accuracy over 16 groups, NLL, ECE, AUROC,
  AUPR-in/out, FPR@95TPR, OS*/UNK/HOS), timed in the same run.

Smoke run (part of ``make test``; 40k samples in batches of 200, no timing)::

    .venv/bin/python -m pytest -q benchmarks/bench_metrics.py --benchmark-disable

Real run (the issue's sizes; prints the ratio table)::

    .venv/bin/python -m pytest -q benchmarks/bench_metrics.py --benchmark-only -p no:cacheprovider

The batches come from a small pool of pre-generated logits (re-used, as a loader's pinned buffer
would be), so generating 10^9 random numbers does not dominate the run; each update still reduces
a fresh 1000 x 1000 batch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _memory import peak_alloc_bytes

from robustft import scores
from robustft.metrics import (
    Evaluation,
    EvaluationResult,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    harmonic_mean,
)

POOL = 4
THRESHOLD = 0.01
GROUPS = 16


@pytest.fixture
def sizes(request: pytest.FixtureRequest) -> dict[str, int]:
    if request.config.getoption("benchmark_disable", False):
        return {"N": 40_000, "C": 1000, "B": 200}
    return {"N": 1_000_000, "C": 1000, "B": 1000}


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _pool(n: dict[str, int]) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(POOL):
        z = torch.randn(n["B"], n["C"], generator=g) * 3
        y = torch.randint(-n["C"] // 4, n["C"], (n["B"],), generator=g)  # 20 % unknown (< 0)
        groups = torch.randint(0, GROUPS, (n["B"],), generator=g)
        out.append((z, y, groups))
    return out


def _evaluate(pool: list[Batch], n: dict[str, int]) -> Evaluation:
    ev = Evaluation(score="msp", threshold=THRESHOLD)
    for i in range(n["N"] // n["B"]):
        z, y, groups = pool[i % POOL]
        ev.update(z, y, groups=groups)
    return ev


def _scalars(pool: list[Batch], n: dict[str, int]) -> dict[str, torch.Tensor]:
    """The per-sample scalars, concatenated: what the baseline computes the metrics from."""
    names = ("y", "pred", "ok", "conf", "nll", "s", "g")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(n["N"] // n["B"]):
        z, y, groups = pool[i % POOL]
        known = (y >= 0) & (y < n["C"])
        pred = z.argmax(-1)
        parts["y"].append(y)
        parts["pred"].append(pred)
        parts["g"].append(groups)
        parts["ok"].append(known & (pred == y))
        parts["conf"].append(torch.softmax(z, -1).amax(-1))
        safe = torch.where(known, y, 0)
        parts["nll"].append(torch.nn.functional.cross_entropy(z, safe, reduction="none"))
        parts["s"].append(scores.msp(z))
    return {k: torch.cat(v) for k, v in parts.items()}


def _metrics_on_scalars(t: dict[str, torch.Tensor], classes: int) -> list[torch.Tensor]:
    """Every metric of EvaluationResult straight from the scalars (ECE with 15 bins)."""
    y, ok, conf, nll, s = t["y"], t["ok"], t["conf"], t["nll"], t["s"]
    known = (y >= 0) & (y < classes)
    okk, confk = ok[known], conf[known]
    acc = okk.float().mean()
    yk, pk, gk = y[known], t["pred"][known], t["g"][known]
    support = torch.bincount(yk, minlength=classes).float()
    predicted = torch.bincount(pk, minlength=classes).float()
    hits = torch.bincount(yk[okk], minlength=classes).float()
    present = support > 0
    pacc = (hits / support.clamp_min(1))[present].mean()
    f1 = (2 * hits / (support + predicted).clamp_min(1))[(support + predicted) > 0].mean()
    group_size = torch.bincount(gk, minlength=GROUPS).float()
    group_hits = torch.bincount(gk[okk], minlength=GROUPS).float()
    worst = (group_hits / group_size)[group_size > 0].min()
    loss = nll[known].mean()
    edges = torch.linspace(0, 1, 16)
    idx = (torch.bucketize(confk, edges) - 1).clamp_(0, 14)
    ece = torch.zeros(15).index_add_(0, idx, okk.float() - confk).abs().sum() / confk.numel()
    area, fpr = auroc(s, known), fpr_at_tpr(s, known)
    pr_in, pr_out = aupr_in(s, known), aupr_out(s, known)
    accepted = s >= THRESHOLD
    cls = torch.where(known, y, 0)
    count = torch.zeros(classes).index_add_(0, cls, known.float())
    hits = torch.zeros(classes).index_add_(0, cls, (accepted & ok).float())
    os_star = (hits / count.clamp_min(1)).sum() / (count > 0).sum()
    unk = (~accepted & ~known).sum() / (~known).sum()
    return [
        acc,
        pacc,
        f1,
        worst,
        loss,
        ece,
        area,
        pr_in,
        pr_out,
        fpr,
        os_star,
        unk,
        harmonic_mean(os_star, unk),
    ]


FIELDS = [f for f in EvaluationResult._fields if not f.startswith("num_")]  # the metrics


def test_evaluation_compute_vs_metrics_on_scalars(compare: Any, sizes: dict[str, int]) -> None:
    pool = _pool(sizes)
    ev = _evaluate(pool, sizes)
    scalars = _scalars(pool, sizes)
    r = ev.compute()
    want = _metrics_on_scalars(scalars, sizes["C"])
    got = [getattr(r, name) for name in FIELDS]
    assert len(got) == len(want)
    for a, b in zip(got, want):  # the baseline computes the same numbers
        assert a is not None
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)
    compare(
        f"Evaluation.compute ({sizes['N']} samples)",
        ev.compute,
        "the metrics on concatenated scalars",
        lambda: _metrics_on_scalars(scalars, sizes["C"]),
        target=2.0,
        rounds=9,
        warmup=1,
    )


def test_evaluation_peak_memory(benchmark: Any, sizes: dict[str, int], capsys: Any) -> None:
    """Peak bytes allocated over every update and compute, against the logits' total size."""
    pool = _pool(sizes)
    peak = peak_alloc_bytes(lambda: _evaluate(pool, sizes).compute())
    logits_total = sizes["N"] * sizes["C"] * 4
    ratio = peak / logits_total
    benchmark.extra_info.update(
        {"peak_bytes": peak, "logits_bytes": logits_total, "ratio": ratio, "target": 0.05}
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    with capsys.disabled():
        print(
            f"\nEvaluation peak memory over {sizes['N']} x {sizes['C']}: {peak / 2**20:.1f} MiB "
            f"= {100 * ratio:.2f} % of the logits' {logits_total / 2**20:.0f} MiB (target <= 5 %)"
        )
    assert ratio <= 0.05, f"peak {peak} bytes = {ratio:.3%} of the logits' {logits_total} bytes"
