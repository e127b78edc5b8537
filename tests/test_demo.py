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
from robustft.demo._bench import QUICK, participation_ratio, relative_change
from robustft.demo._data import KNOWN, SHIFTS, load_splits, resplit
from robustft.demo._grid import label, select
from robustft.demo._main import docs_page, main, parse_args
from robustft.demo._reading import CLAIMS, VERDICTS, paired_test, summarise, verdict
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
UNIVERSAL_ROWS = ["zero-shot (UEO's prompt)", "entropy min.", "IM", "UEO", "UEO (oracle weights)"]
PUBLISHED = Path(__file__).parents[1] / "docs" / "demo_results" / "results.json"
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


def test_the_regime_is_measured_every_run(quick: dict[str, Any]) -> None:
    regime = quick["json"]["regime"]
    assert regime["scale"] == pytest.approx(100.0)  # every method runs in its paper's units
    assert quick["json"]["scale"] == pytest.approx(100.0)
    assert regime["random_texts_seen"] >= 0.95  # Lipsum-FT's texts: tokens seen in pre-training
    assert regime["random_texts_seen_full_vocabulary"] < 0.05  # the official draw would not be
    assert 1.0 <= regime["participation_ratio"] <= regime["dim"]
    checks = regime["checks"]
    assert set(checks) == {
        "scale", "random_texts_seen", "participation_ratio", "zero_shot_id", "ft_gain_id",
        "shifts_ft_loses", "pool_mcm_auroc",
    }  # fmt: skip
    summary = summarise(quick["json"]["shift"]["rows"])
    gain = summary["FT"]["id"][0] - summary["zero-shot"]["id"][0]
    assert checks["ft_gain_id"]["value"] == pytest.approx(gain)
    assert checks["pool_mcm_auroc"]["value"] == quick["json"]["universal"]["confidence_auroc"]
    lost = [s for s in SHIFTS if summary["FT"][s][0] < summary["zero-shot"][s][0]]
    assert regime["lost_shifts"] == lost and checks["shifts_ft_loses"]["value"] == len(lost)


def test_the_published_full_run_is_in_the_papers_regime() -> None:
    """The Results page's run (``make demo``'s budget) meets every regime target it reports."""
    published = json.loads(PUBLISHED.read_text(encoding="utf-8"))
    assert published["preset"]["seeds"] >= 5
    failing = {k: c for k, c in published["regime"]["checks"].items() if not c["holds"]}
    assert not failing
    checks = published["regime"]["checks"]
    assert checks["scale"]["value"] >= 50 and checks["zero_shot_id"]["value"] <= 0.85
    assert checks["ft_gain_id"]["value"] >= 0.05 and checks["shifts_ft_loses"]["value"] >= 2
    assert checks["pool_mcm_auroc"]["value"] >= 0.70
    assert checks["random_texts_seen"]["value"] >= 0.95
    assert checks["participation_ratio"]["value"] >= published["regime"]["dim"] / 4
    for name in ("shift", "open", "universal"):  # every seed method moved from zero-shot
        for row in ("Lipsum-FT", "CLIPood (MMS + BMA)", "UEO"):
            if row in published[name]["rows"]:
                assert row not in published[name]["not_moved"], (name, row)


def test_points_come_from_the_grid_and_validation(quick: dict[str, Any]) -> None:
    for name in ("shift", "universal"):
        exp = quick["json"][name]
        for row, scores in exp["validation"].items():
            weights = QUICK.lipsum_weights if row == "Lipsum-FT" else (None,)
            assert len(scores) == len(QUICK.lr_multipliers) * len(weights)
            assert exp["points"][row] in scores
            best = max(scores.values())
            assert scores[exp["points"][row]] == best
            runner_up = sorted(scores.values())[-2] if len(scores) > 1 else -math.inf
            assert exp["margins"][row] == pytest.approx(best - runner_up)
    shift = quick["json"]["shift"]
    assert quick["json"]["open"]["points"]["FT"][0] == shift["lrs"]["FT"]
    assert quick["json"]["open"]["points"]["Lipsum-FT"] == [
        shift["lrs"]["Lipsum-FT"],
        shift["weights"]["Lipsum-FT"],
    ]


