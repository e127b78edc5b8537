"""``--descriptions FILE``: a run's zero-shot head from class descriptions (CuPL / DRM layout).

The head every classifier method starts from and reports as zero-shot is
:func:`robustft.clip.description_head` of the file's descriptions; the run records them and
later commands refuse an edited file; FLYP-style methods rebuild their exported head from the
same descriptions; UEO (whose head is its learned prompt's) refuses the flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_recipes_cli import Tiny, argv, make_tiny, overrides, read_json, run
from test_recipes_distributed import CLASSES, _setup

from robustft import clip
from robustft.recipes import build, load_model, resolve
from robustft.recipes._cli import main


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


def _descriptions(tiny: Tiny) -> dict[str, list[str]]:
    names = [line.split("\t")[-1] for line in tiny.digits.names_file.read_text().splitlines()]
    return {n: [f"a photo of the {n}", f"a handwritten {n} on a dark page"] for n in names}


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def described(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("descriptions")
    file = _write(base / "desc.json", _descriptions(tiny))
    out = run(overrides(tiny, base / "ft", "ft", descriptions=str(file), steps=2, save_every=1))
    return out, file


def test_the_zero_shot_head_is_the_descriptions_head(
    tiny: Tiny, described: tuple[Path, Path]
) -> None:
    out, _ = described
    record = read_json(out / "run.json")
    desc = _descriptions(tiny)
    assert record["descriptions"] == desc
    bundle = load_model(str(tiny.config), pretrained=str(tiny.weights))
    names = list(desc)
    with torch.no_grad():
        want = clip.description_head(bundle.model, bundle.tokenizer, desc, names)
        templates = clip.zero_shot_head(bundle.model, bundle.tokenizer, names, ["a photo of a {}."])
    results = read_json(out / "results.json")
    assert "zero-shot" in results["results"]
    # the zero-shot row's head is the descriptions' (not the templates'); a 2-step ft starts there
    got = load_file(str(out / "last.safetensors"))["head"]
    assert not torch.allclose(want, templates, atol=1e-3)
    assert torch.allclose(got, want, atol=0.05) and not torch.allclose(got, templates, atol=1e-4)


def test_an_edited_descriptions_file_is_refused(
    tiny: Tiny, described: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, file = described
    original = file.read_text(encoding="utf-8")
    edited = _descriptions(tiny)
    edited[next(iter(edited))] = ["only one now"]
    _write(file, edited)
    try:
        code = main(["evaluate", "--run", str(out), "--eval", f"t={tiny.digits.test}"])
    finally:
        file.write_text(original, encoding="utf-8")
    assert code != 0
    assert "the class descriptions differ (10 recorded, 9 now)" in capsys.readouterr().err


def test_flyp_rebuilds_its_head_from_the_descriptions() -> None:
    _, ctx, _ = _setup("flyp")
    desc = {c: [f"a picture of {c}", f"{c}, drawn"] for c in CLASSES}
    method = build(ctx._replace(descriptions=desc))
    exported = method.export(method.module)
    with torch.no_grad():
        want = clip.description_head(ctx.model, ctx.tokenizer, desc, CLASSES)
    torch.testing.assert_close(exported["head"], want, rtol=1e-5, atol=1e-6)
    plain = build(ctx).export(build(ctx).module)["head"]
    assert not torch.allclose(plain, want, atol=1e-3)


def test_bad_files_and_settings_are_refused(tiny: Tiny, tmp_path: Path, capsys: Any) -> None:
    missing = _write(tmp_path / "missing.json", {"digit zero": ["a zero"]})
    code = main(argv(overrides(tiny, tmp_path / "bad", "ft", descriptions=str(missing))))
    err = capsys.readouterr().err
    assert code != 0 and "--descriptions" in err and "missing classes" in err
    with pytest.raises(
        ValueError, match=r"--descriptions .* builds a head from class descriptions"
    ):
        resolve({"method": "ueo", "descriptions": str(missing)})
    with pytest.raises(
        ValueError, match=r"--descriptions-match .* is order, but no --descriptions"
    ):
        resolve({"descriptions_match": "order"})


def test_descriptions_by_file_order(tiny: Tiny, tmp_path: Path) -> None:
    desc = _descriptions(tiny)
    ordered = _write(tmp_path / "ordered.json", {f"k{i}": v for i, v in enumerate(desc.values())})
    out = run(
        overrides(
            tiny, tmp_path / "ordered", "ft", descriptions=str(ordered),
            descriptions_match="order", steps=1,
        )
    )  # fmt: skip
    assert read_json(out / "run.json")["descriptions"] == desc
