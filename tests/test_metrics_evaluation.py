"""robustft.metrics.Evaluation: streaming equals one-shot, distributed equals single-process."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from _memory import peak_alloc_bytes
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score
from torch import Tensor
from torch.utils.data import DistributedSampler

from robustft import scores
from robustft.metrics import (
    Evaluation,
    EvaluationResult,
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    ece,
    fpr_at_tpr,
    macro_f1,
    nll,
    open_set,
    per_class_accuracy,
    worst_group_accuracy,
)

SIZES = [1, 7, 3, 12, 2, 9]  # uneven batches


def _data(n: int = sum(SIZES), classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    unknown = torch.rand(n, generator=g) < 0.3
    y = torch.where(unknown, torch.full_like(y, -1), y)
    y[0], y[1] = 0, classes + 1  # both kinds present; a label >= C is unknown too
    return z, y


def _one_shot(
    z: Tensor, y: Tensor, s: Tensor, threshold: float, *, num_bins: int = 15, tpr: float = 0.95
) -> list[float]:
    """The metric functions on the concatenated logits, in :func:`_values`' order."""
    known = (y >= 0) & (y < z.shape[1])
    zk, yk = z[known], y[known]
    out = [accuracy(zk, yk), per_class_accuracy(zk, yk), macro_f1(zk, yk), nll(zk, yk)]
    out += [ece(zk, yk, num_bins=num_bins), auroc(s, known), aupr_in(s, known)]
    out += [aupr_out(s, known), fpr_at_tpr(s, known, tpr=tpr)]
    out += list(open_set(z, y, s, threshold=threshold))
    return [float(v) for v in out]


# every metric field but the group one (which needs groups), in EvaluationResult's order
FIELDS = [
    f for f in EvaluationResult._fields if not f.startswith("num_") and f != "worst_group_accuracy"
]


def _values(r: EvaluationResult) -> list[float]:
    return [float(getattr(r, name)) for name in FIELDS]


def test_one_shot_covers_every_field() -> None:
    z, y = _data()
    assert len(_one_shot(z, y, scores.msp(z), 0.5)) == len(FIELDS) == 12


def _stream(
    ev: Evaluation,
    z: Tensor,
    y: Tensor,
    sizes: list[int],
    s: Tensor | None = None,
    groups: Tensor | None = None,
) -> None:
    start = 0
    for n in sizes:
        part = slice(start, start + n)
        g = None if groups is None else groups[part]
        ev.update(z[part], y[part], None if s is None else s[part], groups=g)
        start += n


def _groups(n: int, seed: int = 0) -> Tensor:
    return torch.randint(-2, 3, (n,), generator=torch.Generator().manual_seed(seed)) * 10


def test_five_line_loop_equals_one_shot() -> None:
    z, y = _data()
    ev = Evaluation(score="msp", threshold=0.6)
    _stream(ev, z, y, SIZES)
    r = ev.compute()
    assert _values(r) == _one_shot(z, y, scores.msp(z), 0.6)  # exactly: same concatenation
    known = int(((y >= 0) & (y < 4)).sum())
    assert (r.num_known, r.num_unknown) == (known, len(y) - known)
    assert ev.num_samples == len(y)


@pytest.mark.parametrize("name", ["msp", "max_logit", "energy", "entropy_score"])
def test_named_scores(name: str) -> None:
    z, y = _data()
    ev = Evaluation(score=name, threshold=0.0)
    _stream(ev, z, y, SIZES)
    r = ev.compute()
    s = getattr(scores, name)(z)
    assert float(r.auroc) == float(auroc(s, (y >= 0) & (y < 4)))  # type: ignore[arg-type]


def test_user_scores_and_callable_score() -> None:
    z, y = _data()
    image, text = torch.randn(len(y), 8), torch.randn(4, 8)
    s = scores.mcm(image, text)
    given = Evaluation(threshold=0.3, tpr=0.9, num_bins=7)
    _stream(given, z, y, SIZES, s)
    r = given.compute()
    known = (y >= 0) & (y < 4)
    assert float(r.auroc) == float(auroc(s, known))  # type: ignore[arg-type]
    assert float(r.fpr_at_tpr) == float(fpr_at_tpr(s, known, tpr=0.9))  # type: ignore[arg-type]
    assert float(r.ece) == float(ece(z[known], y[known], num_bins=7))  # type: ignore[arg-type]
    assert float(r.hos) == float(open_set(z, y, s, threshold=0.3).hos)  # type: ignore[arg-type]
    hot = Evaluation(score=lambda logits: scores.energy(logits, temperature=3.0))
    _stream(hot, z, y, SIZES)
    want = auroc(scores.energy(z, temperature=3.0), known)
    assert float(hot.compute().auroc) == float(want)  # type: ignore[arg-type]


