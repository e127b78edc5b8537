"""Old code fails loudly and says where to go: moved names and keyword-only reference arguments.

Every public name the CHANGELOG lists as moved or removed raises an ``AttributeError`` (attribute
access) or ``ImportError`` (``from ... import``) naming its new home and the migration page; a
positional reference argument, a renamed keyword or a removed keyword raises a ``TypeError`` naming
the keyword to use. One mechanism (``robustft._checks.moved_names`` / ``keyword_hints``) serves
every package; it acts only on the error path.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import robustft
from robustft import losses, merging, metrics, projections, tree

MIGRATION = re.escape("(see the migration table, docs/migration.md)")
PAGE = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text()

MOVED = [
    ("averaging", "uniform_soup", "robustft.merging.uniform_soup"),
    ("averaging", "greedy_soup", "robustft.merging.greedy_soup"),
    ("projections", "wise", "robustft.merging.wise"),
    ("clip", "energy_gap_metric", "robustft.metrics.energy_gap"),
    ("tree", "accumulation_dtype", "torch.promote_types(dtype, torch.float32)"),
]


@pytest.mark.parametrize(("package", "old", "home"), MOVED, ids=[f"{p}.{o}" for p, o, _ in MOVED])
def test_moved_name_attribute_names_its_new_home(package: str, old: str, home: str) -> None:
    module = importlib.import_module(f"robustft.{package}")
    with pytest.raises(AttributeError) as caught:
        getattr(module, old)
    message = str(caught.value)
    assert message.startswith(f"module 'robustft.{package}' has no attribute '{old}': it ")
    assert home in message and re.search(MIGRATION + "$", message)
    assert "\n" not in message
    assert not hasattr(module, old)  # hasattr still answers False (an AttributeError)


@pytest.mark.parametrize(("package", "old", "home"), MOVED, ids=[f"{p}.{o}" for p, o, _ in MOVED])
def test_moved_name_import_names_its_new_home(package: str, old: str, home: str) -> None:
    with pytest.raises(ImportError) as caught:
        exec(f"from robustft.{package} import {old}", {})
    message = str(caught.value)
    assert message.startswith(f"cannot import name '{old}' from 'robustft.{package}': it ")
    assert home in message and re.search(MIGRATION + "$", message)


def test_every_moved_name_is_tested_and_in_the_migration_table() -> None:
    tables = {
        p: importlib.import_module(f"robustft.{p}")._MOVED
        for p in ("averaging", "projections", "tree", "clip")
    }
    assert {(p, old) for p, table in tables.items() for old in table} == {
        (p, o) for p, o, _ in MOVED
    }
    for package, old, _ in MOVED:
        assert f"`robustft.{package}.{old}`" in PAGE, f"docs/migration.md misses {package}.{old}"


def test_unknown_names_keep_the_plain_error() -> None:
    from robustft import averaging, clip

    for module in (averaging, clip, projections, tree):
        with pytest.raises(
            AttributeError, match=r"^module 'robustft\.\w+' has no attribute 'nope'$"
        ):
            module.nope  # noqa: B018
    with pytest.raises(ImportError, match=r"^cannot import name 'nope' from 'robustft.averaging'"):
        exec("from robustft.averaging import nope", {})
    assert averaging.bma is importlib.import_module("robustft.averaging._averagers").bma


# --- keyword-only reference arguments ------------------------------------------------------

T = {"w": torch.ones(3)}
Z = torch.randn(4, 5)
F_ = torch.randn(4, 8)


def _tpgm_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return p["w"].sum()


POSITIONAL: list[tuple[str, Callable[[], Any], str]] = [
    ("l2sp", lambda: losses.l2sp(T, T), "l2sp(params, anchor=...)"),
    ("distillation", lambda: losses.distillation(Z, Z), "distillation(logits, teacher_logits=...)"),
    (
        "feature_distillation",
        lambda: losses.feature_distillation(F_, F_),
        "feature_distillation(features, reference_features=...)",
    ),
    (
        "context_distillation",
        lambda: losses.context_distillation(F_, F_, F_),
        "context_distillation(features, reference_features=..., context_features=...)",
    ),
    *[
        (
            name,
            lambda name=name: getattr(losses, name)(F_, F_, F_, F_),
            f"{name}(image_features, text_features, teacher_image_features=..., "
            "teacher_text_features=...)",
        )
        for name in (
            "contrastive_relational_distillation",
            "interaction_distillation",
            "cross_distillation",
        )
    ],
    (
        "losses.energy_gap",
        lambda: losses.energy_gap(F_, F_, F_),
        "energy_gap(features, reference_features=..., text_features=...)",
    ),
    (
        "metrics.energy_gap",
        lambda: metrics.energy_gap(F_, F_, F_),
        "energy_gap(features, reference_features=..., text_features=...)",
    ),
    ("wise", lambda: merging.wise(T, T, alpha=0.5), "wise(params, anchor=..., alpha=...)"),
    ("task_vector", lambda: merging.task_vector(T, T), "task_vector(params, anchor=...)"),
    (
        "task_arithmetic",
        lambda: merging.task_arithmetic([T], T),
        "task_arithmetic(candidates, anchor=...)",
    ),
    ("ties", lambda: merging.ties([T], T), "ties(candidates, anchor=...)"),
    ("model_stock", lambda: merging.model_stock([T, T], T), "model_stock(candidates, anchor=...)"),
    (
        "fisher_merge",
        lambda: merging.fisher_merge([T], [T]),
        "fisher_merge(candidates, fishers=...)",
    ),
    (
        "logit_ensemble",
        lambda: merging.logit_ensemble(Z, Z, alpha=0.5),
        "logit_ensemble(logits, reference_logits=..., alpha=...)",
    ),
    (
        "l2_ball",
        lambda: projections.l2_ball(T, T, radius=1.0),
        "l2_ball(params, anchor=..., radius=...)",
    ),
    (
        "l2_ball_",
        lambda: projections.l2_ball_(T, T, radius=1.0),
        "l2_ball_(params, anchor=..., radius=...)",
    ),
    (
        "mars_ball",
        lambda: projections.mars_ball(T, T, radius=1.0),
        "mars_ball(params, anchor=..., radius=...)",
    ),
    (
        "mars_ball_",
        lambda: projections.mars_ball_(T, T, radius=1.0),
        "mars_ball_(params, anchor=..., radius=...)",
    ),
    ("tpgm", lambda: projections.tpgm(T, T, _tpgm_loss), "tpgm(params, loss_fn, anchor=...)"),
]


@pytest.mark.parametrize(("name", "call", "fix"), POSITIONAL, ids=[p[0] for p in POSITIONAL])
def test_positional_reference_argument_names_the_keyword(
    name: str, call: Callable[[], Any], fix: str
) -> None:
    with pytest.raises(TypeError) as caught:
        call()
    message = str(caught.value)
    assert "positional argument" in message  # Python's own words stay first
    assert (
        f"pass the rest by keyword: {fix} (positional reference arguments were removed)" in message
    )
    assert re.search(MIGRATION + "$", message) and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_renamed_and_removed_keywords_name_the_replacement() -> None:
    with pytest.raises(
        TypeError,
        match=r"unexpected keyword argument 'student_logits'; student_logits= was renamed logits= "
        + MIGRATION,
    ):
        losses.distillation(student_logits=Z, teacher_logits=Z)  # type: ignore[call-arg]
    with pytest.raises(
        TypeError,
        match=r"regex= is gone: pass the compiled pattern as where, select\(tree, re\.compile",
    ):
        tree.select(T, regex="w")  # type: ignore[call-arg]
    with pytest.raises(
        TypeError,
        match=r"predicate= is gone: pass the predicate as where, select\(tree, predicate\)",
    ):
        tree.select(T, predicate=lambda k: True)  # type: ignore[call-arg]
    with pytest.raises(
        TypeError,
        match=r"select\(\) takes 2 positional arguments but 3 were given; several patterns are now one collection, select\(tree, \['a\*', 'b\*'\]\) "
        + MIGRATION,
    ):
        tree.select(T, "w", "x")  # type: ignore[call-arg]
    with pytest.raises(
        TypeError,
        match=r"missing 1 required keyword-only argument: 'anchor'; call l2sp\(params, anchor=\.\.\.\) "
        + MIGRATION,
    ):
        losses.l2sp(T)  # type: ignore[call-arg]


def test_errors_raised_inside_pass_through_unchanged() -> None:
    # a TypeError raised by a validator (the call itself binds) is not rewritten
    with pytest.raises(
        TypeError,
        match=r"^l2sp: anchor must be a mapping from parameter names to tensors .* got 3$",
    ):
        losses.l2sp(T, anchor=3)  # type: ignore[arg-type]
    # a wrong keyword without a known rename keeps Python's message
    with pytest.raises(TypeError, match=r"^wise\(\) got an unexpected keyword argument 'beta'$"):
        merging.wise(T, anchor=T, alpha=0.5, beta=1)  # type: ignore[call-arg]


def test_wrapped_functions_keep_identity_signature_and_results() -> None:
    from robustft.losses import _l2sp

    assert losses.l2sp is _l2sp.l2sp  # one object: the defining module holds the wrapper too
    assert pickle.loads(pickle.dumps(losses.l2sp)) is losses.l2sp
    assert str(inspect.signature(losses.l2sp)) == str(inspect.signature(losses.l2sp.__wrapped__))
    assert losses.l2sp.__doc__ == losses.l2sp.__wrapped__.__doc__
    p = {"w": torch.tensor([1.0, 3.0])}
    a = {"w": torch.tensor([0.0, 1.0])}
    assert torch.equal(losses.l2sp(p, anchor=a), losses.l2sp.__wrapped__(p, anchor=a))


REFERENCE = ("anchor", "teacher", "reference", "fishers")


def test_every_reference_keyword_function_gives_the_hint() -> None:
    """A public function with a required keyword-only reference side is wrapped (new ones too)."""
    wrapped, missing = [], []
    for package in ("losses", "merging", "projections", "metrics"):
        module = importlib.import_module(f"robustft.{package}")
        for name in module.__all__:
            fn = getattr(module, name)
            if not inspect.isfunction(fn):
                continue
            params = inspect.signature(fn).parameters.values()
            if any(
                p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name.startswith(REFERENCE)
                for p in params
            ):
                (wrapped if hasattr(fn, "__wrapped__") else missing).append(f"{package}.{name}")
    assert not missing, f"add these to keyword_hints in their package: {missing}"
    tested = {q.split(".")[-1] for q, _, _ in POSITIONAL}
    assert {w.split(".")[1] for w in wrapped} <= tested  # each one's hint is tested above


def test_the_top_level_package_still_refuses_unknown_names() -> None:
    with pytest.raises(AttributeError, match=r"^module 'robustft' has no attribute 'wise'$"):
        robustft.wise  # type: ignore[attr-defined]  # noqa: B018
