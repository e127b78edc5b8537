"""Every public callable of robustft.metrics rejects bad input with a house-form error.

Table-driven: each case names the callable it exercises, and a test checks that every name in
``robustft.metrics.__all__`` has cases (result types excepted), so a new public function cannot
ship without its error tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from robustft import metrics as M

z = torch.randn(4, 3)
y = torch.tensor([0, 1, 2, 1])
mixed = torch.tensor([0, 1, -1, 2])
s = torch.rand(4)
pos = torch.tensor([True, False, True, False])
f, f0, texts = torch.randn(4, 5), torch.randn(4, 5), torch.randn(7, 5)
nan_row = torch.tensor([[0.0, float("nan"), 1.0], [1.0, 0.0, 0.0], [0, 0, 1.0], [1.0, 0, 0]])
inf_row = torch.tensor([[0.0, float("inf"), 1.0], [1.0, 0.0, 0.0], [0, 0, 1.0], [1.0, 0, 0]])
masked_row = torch.tensor([[float("-inf")] * 3, [1.0, 0.0, 0.0], [0, 0, 1.0], [1.0, 0, 0]])


def _eg(**kw: Any) -> Any:
    args: dict[str, Any] = {"reference_features": f0, "text_features": texts}
    args.update(kw)
    feats = args.pop("features", f)
    return M.energy_gap(feats, **args)


def _update(**kw: Any) -> Any:
    args: dict[str, Any] = {"logits": z, "labels": mixed}
    args.update(kw)
    return M.Evaluation().update(args.pop("logits"), args.pop("labels"), **args)


CASES: list[tuple[str, str, Callable[[], Any], type[Exception], str]] = []


def case(name: str, what: str, call: Callable[[], Any], exc: type[Exception], match: str) -> None:
    CASES.append((name, what, call, exc, match))


def _worst_group(logits: Any, labels: Any) -> Any:
    return M.worst_group_accuracy(logits, labels, groups=torch.zeros(4, dtype=torch.long))


_worst_group.__name__ = "worst_group_accuracy"

for fn in (M.accuracy, M.nll, M.ece, M.macro_f1, M.per_class_accuracy, _worst_group):
    n = fn.__name__
    case(
        n,
        "float labels",
        lambda fn=fn: fn(z, y.float()),
        TypeError,
        rf"{n}: labels must be an integer tensor",
    )
    case(
        n,
        "bool labels",
        lambda fn=fn: fn(z, y > 0),
        TypeError,
        rf"{n}: labels must be an integer tensor",
    )
    case(
        n,
        "int logits",
        lambda fn=fn: fn(z.long(), y),
        TypeError,
        rf"{n}: logits must be a floating-point",
    )
    case(
        n,
        "list logits",
        lambda fn=fn: fn(z.tolist(), y),
        TypeError,
        rf"{n}: logits must be a torch.Tensor",
    )
    case(
        n,
        "1-d logits",
        lambda fn=fn: fn(z[0], y),
        ValueError,
        rf"{n}: logits must have 2 dimension",
    )
    case(n, "length", lambda fn=fn: fn(z, y[:3]), ValueError, rf"{n}: labels must have length 4")
    case(
        n,
        "empty batch",
        lambda fn=fn: fn(z[:0], y[:0]),
        ValueError,
        rf"{n}: logits must have shape \[batch, classes\] with batch >= 1",
    )
    case(
        n,
        "no classes",
        lambda fn=fn: fn(torch.zeros(4, 0), y),
        ValueError,
        rf"{n}: logits must have shape \[batch, classes\] with .* classes >= 1",
    )
    case(
        n,
        "NaN row",
        lambda fn=fn: fn(nan_row, y),
        ValueError,
        rf"{n}: logits must have a finite maximum in every row .*first: row 0",
    )
    case(
        n,
        "+inf row",
        lambda fn=fn: fn(inf_row, y),
        ValueError,
        rf"{n}: logits must have a finite maximum",
    )
    case(
        n,
        "all -inf row",
        lambda fn=fn: fn(masked_row, y),
        ValueError,
        rf"{n}: logits must have a finite maximum",
    )
    case(
        n,
        "unknown label",
        lambda fn=fn: fn(z, mixed),
        ValueError,
        rf"{n}: labels must be known classes in \[0, 3\)",
    )
    case(
        n,
        "label >= C",
        lambda fn=fn: fn(z, torch.tensor([0, 3, 1, 1])),
        ValueError,
        rf"{n}: labels must be known classes",
    )

case(
    "ece",
    "num_bins 0",
    lambda: M.ece(z, y, num_bins=0),
    ValueError,
    r"ece: num_bins must be an int >= 1, got 0",
)
case(
    "ece",
    "num_bins float",
    lambda: M.ece(z, y, num_bins=2.0),
    TypeError,
    r"ece: num_bins must be an int, got 2.0",
)
case(
    "ece",
    "num_bins bool",
    lambda: M.ece(z, y, num_bins=True),
    TypeError,
    r"ece: num_bins must be an int",
)
case("ece", "positional num_bins", lambda: M.ece(z, y, 15), TypeError, r"positional")

RANKING = ((M.auroc, "is_positive"), (M.fpr_at_tpr, "is_positive"))
RANKING += ((M.aupr_in, "is_known"), (M.aupr_out, "is_known"))
for fn, mask in RANKING:
    n = fn.__name__
    yes, no = ("known", "unknown") if mask == "is_known" else ("positive", "negative")
    for what, values, got in (
        ("no negative", torch.ones(4, dtype=torch.bool), f"4 {yes}"),
        ("no positive", torch.zeros(4, dtype=torch.int8), f"0 {yes}"),
    ):
        case(
            n,
            what,
            lambda fn=fn, values=values: fn(s, values),
            ValueError,
            rf"{n}: {mask} must contain at least one {yes} and one {no} sample, got {got}",
        )
    for what, values, exc, msg in (
        ("float targets", pos.float(), TypeError, "must be a bool tensor"),
        ("targets 0/1/2", torch.tensor([0, 1, 2, 1]), ValueError, "must contain only 0 and 1"),
        ("shape", pos[:3], ValueError, "must have the shape of scores"),
        ("non-tensor targets", pos.tolist(), TypeError, "must be a torch.Tensor"),
    ):
        case(n, what, lambda fn=fn, values=values: fn(s, values), exc, rf"{n}: {mask} {msg}")
    for what, scores, exc, msg in (
        ("2-d scores", s[None], ValueError, "must have 1 dimension"),
        ("int scores", torch.arange(4), TypeError, "must be a floating-point"),
        (
            "NaN score",
            torch.tensor([0.1, float("nan"), 0.2, 0.3]),
            ValueError,
            "must not contain NaN",
        ),
        ("list scores", s.tolist(), TypeError, "must be a torch.Tensor"),
    ):
        target = pos[None] if what == "2-d scores" else pos
        case(
            n,
            what,
            lambda fn=fn, scores=scores, target=target: fn(scores, target),
            exc,
            rf"{n}: scores {msg}",
        )

case(
    "macro_f1",
    "average_over name",
    lambda: M.macro_f1(z, y, average_over="micro"),
    ValueError,
    r"macro_f1: average_over must be one of 'union', 'labels', got 'micro'",
)
case(
    "macro_f1",
    "average_over type",
    lambda: M.macro_f1(z, y, average_over=None),
    TypeError,
    r"macro_f1: average_over must be one of 'union', 'labels', got None",
)
case("macro_f1", "positional average_over", lambda: M.macro_f1(z, y, "union"), TypeError, "posit")
case(
    "worst_group_accuracy",
    "float groups",
    lambda: M.worst_group_accuracy(z, y, groups=y.float()),
    TypeError,
    r"worst_group_accuracy: groups must be an integer tensor, got dtype torch.float32",
)
case(
    "worst_group_accuracy",
    "bool groups",
    lambda: M.worst_group_accuracy(z, y, groups=y > 0),
    TypeError,
    r"worst_group_accuracy: groups must be an integer tensor",
)
case(
    "worst_group_accuracy",
    "groups length",
    lambda: M.worst_group_accuracy(z, y, groups=y[:3]),
    ValueError,
    r"worst_group_accuracy: groups must have length 4",
)
case(
    "worst_group_accuracy",
    "2-d groups",
    lambda: M.worst_group_accuracy(z, y, groups=y[None]),
    ValueError,
    r"worst_group_accuracy: groups must have 1 dimension",
)
case(
    "worst_group_accuracy",
    "list groups",
    lambda: M.worst_group_accuracy(z, y, groups=[0, 0, 1, 1]),
    TypeError,
    r"worst_group_accuracy: groups must be a torch.Tensor",
)
case(
    "worst_group_accuracy",
    "positional groups",
    lambda: M.worst_group_accuracy(z, y, y),
    TypeError,
    r"positional",
)

for bad, exc, msg in (
    (0.0, ValueError, r"must be in \(0(\.0)?, 1(\.0)?\]"),
    (1.5, ValueError, r"must be in"),
    (float("nan"), ValueError, r"must not be NaN"),
    ("0.95", TypeError, r"must be a real number"),
    (float("inf"), ValueError, r"must be a finite number"),
):
    case(
        "fpr_at_tpr",
        f"tpr {bad!r}",
        lambda bad=bad: M.fpr_at_tpr(s, pos, tpr=bad),
        exc,
        rf"fpr_at_tpr: tpr {msg}",
    )

case(
    "open_set",
    "NaN threshold",
    lambda: M.open_set(z, mixed, s, threshold=float("nan")),
    ValueError,
    r"open_set: threshold must not be NaN",
)
case(
    "open_set",
    "NaN tensor threshold",
    lambda: M.open_set(z, mixed, s, threshold=torch.tensor(float("nan"))),
    ValueError,
    r"open_set: threshold must not be NaN",
)
case(
    "open_set",
    "1-d threshold",
    lambda: M.open_set(z, mixed, s, threshold=torch.tensor([0.5])),
    TypeError,
    r"open_set: threshold must be a real number or a 0-d",
)
case(
    "open_set",
    "None threshold",
    lambda: M.open_set(z, mixed, s, threshold=None),
    TypeError,
    r"open_set: threshold must be a real number",
)
case(
    "open_set",
    "scores length",
    lambda: M.open_set(z, mixed, s[:3], threshold=0.5),
    ValueError,
    r"open_set: scores must have length 4",
)
case(
    "open_set",
    "NaN scores",
    lambda: M.open_set(z, mixed, torch.tensor([0.1, 0.2, float("nan"), 0.3]), threshold=0.5),
    ValueError,
    r"open_set: scores must not contain NaN",
)
case(
    "open_set",
    "float labels",
    lambda: M.open_set(z, mixed.float(), s, threshold=0.5),
    TypeError,
    r"open_set: labels must be an integer tensor",
)
case(
    "open_set",
    "NaN logits",
    lambda: M.open_set(nan_row, mixed, s, threshold=0.5),
    ValueError,
    r"open_set: logits must have a finite maximum",
)
case(
    "open_set",
    "no classes",
    lambda: M.open_set(torch.zeros(4, 0), mixed, s, threshold=0.5),
    ValueError,
    r"open_set: logits must have shape",
)
case(
    "open_set",
    "no unknown",
    lambda: M.open_set(z, y, s, threshold=0.5),
    ValueError,
    r"open_set: labels must contain .* got 4 known and 0 unknown",
)
case(
    "open_set",
    "no known",
    lambda: M.open_set(z, torch.tensor([-1, 3, -1, 7]), s, threshold=0.5),
    ValueError,
    r"open_set: labels must contain .* got 0 known and 4 unknown",
)
case(
    "open_set",
    "positional threshold",
    lambda: M.open_set(z, mixed, s, 0.5),
    TypeError,
    r"positional",
)

case(
    "harmonic_mean",
    "negative",
    lambda: M.harmonic_mean(-0.1, 0.5),
    ValueError,
    r"harmonic_mean: a must be in \[0(\.0)?, inf\), got -0.1",
)
case(
    "harmonic_mean",
    "NaN",
    lambda: M.harmonic_mean(0.5, float("nan")),
    ValueError,
    r"harmonic_mean: b must not be NaN",
)
case(
    "harmonic_mean",
    "NaN tensor",
    lambda: M.harmonic_mean(0.5, torch.tensor([float("nan")])),
    ValueError,
    r"harmonic_mean: b must not contain NaN",
)
case(
    "harmonic_mean",
    "negative tensor",
    lambda: M.harmonic_mean(torch.tensor([0.5, -1.0]), 0.5),
    ValueError,
    r"harmonic_mean: a must be >= 0 everywhere",
)
case(
    "harmonic_mean",
    "int tensor",
    lambda: M.harmonic_mean(torch.tensor([1, 2]), 0.5),
    TypeError,
    r"harmonic_mean: a must be a real number or a floating",
)
case(
    "harmonic_mean",
    "str",
    lambda: M.harmonic_mean(0.5, "0.5"),
    TypeError,
    r"harmonic_mean: b must be a real number",
)
case(
    "harmonic_mean",
    "bool",
    lambda: M.harmonic_mean(True, 0.5),
    TypeError,
    r"harmonic_mean: a must be a real number",
)
case(
    "harmonic_mean",
    "-inf",
    lambda: M.harmonic_mean(float("-inf"), 0.5),
    ValueError,
    r"harmonic_mean: a must be in \[0",
)

case(
    "energy_gap",
    "int features",
    lambda: _eg(features=f.long()),
    TypeError,
    r"energy_gap: features must be a floating-point",
)
case(
    "energy_gap",
    "int reference",
    lambda: _eg(reference_features=f0.long()),
    TypeError,
    r"energy_gap: reference_features must be a floating-point",
)
case(
    "energy_gap",
    "int texts",
    lambda: _eg(text_features=texts.long()),
    TypeError,
    r"energy_gap: text_features must be a floating-point",
)
case(
    "energy_gap",
    "list texts",
    lambda: _eg(text_features=texts.tolist()),
    TypeError,
    r"energy_gap: text_features must be a torch.Tensor",
)
case(
    "energy_gap",
    "1-d features",
    lambda: _eg(features=f[0]),
    ValueError,
    r"energy_gap: features must have 2 dimension",
)
case(
    "energy_gap",
    "1-d texts",
    lambda: _eg(text_features=texts[0]),
    ValueError,
    r"energy_gap: text_features must have 2 dimension",
)
case(
    "energy_gap",
    "pair shape",
    lambda: _eg(reference_features=f0[:3]),
    ValueError,
    r"energy_gap: reference_features must have the shape of features \(4, 5\)",
)
case(
    "energy_gap",
    "width",
    lambda: _eg(text_features=torch.randn(7, 4)),
    ValueError,
    r"energy_gap: text_features.shape\[1\] must equal features.shape\[1\]",
)
case(
    "energy_gap",
    "no texts",
    lambda: _eg(text_features=texts[:0]),
    ValueError,
    r"energy_gap: features must have shape \[batch, dim\] and text_features \[texts, dim\]",
)
case(
    "energy_gap",
    "empty batch",
    lambda: _eg(features=f[:0], reference_features=f0[:0]),
    ValueError,
    r"energy_gap: .* batch, dim and texts >= 1",
)
case(
    "energy_gap",
    "no dims",
    lambda: _eg(features=f[:, :0], reference_features=f0[:, :0], text_features=texts[:, :0]),
    ValueError,
    r"energy_gap: .* >= 1",
)
case(
    "energy_gap",
    "scale 0",
    lambda: _eg(logit_scale=0.0),
    ValueError,
    r"energy_gap: logit_scale must be in \(0(\.0)?, inf\)",
)
case(
    "energy_gap",
    "scale inf",
    lambda: _eg(logit_scale=float("inf")),
    ValueError,
    r"energy_gap: logit_scale must be a finite number",
)
case(
    "energy_gap",
    "scale NaN",
    lambda: _eg(logit_scale=np.float32("nan")),
    ValueError,
    r"energy_gap: logit_scale must not be NaN",
)
case(
    "energy_gap",
    "scale str",
    lambda: _eg(logit_scale="100"),
    TypeError,
    r"energy_gap: logit_scale must be a real number",
)
case(
    "energy_gap",
    "scale vector",
    lambda: _eg(logit_scale=torch.ones(2)),
    TypeError,
    r"energy_gap: logit_scale must be a real number or a 0-d",
)
case(
    "energy_gap",
    "reduction",
    lambda: _eg(reduction="avg"),
    ValueError,
    r"energy_gap: reduction must be one of 'mean', 'sum', 'none'",
)
case(
    "energy_gap",
    "reduction type",
    lambda: _eg(reduction=None),
    TypeError,
    r"energy_gap: reduction must be one of",
)
case(
    "energy_gap",
    "positional reference",
    lambda: M.energy_gap(f, f0, text_features=texts),
    TypeError,
    r"positional",
)

case(
    "Evaluation",
    "score name",
    lambda: M.Evaluation(score="maxlogit"),
    ValueError,
    r"Evaluation: score must be one of 'msp', 'max_logit'",
)
case(
    "Evaluation",
    "score type",
    lambda: M.Evaluation(score=3),
    TypeError,
    r"Evaluation: score must be one of .* or a callable",
)
case(
    "Evaluation",
    "NaN threshold",
    lambda: M.Evaluation(threshold=float("nan")),
    ValueError,
    r"Evaluation: threshold must not be NaN",
)
case(
    "Evaluation",
    "num_bins",
    lambda: M.Evaluation(num_bins=0),
    ValueError,
    r"Evaluation: num_bins must be an int >= 1",
)
case(
    "Evaluation",
    "tpr",
    lambda: M.Evaluation(tpr=0.0),
    ValueError,
    r"Evaluation: tpr must be in \(0",
)
case(
    "Evaluation",
    "device type",
    lambda: M.Evaluation(device=0),
    TypeError,
    r"Evaluation: device must be None, a str or a torch.device",
)
case(
    "Evaluation",
    "device name",
    lambda: M.Evaluation(device="gpu7"),
    ValueError,
    r"Evaluation: device must name a torch device",
)
case(
    "Evaluation",
    "group int",
    lambda: M.Evaluation(group=0),
    TypeError,
    r"Evaluation: group must be a torch.distributed ProcessGroup or None, got 0",
)
case(
    "Evaluation",
    "f1_average_over name",
    lambda: M.Evaluation(f1_average_over="weighted"),
    ValueError,
    r"Evaluation: f1_average_over must be one of 'union', 'labels', got 'weighted'",
)
case(
    "Evaluation",
    "f1_average_over type",
    lambda: M.Evaluation(f1_average_over=1),
    TypeError,
    r"Evaluation: f1_average_over must be one of 'union', 'labels', got 1",
)
case("Evaluation", "positional", lambda: M.Evaluation("msp"), TypeError, r"positional")
case(
    "Evaluation.update",
    "float labels",
    lambda: _update(labels=mixed.float()),
    TypeError,
    r"Evaluation.update: labels must be an integer tensor",
)
case(
    "Evaluation.update",
    "NaN logits",
    lambda: _update(logits=nan_row),
    ValueError,
    r"Evaluation.update: logits must have a finite maximum",
)
case(
    "Evaluation.update",
    "no classes",
    lambda: _update(logits=torch.zeros(4, 0)),
    ValueError,
    r"Evaluation.update: logits must have shape",
)
case(
    "Evaluation.update",
    "scores length",
    lambda: _update(scores=s[:3]),
    ValueError,
    r"Evaluation.update: scores must have length 4",
)
case(
    "Evaluation.update",
    "NaN scores",
    lambda: _update(scores=s * float("nan")),
    ValueError,
    r"Evaluation.update: scores must not contain NaN",
)
case(
    "Evaluation.update",
    "int scores",
    lambda: _update(scores=torch.arange(4)),
    TypeError,
    r"Evaluation.update: scores must be a floating-point",
)
case(
    "Evaluation.update",
    "float indices",
    lambda: _update(indices=torch.rand(4)),
    TypeError,
    r"Evaluation.update: indices must be an integer tensor",
)
case(
    "Evaluation.update",
    "indices length",
    lambda: _update(indices=torch.arange(5)),
    ValueError,
    r"Evaluation.update: indices must have length 4",
)
case(
    "Evaluation.update",
    "float groups",
    lambda: _update(groups=torch.rand(4)),
    TypeError,
    r"Evaluation.update: groups must be an integer tensor",
)
case(
    "Evaluation.update",
    "groups length",
    lambda: _update(groups=torch.arange(3)),
    ValueError,
    r"Evaluation.update: groups must have length 4",
)
case(
    "Evaluation.compute",
    "empty",
    lambda: M.Evaluation().compute(),
    ValueError,
    r"Evaluation.compute: update\(\) must have added samples first, got 0 samples",
)

# result types: plain NamedTuples constructed by the library, no validation to test
EXEMPT = {"EvaluationResult", "OpenSetResult"}


@pytest.mark.parametrize(
    ("name", "what", "call", "exc", "match"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES]
)
def test_error(
    name: str, what: str, call: Callable[[], Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_every_public_callable_has_error_cases() -> None:
    covered = {name.split(".")[0] for name, *_ in CASES}
    assert covered | EXEMPT == set(M.__all__), sorted(set(M.__all__) - covered - EXEMPT)
    assert covered.isdisjoint(EXEMPT)


def test_errors_name_the_function_and_are_house_form() -> None:
    for name, what, call, exc, _ in CASES:
        if what.startswith("positional"):
            continue  # Python's own TypeError for a keyword-only argument
        with pytest.raises(exc) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{name}: "), (name, what, message)
        assert " must " in message, (name, what, message)