def test_undefined_metrics_are_none() -> None:
    z, y = _data()
    known = (y >= 0) & (y < 4)
    only_known = Evaluation(threshold=0.5)
    only_known.update(z[known], y[known])
    r = only_known.compute()
    assert r.accuracy is not None and r.auroc is None and r.fpr_at_tpr is None and r.hos is None
    assert r.macro_f1 is not None and r.per_class_accuracy is not None
    assert r.aupr_in is None and r.aupr_out is None and r.worst_group_accuracy is None
    assert r.num_unknown == 0
    no_threshold = Evaluation()
    no_threshold.update(z, y)
    r = no_threshold.compute()
    assert r.auroc is not None and r.os_star is None and r.unk is None and r.hos is None
    only_unknown = Evaluation(threshold=0.5)
    only_unknown.update(z[~known], y[~known])
    r = only_unknown.compute()
    assert r.accuracy is None and r.nll is None and r.ece is None and r.auroc is None
    assert r.macro_f1 is None and r.per_class_accuracy is None and r.aupr_out is None
    assert (r.num_known, r.num_unknown) == (0, int((~known).sum()))


def test_storage_detached_on_the_chosen_device_and_reset() -> None:
    z, y = _data()
    w = z.clone().requires_grad_(True)
    ev = Evaluation(device=None)
    ev.update(w.bfloat16(), y)  # bf16 kept as float32, no graph
    r = ev.compute()
    assert r.accuracy is not None and not r.accuracy.requires_grad
    assert r.accuracy.dtype == torch.float32
    known = (y >= 0) & (y < 4)
    assert float(r.accuracy) == float(accuracy(z.bfloat16()[known], y[known]))
    assert torch.equal(w.detach(), z)  # input untouched
    ev.reset()
    assert ev.num_samples == 0
    with pytest.raises(
        ValueError, match=r"Evaluation.compute: update\(\) must have added samples first"
    ):
        ev.compute()
    ev64 = Evaluation(device="cpu")
    ev64.update(z.double(), y)
    assert ev64.compute().nll.dtype == torch.float64  # type: ignore[union-attr]


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"Evaluation: score must be one of 'msp', 'max_logit'"):
        Evaluation(score="maxlogit")
    with pytest.raises(TypeError, match=r"Evaluation: score must be one of .* or a callable"):
        Evaluation(score=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Evaluation: threshold must not be NaN"):
        Evaluation(threshold=float("nan"))
    with pytest.raises(ValueError, match=r"Evaluation: threshold must not be NaN"):
        Evaluation(threshold=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match=r"Evaluation: num_bins must be an int >= 1, got 0"):
        Evaluation(num_bins=0)
    for bad in (0.0, 1.01):
        with pytest.raises(ValueError, match=r"Evaluation: tpr must be in \(0.0, 1.0\]"):
            Evaluation(tpr=bad)
    with pytest.raises(
        TypeError, match=r"Evaluation: device must be None, a str or a torch.device"
    ):
        Evaluation(device=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Evaluation: device must name a torch device"):
        Evaluation(device="gpu7")
    for bad_group in (0, "world", object()):
        with pytest.raises(TypeError, match=r"Evaluation: group must be a torch.distributed"):
            Evaluation(group=bad_group)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Evaluation: num_bins must be an int"):
        Evaluation(num_bins=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Evaluation: tpr must be a real number"):
        Evaluation(tpr="0.9")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Evaluation: threshold must be a real number"):
        Evaluation(threshold="0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Evaluation("msp")  # type: ignore[misc]


def test_update_errors() -> None:
    z, y = _data()
    ev = Evaluation()
    with pytest.raises(TypeError, match=r"Evaluation.update: labels must be an integer tensor"):
        ev.update(z, y.float())
    with pytest.raises(ValueError, match=r"Evaluation.update: labels must have length"):
        ev.update(z, y[:-1])
    with pytest.raises(ValueError, match=r"Evaluation.update: logits must have 2 dimension"):
        ev.update(z[0], y[:1])
    ev.update(z[:5], y[:5])
    with pytest.raises(ValueError, match=r"Evaluation.update: logits must have 4 classes like"):
        ev.update(torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError, match=r"Evaluation.update: scores must be given for every"):
        ev.update(z[:3], y[:3], torch.rand(3))
    with pytest.raises(ValueError, match=r"Evaluation.update: the score function's output must"):
        Evaluation(score=lambda logits: logits).update(z[:3], y[:3])
    with_scores = Evaluation()
    with pytest.raises(ValueError, match=r"Evaluation.update: scores must have length 3"):
        with_scores.update(z[:3], y[:3], torch.rand(4))
    with pytest.raises(TypeError, match=r"Evaluation.update: scores must be a floating-point"):
        with_scores.update(z[:3], y[:3], torch.arange(3))
    with pytest.raises(ValueError, match=r"Evaluation.update: scores must not contain NaN"):
        with_scores.update(z[:3], y[:3], torch.tensor([0.1, float("nan"), 0.3]))
    with pytest.raises(TypeError, match=r"Evaluation.update: indices must be an integer tensor"):
        with_scores.update(z[:3], y[:3], torch.rand(3), indices=torch.rand(3))
    with pytest.raises(ValueError, match=r"Evaluation.update: indices must have length 3"):
        with_scores.update(z[:3], y[:3], torch.rand(3), indices=torch.arange(4))
    bad_rows = z[:3].clone()
    bad_rows[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"Evaluation.update: logits must have a finite maximum"):
        with_scores.update(bad_rows, y[:3], torch.rand(3))
    with pytest.raises(
        ValueError, match=r"Evaluation.update: the score function's output must not"
    ):
        Evaluation(score=lambda logits: logits[:, 0] * float("nan")).update(z[:3], y[:3])
    assert with_scores.num_samples == 0  # failed updates store nothing
    with_scores.update(z[:3], y[:3], torch.rand(3), indices=torch.arange(3))
    with pytest.raises(ValueError, match=r"Evaluation.update: indices must be given for every"):
        with_scores.update(z[:3], y[:3], torch.rand(3))
    assert with_scores.num_samples == 3


def test_exact_for_any_split_and_dtype() -> None:
    """Per-sample scalars through the same kernels: equal to the functions on the concatenation."""
    z, y = _data(n=60, classes=5, seed=3)
    z = z.double()
    s = scores.energy(z)
    for sizes in ([60], [1] * 60, [7, 13, 40], [59, 1]):
        ev = Evaluation(score="energy", threshold=1.0, num_bins=10)
        _stream(ev, z, y, sizes)
        r = ev.compute()
        assert r.nll is not None and r.nll.dtype == torch.float64
        want = _one_shot(z, y, s, 1.0, num_bins=10)
        for got, w in zip(_values(r), want):
            assert got == pytest.approx(w, rel=1e-13, abs=1e-15)
    # a float64 batch after float32 ones widens the stored scalars, like torch.cat would
    mixed = Evaluation(threshold=0.5)
    mixed.update(z[:30].float(), y[:30])
    mixed.update(z[30:], y[30:])
    cat = torch.cat([z[:30].float().double(), z[30:]])
    r = mixed.compute()
    assert r.nll is not None and r.nll.dtype == torch.float64
    assert _values(r) == pytest.approx(_one_shot(cat, y, scores.msp(cat), 0.5), rel=1e-6)


def test_reused_buffers_do_not_rewrite_earlier_batches() -> None:
    """A loop that fills one preallocated logits/labels/scores buffer per batch (as with pinned
    memory or CUDA graphs) must give the metrics of the distinct batches."""
    z, y = _data()
    s = torch.rand(len(y), generator=torch.Generator().manual_seed(5))
    buf_z, buf_y, buf_s = torch.empty(4, 4), torch.empty(4, dtype=torch.long), torch.empty(4)
    ev = Evaluation(threshold=0.4)
    for start in range(0, len(y) - len(y) % 4, 4):
        buf_z.copy_(z[start : start + 4])
        buf_y.copy_(y[start : start + 4])
        buf_s.copy_(s[start : start + 4])
        ev.update(buf_z, buf_y, buf_s)
    buf_z.fill_(float("nan"))  # the caller's buffer changes after the last update
    buf_y.fill_(0)
    buf_s.fill_(0.0)
    n = len(y) - len(y) % 4
    got = _values(ev.compute())
    assert got == pytest.approx(_one_shot(z[:n], y[:n], s[:n], 0.4), rel=1e-6)


def test_nan_logits_never_count_as_correct() -> None:
    """torch.argmax picks a NaN as the maximum: a NaN in the label's column would be 'correct'."""
    z = torch.tensor([[float("nan"), 5.0], [3.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, -1])
    assert int(z.argmax(-1)[0]) == 0  # what would have been counted right
    ev = Evaluation()
    with pytest.raises(
        ValueError, match=r"Evaluation.update: logits must have a finite maximum in"
    ):
        ev.update(z, y)
    for bad in (float("inf"), float("-inf")):
        row = torch.tensor([[bad, bad], [3.0, 0.0], [0.0, 1.0]])
        with pytest.raises(ValueError, match=r"got 1 row\(s\) without one \(first: row 0"):
            ev.update(row, y)
    assert ev.num_samples == 0
    masked = torch.tensor([[float("-inf"), 5.0], [3.0, float("-inf")], [0.0, 1.0]])
    ev.update(masked, torch.tensor([1, 0, -1]))  # a masked (-inf) class is fine
    r = ev.compute()
    assert float(r.accuracy) == 1.0 and float(r.nll) == 0.0  # type: ignore[arg-type]


def test_integer_label_dtypes_and_numpy_settings() -> None:
    z, y = _data()
    want = _values(_run(Evaluation(threshold=0.6, tpr=0.9), z, y))
    for dtype in (torch.int32, torch.int16, torch.int8):
        ev = Evaluation(threshold=np.float32(0.6), tpr=np.float64(0.9), num_bins=np.int64(15))
        assert _values(_run(ev, z, y.to(dtype))) == want
    known = y.clamp(0, 3).to(torch.uint8)  # uint8 cannot hold -1: known labels only
    r = _run(Evaluation(), z, known)
    assert r.accuracy == accuracy(z, known.long())


def _run(ev: Evaluation, z: Tensor, y: Tensor) -> EvaluationResult:
    _stream(ev, z, y, SIZES)
    return ev.compute()


def test_indices_count_each_sample_once() -> None:
    """Duplicated samples (DistributedSampler's padding, a repeated shard) are counted once."""
    z, y = _data()
    n = len(y)
    order = torch.cat([torch.arange(n), torch.tensor([0, 1, 5, 5])])  # four repeats at the end
    ev = Evaluation(threshold=0.6)
    for part in order.split(7):
        ev.update(z[part], y[part], indices=part.int())
    r = ev.compute()
    assert ev.num_samples == n + 4
    assert _values(r) == _one_shot(z, y, scores.msp(z), 0.6)
    assert (r.num_known, r.num_unknown) == (int(((y >= 0) & (y < 4)).sum()), n - r.num_known)
    without = Evaluation(threshold=0.6)
    for part in order.split(7):
        without.update(z[part], y[part])
    assert without.compute().num_known + without.compute().num_unknown == n + 4


def test_suite_metrics_per_set_and_worst_group() -> None:
    """Macro-F1, per-class and worst-group accuracy, AUPR-in/out: equal to the functions."""
    z, y = _data()
    g = _groups(len(y))
    known = (y >= 0) & (y < 4)
    ev = Evaluation(f1_average_over="labels")
    _stream(ev, z, y, SIZES, groups=g)
    r = ev.compute()
    zk, yk = z[known], y[known]
    assert r.worst_group_accuracy is not None and r.macro_f1 is not None
    assert float(r.worst_group_accuracy) == float(worst_group_accuracy(zk, yk, groups=g[known]))
    assert float(r.macro_f1) == float(macro_f1(zk, yk, average_over="labels"))
    assert float(r.per_class_accuracy) == float(per_class_accuracy(zk, yk))  # type: ignore[arg-type]
    # a group holding only unknown-class samples has no accuracy: it is not the minimum
    g_unknown = torch.where(known, g, torch.full_like(g, 99))
    ev = Evaluation()
    _stream(ev, z, y, SIZES, groups=g_unknown)
    wga = ev.compute().worst_group_accuracy
    assert wga is not None and float(wga) == float(worst_group_accuracy(zk, yk, groups=g[known]))
    # only unknowns: nothing is defined, with or without groups
    ev = Evaluation()
    ev.update(z[~known], y[~known], groups=g[~known])
    assert ev.compute().worst_group_accuracy is None


def test_aupr_conventions_match_sklearn() -> None:
    """AUPR-in: known positive, score as is; AUPR-out: unknown positive, score negated."""
    z, y = _data(n=200, seed=4)
    z = z.double()
    s = torch.round(scores.energy(z) * 4) / 4  # ties
    known = (y >= 0) & (y < 4)
    ev = Evaluation()
    _stream(ev, z, y, [50, 150], s)
    r = ev.compute()
    want_in = average_precision_score(known.numpy(), s.numpy())
    want_out = average_precision_score((~known).numpy(), (-s).numpy())
    assert float(r.aupr_in) == pytest.approx(want_in, abs=1e-12)  # type: ignore[arg-type]
    assert float(r.aupr_out) == pytest.approx(want_out, abs=1e-12)  # type: ignore[arg-type]


def test_groups_given_for_every_batch_or_none() -> None:
    z, y = _data()
    ev = Evaluation()
    ev.update(z[:4], y[:4], groups=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(
        ValueError,
        match=r"Evaluation.update: groups must be given for every batch or for none; earlier "
        r"batches came with groups, got groups=None",
    ):
        ev.update(z[4:8], y[4:8])
    without = Evaluation()
    without.update(z[:4], y[:4])
    with pytest.raises(ValueError, match=r"batches came without groups"):
        without.update(z[4:8], y[4:8], groups=torch.zeros(4, dtype=torch.long))
    assert (ev.num_samples, without.num_samples) == (4, 4)


@given(
    cuts=st.lists(st.integers(0, 29), max_size=6),
    repeats=st.lists(st.integers(0, 29), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_any_batch_split_equals_one_shot(cuts: list[int], repeats: list[int], seed: int) -> None:
    """Property: any split into batches, with duplicated (indexed) samples, gives the metrics of
    the functions on the whole set, every field."""
    z, y = _data(n=30, classes=4, seed=seed)
    z = z.double()
    g = _groups(30, seed)
    order = torch.cat([torch.arange(30), torch.tensor(repeats, dtype=torch.long)])
    bounds = sorted({0, len(order), *cuts})
    ev = Evaluation(threshold=0.5, score="msp")
    for lo, hi in itertools.pairwise(bounds):
        part = order[lo:hi]
        ev.update(z[part], y[part], indices=part, groups=g[part])
    r = ev.compute()
    want = _one_shot(z, y, scores.msp(z), 0.5)
    assert _values(r) == pytest.approx(want, rel=1e-13, abs=1e-15)
    known = (y >= 0) & (y < 4)
    wga = worst_group_accuracy(z[known], y[known], groups=g[known])
    assert r.worst_group_accuracy is not None and float(r.worst_group_accuracy) == float(wga)


def test_memory_is_o_samples_not_o_logits() -> None:
    """Issue 13: peak allocation over a whole evaluation <= 5% of the logits' total size."""
    classes, batch, steps = 2000, 64, 120
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, classes, generator=g)
    y = torch.randint(-1, classes, (batch,), generator=g)

    def run() -> None:
        ev = Evaluation(threshold=0.001)
        groups = torch.arange(batch) % 8
        for _ in range(steps):
            ev.update(z, y, groups=groups)  # the same batch again: only the scalars accumulate
        ev.compute()

    peak = peak_alloc_bytes(run)
    logits_total = steps * batch * classes * 4
    assert peak <= 0.05 * logits_total, (peak, logits_total)


# ---------------------------------------------------------------------- two gloo# ---------------------------------------------------------------------- two gloo processes

RANK_SIZES = {0: [5, 8], 1: [3, 1, 4]}  # 13 and 8 samples: uneven ranks and batches


def _dist_body(rank: int, world_size: int) -> dict[str, Any]:
    z, y = _data(n=21)
    offset = 0 if rank == 0 else sum(RANK_SIZES[0])
    mine = slice(offset, offset + sum(RANK_SIZES[rank]))
    out: dict[str, Any] = {}

    ev = Evaluation(threshold=0.6, group=dist.group.WORLD)
    _stream(ev, z[mine], y[mine], RANK_SIZES[rank], groups=_groups(21)[mine])
    r = ev.compute()
    out["global"] = [*_values(r), r.num_known, r.num_unknown]
    out["worst_group"] = float(r.worst_group_accuracy)  # type: ignore[arg-type]

    local = Evaluation(threshold=0.6)  # group=None: never communicates, even under dist
    _stream(local, z[mine], y[mine], RANK_SIZES[rank])
    out["local"] = local.compute().num_known + local.compute().num_unknown

    lonely = Evaluation(threshold=0.6, group=dist.group.WORLD)  # rank 1 sees nothing
    if rank == 0:
        _stream(lonely, z[mine], y[mine], RANK_SIZES[0])
    out["lonely"] = _values(lonely.compute())

    mismatch = Evaluation(group=dist.group.WORLD)
    mismatch.update(torch.randn(2, 3 + rank), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"Evaluation.compute: every rank must see the same"):
        mismatch.compute()
    mixed = Evaluation(group=dist.group.WORLD)
    mixed.update(torch.randn(2, 3), torch.tensor([0, -1]), torch.rand(2) if rank == 0 else None)
    with pytest.raises(ValueError, match=r"Evaluation.compute: every rank must pass scores"):
        mixed.compute()
    empty = Evaluation(group=dist.group.WORLD)
    with pytest.raises(
        ValueError,
        match=r"Evaluation.compute: update\(\) must have added samples on some rank first",
    ):
        empty.compute()

    # DistributedSampler pads 21 samples to 22: rank 1's last sample repeats sample 0
    sampler = DistributedSampler(range(21), num_replicas=world_size, rank=rank, shuffle=False)
    mine_idx = torch.tensor(list(sampler))
    padded = Evaluation(threshold=0.6, group=dist.group.WORLD)
    for part in mine_idx.split(4):
        padded.update(z[part], y[part], indices=part)
    r = padded.compute()
    out["padded"] = [*_values(r), r.num_known, r.num_unknown]
    out["padded_local"] = padded.num_samples
    half = Evaluation(group=dist.group.WORLD)
    half.update(z[:2], y[:2], indices=torch.arange(2) if rank == 0 else None)
    with pytest.raises(ValueError, match=r"Evaluation.compute: every rank must pass indices"):
        half.compute()
    ungrouped = Evaluation(group=dist.group.WORLD)
    ungrouped.update(z[:2], y[:2], groups=torch.arange(2) if rank == 1 else None)
    with pytest.raises(ValueError, match=r"Evaluation.compute: every rank must pass groups"):
        ungrouped.compute()

    # padding + groups + indices together, a rank with an empty local set of groups included
    both = Evaluation(threshold=0.6, group=dist.group.WORLD)
    for part in mine_idx.split(4):
        both.update(z[part], y[part], indices=part, groups=_groups(21)[part])
    r = both.compute()
    out["both"] = [*_values(r), float(r.worst_group_accuracy)]  # type: ignore[arg-type]
    return out


@pytest.mark.distributed
def test_two_process_gloo_equals_single_process() -> None:
    results = run_distributed(_dist_body, world_size=2)
    z, y = _data(n=21)
    s = scores.msp(z)
    known = int(((y >= 0) & (y < 4)).sum())
    want = [*_one_shot(z, y, s, 0.6), known, 21 - known]
    n0 = sum(RANK_SIZES[0])
    assert results[0]["global"] == results[1]["global"] == want
    g = _groups(21)
    is_known = (y >= 0) & (y < 4)
    wga = float(worst_group_accuracy(z[is_known], y[is_known], groups=g[is_known]))
    assert results[0]["worst_group"] == results[1]["worst_group"] == wga
    assert [r["local"] for r in results] == [n0, 21 - n0]
    lonely = _one_shot(z[:n0], y[:n0], s[:n0], 0.6)
    assert results[0]["lonely"] == results[1]["lonely"] == lonely
    assert [r["padded_local"] for r in results] == [11, 11]  # 22 = 21 + one padding sample
    assert results[0]["padded"] == results[1]["padded"]
    assert results[0]["padded"] == pytest.approx(want, rel=1e-6)  # each sample once
    assert results[0]["both"] == results[1]["both"]
    assert results[0]["both"] == pytest.approx([*want[:-2], wga], rel=1e-6)
