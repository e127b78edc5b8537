"""Rules every public function of every module follows, checked by iterating the modules' ``__all__``.

- The pre-trained / frozen / reference side of a function is keyword-only (STYLE: a call that swaps
  the trained and the reference side must fail, not silently compute something else).
- No public signature spells out ``Mapping[str, Tensor]`` or falls back to a bare ``Any`` where a
  :mod:`robustft.typing` alias says what is meant.
- Every public function documents its behaviour (a docstring with an example) and is typed.
- ``import robustft`` exposes every submodule, lazily, and to type checkers.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import robustft

MODULES = [m for m in robustft.__all__ if m != "__version__"]

# Names of the reference side of a two-sided function: these must never be positional.
REFERENCE_PREFIXES = ("anchor", "teacher", "reference", "zero_shot_params", "pretrained")

# Generic tree arithmetic, whose argument order is the operation itself (a - b, lerp from start to
# end, copy src into dst): two positional trees by design, documented in robustft.tree.
TWO_TREE_ALLOWED = {
    "tree.add",
    "tree.sub",
    "tree.lerp",
    "tree.lerp_",
    "tree.copy_",
    "tree.dot",
    "tree.map",
    "tree.check_same_structure",
    "tree.combine",
}


def _public_callables() -> Iterator[tuple[str, Callable[..., object]]]:
    for mod_name in MODULES:
        module = importlib.import_module(f"robustft.{mod_name}")
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                yield f"{mod_name}.{name}", obj
            elif inspect.isclass(obj) and not issubclass(obj, tuple):
                # classes: their constructor is the callable users reach
                yield f"{mod_name}.{name}", obj.__init__


PUBLIC = sorted(_public_callables(), key=lambda item: item[0])


def _positional(fn: Callable[..., object]) -> list[inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [
        p for p in inspect.signature(fn).parameters.values() if p.kind in kinds and p.name != "self"
    ]


def test_the_battery_sees_every_module() -> None:
    names = {qual.split(".")[0] for qual, _ in PUBLIC}
    expected = {"averaging", "clip", "distributed", "losses", "merging", "metrics"}
    expected |= {"projections", "scores", "tree"}
    assert expected <= names
    assert len(PUBLIC) > 60


@pytest.mark.parametrize(("qualname", "fn"), PUBLIC, ids=[q for q, _ in PUBLIC])
def test_reference_side_is_keyword_only(qualname: str, fn: Callable[..., object]) -> None:
    bad = [p.name for p in _positional(fn) if p.name.startswith(REFERENCE_PREFIXES)]
    assert not bad, f"{qualname}: reference-side argument(s) {bad} must be keyword-only"


@pytest.mark.parametrize(("qualname", "fn"), PUBLIC, ids=[q for q, _ in PUBLIC])
def test_at_most_one_positional_tree(qualname: str, fn: Callable[..., object]) -> None:
    """Two positional parameter trees can be swapped silently: the second must be a keyword."""
    if qualname in TWO_TREE_ALLOWED:
        return
    hints = inspect.signature(fn, eval_str=False).parameters
    trees = [
        p.name
        for p in _positional(fn)
        if "Params" in str(hints[p.name].annotation)
        or "Mapping[str, Tensor]" in str(hints[p.name].annotation)
    ]
    assert len(trees) <= 1, f"{qualname}: positional trees {trees}; make all but the first keyword"


@pytest.mark.parametrize(("qualname", "fn"), PUBLIC, ids=[q for q, _ in PUBLIC])
def test_signatures_use_the_typing_aliases(qualname: str, fn: Callable[..., object]) -> None:
    params = inspect.signature(fn).parameters.values()
    for p in params:
        annotation = str(p.annotation)
        assert "Mapping[str, Tensor]" not in annotation, (
            f"{qualname}: argument {p.name} spells out Mapping[str, Tensor]; use typing.Params"
        )
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            assert p.annotation is not inspect.Parameter.empty, f"{qualname}: {p.name} untyped"
            assert annotation != "Any", (
                f"{qualname}: argument {p.name} is typed Any; say what is accepted "
                "(typing.Scalar, PerTensor[...], Group, Device, or `object` for a validator)"
            )
    if fn.__name__ != "__init__":
        ret = inspect.signature(fn).return_annotation
        assert ret is not inspect.Signature.empty, f"{qualname}: no return annotation"
        assert str(ret) != "Any", f"{qualname}: returns Any; annotate what it returns"


@pytest.mark.parametrize(("qualname", "fn"), PUBLIC, ids=[q for q, _ in PUBLIC])
def test_documented_with_an_example(qualname: str, fn: Callable[..., object]) -> None:
    module, name = qualname.split(".")
    obj = getattr(importlib.import_module(f"robustft.{module}"), name)  # a class: its docstring
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{qualname} has no docstring"
    assert ">>>" in doc, f"{qualname}: its docstring has no doctest example"


TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(("qualname", "fn"), PUBLIC, ids=[q for q, _ in PUBLIC])
def test_every_public_name_is_exercised_by_a_test_module(
    qualname: str, fn: Callable[..., object]
) -> None:
    """A public name that no test file (besides this battery) mentions has shipped untested."""
    module, name = qualname.split(".")
    sources = [p for p in TESTS.rglob("*.py") if p.name != "test_api.py"]
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    users = [p for p in sources if pattern.search(p.read_text())]
    assert users, f"robustft.{module}.{name} is not used by any test module"


def test_import_robustft_exposes_every_submodule_lazily() -> None:
    code = (
        "import sys, robustft\n"
        "eager = sorted(m for m in sys.modules if m.startswith('robustft.') and "
        "m.count('.') == 1 and not m.split('.')[1].startswith('_'))\n"
        f"mods = {MODULES!r}\n"
        "assert all(hasattr(robustft, m) for m in mods)\n"
        "assert set(mods) <= set(dir(robustft))\n"
        "print(eager)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    # nothing heavier than the averaging states (registered for weights_only loading) is eager
    assert "robustft.clip" not in out.stdout
    with pytest.raises(AttributeError, match="module 'robustft' has no attribute 'nope'"):
        _ = robustft.nope  # type: ignore[attr-defined]