def test_did_not_move_flags_follow_the_changes(quick: dict[str, Any]) -> None:
    for name in ("shift", "open", "universal"):
        exp = quick["json"][name]
        expected = [r for r, c in exp["change"].items() if sum(c) / len(c) < 0.01]
        assert exp["not_moved"] == expected
        for row in expected:
            shown = [line for line in quick["md"].splitlines() if line.startswith(f"| {row} (")]
            assert shown and "(did not move)" in shown[0]


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
        d = judged["differences"] if claim.higher else [-x for x in judged["differences"]]
        moved_rows = r[claim.experiment]["not_moved"]
        if claim.a in moved_rows or claim.b in moved_rows:
            assert judged["verdict"] == "not judged" and "did not move" in judged["reason"]
        else:
            p = paired_test(d, margin=claim.margin)
            assert (judged["p_support"], judged["p_against"]) == p
            assert judged["verdict"] == verdict(*p)
        assert judged["verdict"] in VERDICTS
    lines = [
        line for line in quick["md"].splitlines() if any(f"| **{v}**" in line for v in VERDICTS)
    ]
    assert len(lines) == len(CLAIMS)
    for claim, judged, line in zip(CLAIMS, r["claims"], lines, strict=True):
        assert line.startswith(f"| {claim.paper} | {claim.text} |")
        assert f"| **{judged['verdict']}**" in line


def test_tables_show_the_json(quick: dict[str, Any]) -> None:
    rows = quick["json"]["shift"]["rows"]
    shown = _table(quick["md"], "| method | lr (λ) | moved | ID")
    not_moved = quick["json"]["shift"]["not_moved"]
    assert [r.removesuffix(" (did not move)") for r in shown] == SHIFT_ROWS
    ft = next(v for k, v in shown.items() if k.startswith("FT"))
    mean, std = summarise(rows)["FT"]["id"]
    assert ft[2] == f"{100 * mean:.1f} ± {100 * std:.1f}"
    assert ft[0] == quick["json"]["shift"]["points"]["FT"]
    assert ("FT" in not_moved) == (not shown.get("FT"))
    for header, expected in (("| method | lr (λ) | moved | base", OPEN_ROWS),
                             ("| method | lr (λ) | moved | known", UNIVERSAL_ROWS)):  # fmt: skip
        assert [r.removesuffix(" (did not move)") for r in _table(quick["md"], header)] == expected
    page = docs_page(quick["json"], "demo_results")
    assert page.startswith("# Results") and "![base, new and H](demo_results/open.png)" in page


def test_one_process_gives_the_same_numbers(quick: dict[str, Any], tmp_path: Path) -> None:
    """``--jobs 1`` (every experiment here) equals the default two-process schedule."""
    assert main(["--quick", "--jobs", "1", "--output", str(tmp_path)]) == 0
    alone = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))

    def numbers(r: dict[str, Any]) -> dict[str, Any]:
        r = {k: v for k, v in r.items() if k not in ("seconds", "jobs")}
        for name in ("shift", "open", "universal"):
            r[name] = {k: v for k, v in r[name].items() if k not in ("seconds", "train_seconds")}
        return r

    assert numbers(alone) == numbers(quick["json"])


def test_main_restores_the_torch_state(quick: dict[str, Any]) -> None:
    before, after = quick["state"]
    assert before == after


