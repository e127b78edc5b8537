"""The embedded benchmark end to end: ``python -m robustft.demo --quick``, run in-process once.

The quick run (every experiment, every figure, two seeds) is shared by the module; the other
tests check the pieces it is built from on hand values.
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
from robustft.demo._bench import QUICK
from robustft.demo._data import KNOWN, SHIFTS, load_splits, resplit
from robustft.demo._grid import select
from robustft.demo._main import docs_page, main, parse_args
from robustft.demo._reading import CLAIMS, VERDICTS, summarise, verdict
from robustft.demo._report import table

SHIFT_ROWS = [
    "zero-shot",
    "FT",
    "FT + EMA",
    "LP-FT",
    "L2-SP",
    "KD",
    "CAR-FT",
    "FeatKD",
    "FLYP",
    "Lipsum-FT",
    "CLIPood (MMS only)",
    "CLIPood (MMS + BMA)",
    "WiSE-FT (α = 0.5)",
    "TPGM",
    "uniform soup",
    "greedy soup",
]
OPEN_ROWS = [
    "zero-shot",
    "FT",
    "L2-SP",
    "KD",
    "CAR-FT",
    "FeatKD",
    "Lipsum-FT",
    "CLIPood (MMS + BMA, β = 0.1)",
    "WiSE-FT (α = 0.5)",
]
UNIVERSAL_ROWS = ["zero-shot (UEO's prompt)", "entropy min.", "IM", "UEO", "UEO (paper's lr)"]
RATES = {"id", "shifted", "worst", "ece", "base", "new", "H", "known", "pacc", "auroc", "fpr95",
         "hos", *SHIFTS}  # fmt: skip


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    code = main(["--quick", "--output", str(out)])
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    return {
        "code": code,
        "out": out,
        "md": (out / "results.md").read_text(encoding="utf-8"),
        "json": json.loads((out / "results.json").read_text(encoding="utf-8")),
        "state": (before, after),
    }


def _table(markdown: str, header: str) -> dict[str, list[str]]:
    """The rows of the first markdown table whose header line starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_every_experiment_has_its_rows_for_every_seed(quick: dict[str, Any]) -> None:
    assert quick["code"] == 0
    r = quick["json"]
    seeds = QUICK.seeds
    assert r["preset"]["seeds"] == seeds >= 2
    for name, expected in (("shift", SHIFT_ROWS), ("open", OPEN_ROWS),
                           ("universal", UNIVERSAL_ROWS)):  # fmt: skip
        rows = r[name]["rows"]
        assert list(rows) == expected, name
        for row, per_seed in rows.items():
            assert len(per_seed) == seeds, (name, row)
            for metrics in per_seed:
                for key, value in metrics.items():
                    assert math.isfinite(value), (name, row, key)
                    if key in RATES:
                        assert 0.0 <= value <= 1.0, (name, row, key, value)


def test_shift_metrics_are_consistent(quick: dict[str, Any]) -> None:
    rows = quick["json"]["shift"]["rows"]
    for row, per_seed in rows.items():
        for m in per_seed:
            per_shift = [m[s] for s in SHIFTS]
            assert m["worst"] == min(per_shift), row
            assert math.isclose(m["shifted"], sum(per_shift) / len(SHIFTS)), row
            assert m["energy_gap"] >= 0.0 and m["nll"] > 0.0
    assert all(m["energy_gap"] == 0.0 for m in rows["zero-shot"])  # its own reference
    assert all(m["energy_gap"] > 0.0 for m in rows["FT"])  # fine-tuning moved the features
    for m in quick["json"]["open"]["rows"]["FT"]:
        assert math.isclose(m["H"], 2 * m["base"] * m["new"] / (m["base"] + m["new"]))


def test_fine_tuning_raises_id_accuracy_over_zero_shot(quick: dict[str, Any]) -> None:
    summary = summarise(quick["json"]["shift"]["rows"])
    zero_shot = summary["zero-shot"]["id"][0]
    assert zero_shot > 1.5 / KNOWN  # pre-training taught the text-image alignment
    assert summary["FT"]["id"][0] > zero_shot
    assert summary["LP-FT"]["id"][0] > zero_shot + 0.2  # the probe alone is far above it
    base = summarise(quick["json"]["open"]["rows"])
    assert base["FT"]["base"][0] > base["zero-shot"]["base"][0]


def test_learning_rates_come_from_the_grid_and_validation(quick: dict[str, Any]) -> None:
    for name in ("shift", "universal"):
        exp = quick["json"][name]
        for row, scores in exp["validation"].items():
            assert len(scores) == len(QUICK.lr_multipliers)
            assert exp["lrs"][row] == select({float(k): v for k, v in scores.items()})
    assert quick["json"]["open"]["lrs"]["FT"] == quick["json"]["shift"]["lrs"]["FT"]
    assert quick["json"]["universal"]["lrs"]["UEO (paper's lr)"] == 1e-4  # the paper's own rate


