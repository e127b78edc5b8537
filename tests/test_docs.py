"""The API reference documents every public name, and the package layout keeps its promises."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
PUBLIC = sorted(p.stem for p in API.glob("*.md") if p.stem != "index")
CORE = [
    "tree",
    "typing",
    "distributed",
    "losses",
    "averaging",
    "merging",
    "projections",
    "metrics",
    "scores",
]


def test_every_public_module_has_an_api_page() -> None:
    for name in ["tree", "typing", "distributed"]:
        assert name in PUBLIC, f"docs/api/{name}.md is missing"
    for pkg in (ROOT / "robustft").iterdir():
        if pkg.is_dir() and (pkg / "__init__.py").exists() and pkg.name not in ("demo", "recipes"):
            assert pkg.name in PUBLIC, f"robustft.{pkg.name} has no docs/api/{pkg.name}.md"


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_in_all_is_documented(name: str) -> None:
    module = importlib.import_module(f"robustft.{name}")
    text = (API / f"{name}.md").read_text()
    assert f".. currentmodule:: robustft.{name}" in text or f"robustft.{name}." in text
    documented = set(
        re.findall(r"\.\. auto(?:function|class|data|attribute|exception)::\s+([\w.]+)", text)
    )
    documented = {d.removeprefix(f"robustft.{name}.") for d in documented}
    missing = sorted(set(module.__all__) - documented)
    assert not missing, f"docs/api/{name}.md does not document {missing}"
    for n in module.__all__:
        assert hasattr(module, n), f"robustft.{name}.__all__ names {n!r}, which does not exist"


def test_core_modules_import_neither_open_clip_nor_recipes() -> None:
    code = (
        "import sys\n"
        f"import importlib\nfor m in {CORE!r}:\n"
        "    try:\n        importlib.import_module('robustft.' + m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name != 'robustft.' + m: raise\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'open_clip' or m.startswith(('robustft.recipes', 'robustft.demo'))]\n"
        "print(bad)\nassert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_version_has_a_single_source() -> None:
    import robustft
    from robustft._version import __version__

    assert robustft.__version__ == __version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert (ROOT / "robustft" / "py.typed").exists()