def test_pieces_on_hand_values() -> None:
    assert verdict(0.01, 0.99) == "reproduced"
    assert verdict(0.99, 0.01) == "refuted"
    assert verdict(0.3, 0.7) == "inconclusive"
    assert summarise({"r": [{"m": 1.0}, {"m": 3.0}]}) == {"r": {"m": [2.0, math.sqrt(2.0)]}}
    assert summarise({"r": [{"m": 0.5}]}) == {"r": {"m": [0.5, 0.0]}}
    scores = {(1e-4, None): 0.9, (3e-5, None): 0.9, (3e-4, None): 0.8}
    assert select(scores, (1e-4, None)) == (1e-4, None)  # ties go to the paper's own rate
    assert select(scores, (1e-5, None)) == (3e-5, None)  # ... or the nearest to it
    assert select({(1e-4, None): 0.7, (3e-5, None): 0.6}, (3e-5, None)) == (1e-4, None)
    lipsum = {(1e-5, 0.3): 0.8, (1e-5, 3.0): 0.8, (3e-5, 1.0): 0.8}
    assert select(lipsum, (1e-5, 1.0)) == (1e-5, 3.0)  # the rate first, then the weight: 3 is
    # nearer 1 than 0.3 in log scale
    assert label((1e-5, None)) == "1e-05" and label((3e-5, 0.3)) == "3e-05, λ 0.3"
    text = table({"a": [{"id": 0.5}, {"id": 0.7}]}, {"id": "ID"}, {"a": "1e-05"}, {"a": [0.5, 0.3]})
    assert text.splitlines()[2] == "| a | 1e-05 | 40.0 % | 60.0 ± 14.1 |"
    moved = table({"a": [{"id": 0.5}]}, {"id": "ID"}, None, {"a": [0.001]}, ["a"])
    assert moved.splitlines()[2] == "| a (did not move) | 0.1 % | 50.0 |"
    start = {"w": torch.tensor([3.0, 4.0]), "frozen": torch.ones(2)}
    assert relative_change({"w": torch.tensor([3.0, 4.5]), "frozen": torch.ones(2)}, start) == 0.1
    assert relative_change(dict(start), start) == 0.0
    line = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert participation_ratio(line) == pytest.approx(1.0)
    # four one-hot points span a 3-d simplex once centred: 3 equal directions
    assert participation_ratio(torch.eye(4).repeat(3, 1)) == pytest.approx(3.0)


def test_splits_are_glyph_disjoint_and_resplit_keeps_the_pool() -> None:
    s = load_splits()
    for x in (s.train_glyph, s.val_glyph):
        assert not set(x.tolist()) & set(s.pretrain_glyphs.tolist())
    assert not set(s.train_glyph.tolist()) & set(s.val_glyph.tolist())
    for y in (s.train_y, s.val_y, s.test_y):
        assert int(y.min()) == 0 and int(y.max()) == KNOWN - 1  # labelled: known digits only
    assert len(s.val_y) >= 400  # a validation split that ties cannot decide
    assert set(s.shifted) == set(SHIFTS)
    for images in (*s.shifted.values(), s.train_x, s.test_x, s.target_train_x):
        assert images.shape[1:] == (3, 32, 32) and float(images.min()) >= 0.0
        assert float(images.max()) <= 1.0
    assert all(len(x) == len(s.test_y) for x in s.shifted.values())
    assert len(s.target_train_x) == len(s.train_y) and len(s.target_val_x) == len(s.val_y)
    r = resplit(s, 1)
    assert len(r.train_y) + len(r.val_y) == len(s.train_y) + len(s.val_y)
    pool = torch.cat([s.train_x, s.val_x]).flatten(1)
    again = torch.cat([r.train_x, r.val_x]).flatten(1)
    assert torch.equal(pool.sort(0).values, again.sort(0).values)  # the same images
    assert not set(r.train_glyph.tolist()) & set(r.val_glyph.tolist())  # glyph-disjoint again
    assert not torch.equal(r.train_glyph, s.train_glyph)  # another partition
    assert torch.equal(r.test_x, s.test_x)  # the test set is shared by every seed
    assert torch.equal(resplit(r, 0).train_x, s.train_x)  # the cut depends on the seed only


def test_command_line() -> None:
    args = parse_args(["--quick", "--seeds", "3"])
    assert args.quick and args.seeds == 3 and args.docs is None
    for bad in (["--seeds", "0"], ["--steps", "0"], ["--threads", "0"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_an_interrupted_demo_ends_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import signal

    from robustft.demo import _main
    from robustft.recipes._stopping import Interrupted

    def stopped(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise Interrupted(signal.SIGINT, 2, None)

    monkeypatch.setattr(_main, "run", stopped)
    assert main(["--quick", "--output", str(tmp_path / "out")]) == 130
    assert (
        capsys.readouterr().err == "python -m robustft.demo: stopped by SIGINT; nothing written\n"
    )
    assert not (tmp_path / "out").exists()


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