def test_wise_curves_end_at_zero_shot_and_the_row(quick: dict[str, Any]) -> None:
    shift = quick["json"]["shift"]
    for row, curve in shift["wise_curves"].items():
        assert curve["0"] == [
            {"id": m["id"], "shifted": m["shifted"]} for m in shift["rows"]["zero-shot"]
        ]
        assert curve["1"] == [{"id": m["id"], "shifted": m["shifted"]} for m in shift["rows"][row]]
    assert list(shift["wise_curves"]["FT"]) == ["0", "0.25", "0.5", "0.75", "1"]
    mid = [{"id": m["id"], "shifted": m["shifted"]} for m in shift["rows"]["WiSE-FT (α = 0.5)"]]
    assert shift["wise_curves"]["FT"]["0.5"] == mid


def test_figures_are_pngs(quick: dict[str, Any]) -> None:
    for name in ("shift.png", "open.png", "universal.png"):
        data = (quick["out"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    hist = quick["json"]["universal"]["scores_seed0"]
    assert list(hist) == UNIVERSAL_ROWS
    assert len(hist["UEO"]["unknown"]) == len(load_splits().unknown_test_x)


def test_honest_reading_is_computed_from_the_rows(quick: dict[str, Any]) -> None:
    r = quick["json"]
    assert len(r["claims"]) == len(CLAIMS)
    for claim, judged in zip(CLAIMS, r["claims"], strict=True):
        rows = r[claim.experiment]["rows"]
        a = [m[claim.metric] for m in rows[claim.a]]
        b = [m[claim.metric] for m in rows[claim.b]]
        assert judged["differences"] == [x - y for x, y in zip(a, b, strict=True)]
        assert math.isclose(judged["mean"], sum(judged["differences"]) / len(a), abs_tol=1e-12)
        oriented = judged["mean"] if claim.higher else -judged["mean"]
        assert judged["verdict"] == verdict(oriented, judged["std"]) in VERDICTS
    lines = [line for line in quick["md"].splitlines() if line.endswith("** |")]
    assert len(lines) == len(CLAIMS)
    for claim, judged, line in zip(CLAIMS, r["claims"], lines, strict=True):
        assert line.startswith(f"| {claim.paper} | {claim.text} |")
        assert line.endswith(f"| **{judged['verdict']}** |")


def test_tables_show_the_json(quick: dict[str, Any]) -> None:
    rows = quick["json"]["shift"]["rows"]
    shown = _table(quick["md"], "| method | lr | ID")
    assert list(shown) == SHIFT_ROWS
    mean, std = summarise(rows)["FT"]["id"]
    assert shown["FT"][1] == f"{100 * mean:.1f} ± {100 * std:.1f}"
    assert shown["FT"][0] == f"{quick['json']['shift']['lrs']['FT']:g}"
    assert list(_table(quick["md"], "| method | lr | base")) == OPEN_ROWS
    assert list(_table(quick["md"], "| method | lr | known")) == UNIVERSAL_ROWS
    page = docs_page(quick["json"], "demo_results")
    assert page.startswith("# Results") and "![base, new and H](demo_results/open.png)" in page


def test_main_restores_the_torch_state(quick: dict[str, Any]) -> None:
    before, after = quick["state"]
    assert before == after


def test_verdicts_on_hand_values() -> None:
    assert verdict(0.05, 0.02) == "reproduced"
    assert verdict(0.01, 0.02) == "same direction, within seed spread"
    assert verdict(-0.01, 0.02) == "opposite, within seed spread"
    assert verdict(-0.05, 0.02) == "not reproduced"
    assert verdict(0.0005, 0.0) == "no difference"  # below 0.1 points
    assert summarise({"r": [{"m": 1.0}, {"m": 3.0}]}) == {"r": {"m": [2.0, math.sqrt(2.0)]}}
    assert summarise({"r": [{"m": 0.5}]}) == {"r": {"m": [0.5, 0.0]}}
    assert select({1e-4: 0.9, 3e-5: 0.9, 3e-4: 0.8}) == 3e-5  # ties go to the smaller rate
    assert select({1e-4: 0.7, 3e-5: 0.6}) == 1e-4
    text = table({"a": [{"id": 0.5}, {"id": 0.7}]}, {"id": "ID"}, {"a": 1e-4})
    assert text.splitlines()[2] == "| a | 0.0001 | 60.0 ± 14.1 |"


def test_splits_partition_the_digits_and_resplit_keeps_the_pool() -> None:
    s = load_splits()
    parts = (s.pretrain_x, s.train_x, s.val_x, s.test_x, s.unknown_train_x, s.unknown_test_x)
    assert sum(len(t) for t in parts) == 1797  # every image in exactly one split
    for y in (s.train_y, s.val_y, s.test_y):
        assert int(y.min()) == 0 and int(y.max()) == KNOWN - 1  # labelled: known digits only
    r = resplit(s, 1)
    assert len(r.train_y) == len(s.train_y) and len(r.val_y) == len(s.val_y)
    pool = torch.cat([s.train_x, s.val_x]).flatten(1)
    again = torch.cat([r.train_x, r.val_x]).flatten(1)
    assert torch.equal(pool.sort(0).values, again.sort(0).values)  # the same images
    assert not torch.equal(r.train_y, s.train_y)  # another partition
    assert torch.equal(r.test_x, s.test_x)  # the test set is shared by every seed


def test_command_line() -> None:
    args = parse_args(["--quick", "--seeds", "3"])
    assert args.quick and args.seeds == 3 and args.docs is None
    for bad in (["--seeds", "0"], ["--steps", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


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
