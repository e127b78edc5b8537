"""The embedded benchmark end to end: ``python -m robustft.demo --quick``, run in-process.

One quick run (about 20 s) is shared by the module; a second, smaller run checks determinism.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import robustft
from robustft.demo._data import KNOWN, SHIFTS, load_splits
from robustft.demo._main import METHODS, QUICK, main, parse_args, run

CHANCE = 1.0 / KNOWN
ROWS = [
    "zero-shot",
    "FT",
    "FT + EMA",
    "KD",
    "L2-SP",
    "FeatKD",
    "CAR-FT",
    "FLYP",
    "Lipsum-FT",
    "CLIPood: MMS only",
    "CLIPood (MMS + BMA)",
    "WiSE-FT (α = 0.5)",
    "TPGM",
    "uniform soup (2 runs)",
    "greedy soup",  # "(k of 2)": k is data-dependent
    "zero-shot, UEO's prompt",
    "UEO (no labels)",
]


def _table(markdown: str, header: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header line starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    code = main(["--quick", "--output", str(out)])
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    markdown = (out / "results.md").read_text(encoding="utf-8")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {"code": code, "md": markdown, "json": results, "state": (before, after)}


def test_every_method_has_a_row_in_both_outputs(quick: dict[str, Any]) -> None:
    assert quick["code"] == 0
    names = list(quick["json"])
    assert len(names) == len(ROWS)
    for expected, got in zip(ROWS, names):
        assert got.startswith(expected)
    assert list(_table(quick["md"], "| method | ID acc")) == names
    assert list(_table(quick["md"], "| method | clean")) == names


def test_metrics_are_fractions_and_learning_happened(quick: dict[str, Any]) -> None:
    for name, r in quick["json"].items():
        for key in ("id_acc", "shift_acc", "worst_shift", "ece", "auroc", "fpr95", "hos"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert set(r["per_shift"]) == set(SHIFTS)
        assert r["worst_shift"] == min(r["per_shift"].values())
        assert math.isclose(r["shift_acc"], sum(r["per_shift"].values()) / len(SHIFTS))
        assert r["energy_gap"] >= 0.0
    zero_shot, ft = quick["json"]["zero-shot"], quick["json"]["FT"]
    assert zero_shot["id_acc"] > 1.5 * CHANCE  # pre-training taught the text-image alignment
    assert ft["id_acc"] > 1.5 * CHANCE
    assert zero_shot["energy_gap"] == 0.0  # the zero-shot model is its own reference
    assert ft["energy_gap"] > 0.0  # fine-tuning moved the features


def test_wise_sweep_endpoints_are_zero_shot_and_ft(quick: dict[str, Any]) -> None:
    sweep = _table(quick["md"], "| α |")
    main_table = _table(quick["md"], "| method | ID acc")
    assert list(sweep) == ["0", "0.25", "0.5", "0.75", "1"]
    for alpha, row in (("0", "zero-shot"), ("1", "FT"), ("0.5", "WiSE-FT (α = 0.5)")):
        assert sweep[alpha][:2] == main_table[row][:2]  # ID and shifted accuracy


def test_table_shows_percentages_of_the_json(quick: dict[str, Any]) -> None:
    table = _table(quick["md"], "| method | ID acc")
    for name, r in quick["json"].items():
        assert table[name][0] == f"{100 * r['id_acc']:.1f}"
        assert table[name][7] == f"{r['energy_gap']:.2f}"


def test_main_restores_the_torch_state(quick: dict[str, Any]) -> None:
    before, after = quick["state"]
    assert before == after


def test_same_numbers_every_run(quick: dict[str, Any], tmp_path: Path) -> None:
    main(["--quick", "--methods", "lipsum,ueo,zero-shot,ft", "--output", str(tmp_path)])
    again = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert list(again) == ["zero-shot", "FT", "FT + EMA", "Lipsum-FT", *ROWS[-2:]]
    for name, r in again.items():
        assert r == quick["json"][name], name


def test_splits_partition_the_digits() -> None:
    s = load_splits()
    parts = (s.pretrain_x, s.train_x, s.val_x, s.test_x, s.unknown_train_x, s.unknown_test_x)
    assert sum(len(t) for t in parts) == 1797  # every image in exactly one split
    for y in (s.train_y, s.val_y, s.test_y):
        assert int(y.min()) == 0 and int(y.max()) == KNOWN - 1  # labelled: known digits only
    assert set(s.pretrain_y.tolist()) == set(range(10))  # pre-training sees every digit
    for x in parts:
        assert x.shape[1:] == (3, 16, 16) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_command_line() -> None:
    assert parse_args(["--methods", "wise"]).keys == ["ft", "wise"]
    assert parse_args([]).keys == list(METHODS)
    for bad in (["--methods", "ft,bogus"], ["--methods", ","], ["--steps", "0"]):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    for keys in (["wise"], ["wise", "ft"], ["bogus"]):  # checked before any work starts
        with pytest.raises(ValueError, match=r"run: keys must be names of .* 'ft' before"):
            run(QUICK, keys)


def test_core_never_imports_the_demo() -> None:
    root = Path(robustft.__file__).parent
    for path in root.rglob("*.py"):
        if "demo" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("robustft.demo") for n in names), path
