"""robustft.recipes._data: class names, open-set image folders, held-out splits, NAME=DIR options."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from recipes_fixtures import DIGITS, KNOWN, write_digits

from robustft.recipes._data import FolderDataset, class_names, holdout, parse_named_paths


def _image(path: Path, mode: str = "RGB", value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, ...] = value if mode in ("L", "P") else (value,) * len(mode)
    Image.new(mode, (4, 4), color).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{b_cat,a_dog,c_fox}: images (one nested), plus folders that must be ignored."""
    root = tmp_path / "root"
    _image(root / "b_cat" / "1.png")
    _image(root / "b_cat" / "0.JPG")  # extensions are case-insensitive
    _image(root / "a_dog" / "sub" / "deep.png")  # nested below the class folder
    _image(root / "a_dog" / "0.png", mode="L", value=7)
    _image(root / "a_dog" / ".hidden.png")  # hidden file: skipped
    (root / "a_dog" / "notes.txt").write_text("not an image")
    _image(root / "c_fox" / "0.png", mode="RGBA", value=9)
    (root / "empty").mkdir()  # no image: not a class folder
    (root / "text_only").mkdir()
    (root / "text_only" / "x.txt").write_text("x")
    _image(root / ".ipynb_checkpoints" / "0.png")  # hidden folder: skipped
    _image(root / "stray.png")  # directly in root: not in a class folder
    return root


# --- class_names -------------------------------------------------------------------------------


def test_class_names_from_folders(tree: Path) -> None:
    folders, names = class_names(tree)
    assert folders == ["a_dog", "b_cat", "c_fox"]
    assert names == ["a dog", "b cat", "c fox"]
    assert class_names(str(tree)) == (folders, names)


def test_class_names_text_file_keeps_its_order_and_subset(tree: Path) -> None:
    names_file = tree.parent / "classes.txt"
    names_file.write_text("c_fox\tred fox \n\n  b_cat\n   \n", encoding="utf-8")
    assert class_names(tree, names_file) == (["c_fox", "b_cat"], ["red fox", "b cat"])


def test_class_names_lists_folders_without_images_when_a_file_names_them(tree: Path) -> None:
    names_file = tree.parent / "classes.txt"
    names_file.write_text("empty\tnothing\n")
    assert class_names(tree, names_file) == (["empty"], ["nothing"])


def test_class_names_json_object_and_list(tree: Path) -> None:
    obj = tree.parent / "names.json"
    obj.write_text(json.dumps({"b_cat": "a cat", "a_dog": "a dog "}))
    assert class_names(tree, obj) == (["b_cat", "a_dog"], ["a cat", "a dog"])
    lst = tree.parent / "names.JSON"
    lst.write_text(json.dumps(["c_fox", "a_dog"]))
    assert class_names(tree, lst) == (["c_fox", "a_dog"], ["c_fox", "a_dog"])


def test_class_names_digits_fixture(tmp_path: Path) -> None:
    digits = write_digits(tmp_path, per_class=3)
    folders, names = class_names(digits.train, digits.names_file)
    assert folders == DIGITS[:KNOWN]
    assert names == [f"digit {d}" for d in DIGITS[:KNOWN]]
    assert class_names(digits.train)[0] == sorted(DIGITS[:KNOWN])


def test_class_names_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"class_names: root must be a str or a path, got 3"):
        class_names(3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"class_names: root must be an existing directory"):
        class_names(tmp_path / "missing")
    bare = tmp_path / "bare"
    (bare / "empty").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"class_names: root .* has no class folder holding an image"
    ):
        class_names(bare)
    with pytest.raises(TypeError, match=r"class_names: names_file must be None, a str or a path"):
        class_names(tree, 1)  # type: ignore[arg-type]
    with pytest.raises(
        FileNotFoundError, match=r"class_names: names_file must be an existing file"
    ):
        class_names(tree, tmp_path / "nope.txt")


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("n.json", "{not json", r"is not valid JSON"),
        (
            "n.json",
            "3",
            r"must hold a JSON object \{folder: name\} or a list of names, got a JSON int",
        ),
        ("n.json", '{"a_dog": 3}', r"must map folders to non-empty string names, got \[3\]"),
        ("n.json", '{"a_dog": " "}', r"non-empty string names"),
        ("n.json", "[]", r"lists no classes"),
        ("n.txt", "\n\n", r"lists no classes"),
        ("n.txt", "a_dog\t\n", r"line 1 must be 'folder' or 'folder<TAB>name', got 'a_dog\\t'"),
        ("n.txt", "b_cat\n\t dog\n", r"line 2 must be 'folder' or 'folder<TAB>name'"),
        (
            "n.txt",
            "a_dog\nb_cat\na_dog\tdog\n",
            r"must not repeat a folder, got duplicates \['a_dog'\]",
        ),
        ("n.txt", "a_dog/sub\n", r"must hold plain folder names .* got \['a_dog/sub'\]"),
        ("n.txt", "..\n", r"must hold plain folder names"),
        ("n.txt", "a_dog\nzebra\nyak\n", r"lists folders missing from root .*: \['yak', 'zebra'\]"),
    ],
)
def test_class_names_bad_names_file(
    tree: Path, tmp_path: Path, file: str, content: str, message: str
) -> None:
    path = tmp_path / file
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"class_names: names_file .*" + message):
        class_names(tree, path)


def test_class_names_rejects_non_utf8_text(tree: Path, tmp_path: Path) -> None:
    path = tmp_path / "n.txt"
    path.write_bytes(b"\xff\xfe\x00a")
    with pytest.raises(ValueError, match=r"class_names: names_file .* is not a UTF-8 text file"):
        class_names(tree, path)


# --- FolderDataset -----------------------------------------------------------------------------


def test_folder_dataset_labels_order_and_unknowns(tree: Path) -> None:
    data = FolderDataset(tree, ["b_cat", "a_dog"])
    files = [Path(p).relative_to(tree).as_posix() for p, _ in data.samples]
    assert files == [
        "a_dog/0.png",
        "a_dog/sub/deep.png",
        "b_cat/0.JPG",
        "b_cat/1.png",
        "c_fox/0.png",
    ]
    assert data.targets == [1, 1, 0, 0, -1]
    assert [label for _, label in data.samples] == data.targets
    assert data.classes == ["b_cat", "a_dog"]
    assert data.class_to_idx == {
        "a_dog": 1,
        "b_cat": 0,
        "c_fox": -1,
        "empty": -1,
        "text_only": -1,
    }
    assert data.unknown_folders == ["c_fox", "empty", "text_only"]
    assert data.known is False
    assert len(data) == 5


def test_folder_dataset_known_and_missing_classes(tree: Path) -> None:
    data = FolderDataset(tree, ["a_dog", "b_cat", "c_fox", "zebra"])  # zebra: no folder, fine
    assert data.targets == [0, 0, 1, 1, 2]
    assert data.known is True
    assert data.classes[3] == "zebra"


def test_folder_dataset_items_are_rgb_and_transformed(tree: Path) -> None:
    data = FolderDataset(tree, ("a_dog", "b_cat"))
    image, label = data[0]  # a_dog/0.png, a grey "L" image of value 7
    assert isinstance(label, int) and label == 0
    assert image.mode == "RGB" and image.size == (4, 4)
    assert image.getpixel((0, 0)) == (7, 7, 7)
    rgba, unknown = data[4]  # c_fox/0.png, RGBA
    assert rgba.mode == "RGB" and rgba.getpixel((1, 1)) == (9, 9, 9) and unknown == -1

    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)

    with_transform = FolderDataset(tree, ["a_dog", "b_cat"], transform=to_tensor)
    x, y = with_transform[0]
    assert y == 0
    torch.testing.assert_close(x, torch.full((3, 4, 4), 7.0))


def test_folder_dataset_pickles_for_worker_processes(tree: Path) -> None:
    data = FolderDataset(tree, ["a_dog"])
    copy = pickle.loads(pickle.dumps(data))
    assert copy.samples == data.samples and copy.targets == data.targets
    assert copy[0][0].getpixel((0, 0)) == data[0][0].getpixel((0, 0))


def test_folder_dataset_digits_fixture(tmp_path: Path) -> None:
    digits = write_digits(tmp_path, per_class=6, seed=1)
    folders, _ = class_names(digits.train, digits.names_file)
    train = FolderDataset(digits.train, folders)
    assert len(train) == 6 * KNOWN and train.known
    assert sorted(train.targets) == [c for c in range(KNOWN) for _ in range(6)]
    val = FolderDataset(digits.val, folders)
    assert len(val) == 2 * KNOWN and val.known
    test = FolderDataset(digits.test, folders)
    shifted = FolderDataset(digits.shifted, folders)
    assert [Path(p).name for p, _ in shifted.samples] == [Path(p).name for p, _ in test.samples]
    for (clean, y), (inverted, y_shift) in zip(test, shifted):  # the shift is an inversion
        assert y == y_shift
        a, b = np.asarray(clean, dtype=np.int16), np.asarray(inverted, dtype=np.int16)
        np.testing.assert_array_equal(a + b, np.full_like(a, 255))
    opened = FolderDataset(digits.open, folders)
    assert opened.unknown_folders == ["five", "six"]
    assert opened.targets.count(-1) == 2 * 3 and not opened.known
    names = {Path(p).name for p, _ in train.samples}
    for other in (val, test, opened):  # disjoint images across splits
        assert names.isdisjoint(Path(p).name for p, _ in other.samples)


def test_folder_dataset_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"FolderDataset: root must be a str or a path"):
        FolderDataset(None, ["a_dog"])  # type: ignore[arg-type]
    with pytest.raises(
        FileNotFoundError, match=r"FolderDataset: root must be an existing directory"
    ):
        FolderDataset(tmp_path / "missing", ["a_dog"])
    with pytest.raises(
        TypeError, match=r"FolderDataset: folders must be a sequence of folder names"
    ):
        FolderDataset(tree, "a_dog")
    with pytest.raises(
        TypeError, match=r"FolderDataset: folders must hold str folder names, got 3"
    ):
        FolderDataset(tree, ["a_dog", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"FolderDataset: folders must name at least one class"):
        FolderDataset(tree, [])
    with pytest.raises(ValueError, match=r"FolderDataset: folders must not repeat a folder"):
        FolderDataset(tree, ["a_dog", "b_cat", "a_dog"])
    with pytest.raises(ValueError, match=r"FolderDataset: folders must hold plain folder names"):
        FolderDataset(tree, ["a_dog/sub"])
    empty = tmp_path / "no_images"
    (empty / "a_dog").mkdir(parents=True)
    _image(empty / "stray.png")
    with pytest.raises(
        ValueError, match=r"FolderDataset: root .* holds no image in any sub-folder"
    ):
        FolderDataset(empty, ["a_dog"])


# --- holdout -----------------------------------------------------------------------------------


def test_holdout_hand_counts() -> None:
    labels = [0, 0, 0, 0, 1, 1, 2]  # class 0: round(1.0)=1; class 1: round(0.5)=0 -> 1; 2: single
    train, val = holdout(labels, 0.25, seed=0)
    assert sorted([labels[i] for i in val]) == [0, 1]
    assert train == sorted(set(range(7)) - set(val)) and val == sorted(val)
    assert 6 in train


def test_holdout_is_stratified_and_clipped() -> None:
    labels = [0] * 10 + [1] * 20 + [-1] * 30
    _, val = holdout(labels, 0.2, seed=3)
    assert [sum(labels[i] == c for i in val) for c in (0, 1, -1)] == [2, 4, 6]
    _, val = holdout([5, 5, 5, 5], 0.9, seed=0)  # round(3.6) = 4 is clipped to 3
    assert len(val) == 3


def test_holdout_is_seeded() -> None:
    labels = [0] * 50
    assert holdout(labels, 0.5, seed=7) == holdout(labels, 0.5, seed=7)
    assert holdout(labels, 0.5, seed=7) != holdout(labels, 0.5, seed=8)


def test_holdout_accepts_arrays_and_tensors() -> None:
    labels = [0, 1, 1, 0, 2, 2, 2, 1]
    expected = holdout(labels, 0.5, seed=0)
    assert holdout(np.array(labels, dtype=np.int32), 0.5, seed=0) == expected
    assert holdout(torch.tensor(labels, dtype=torch.int8), 0.5, seed=0) == expected
    assert holdout(tuple(labels), np.float32(0.5), seed=np.int64(0)) == expected


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"labels": [0, 0], "fraction": 0.0}, ValueError, r"fraction must be in \(0, 1\), got 0.0"),
        ({"labels": [0, 0], "fraction": 1}, ValueError, r"fraction must be in \(0, 1\), got 1"),
        ({"labels": [0, 0], "fraction": float("nan")}, ValueError, r"fraction must not be NaN"),
        ({"labels": [0, 0], "fraction": "0.5"}, TypeError, r"fraction must be a real number"),
        ({"labels": [0, 0], "seed": -1}, ValueError, r"seed must be an int >= 0, got -1"),
        ({"labels": [0, 0], "seed": 1.0}, TypeError, r"seed must be an int"),
        ({"labels": []}, ValueError, r"labels must not be empty"),
        ({"labels": [0.0, 1.0]}, TypeError, r"labels must be a 1-d sequence of ints, .*float64"),
        ({"labels": [True, False]}, TypeError, r"labels must be a 1-d sequence of ints, .*bool"),
        ({"labels": [[0, 1]]}, TypeError, r"labels must be a 1-d sequence of ints"),
        ({"labels": "0011"}, TypeError, r"labels must be a sequence of ints, got '0011'"),
        ({"labels": {0, 1}}, TypeError, r"labels must be a sequence of ints"),
        ({"labels": torch.zeros(3)}, TypeError, r"labels must be an integer tensor"),
        (
            {"labels": [0, 1, 2]},
            ValueError,
            r"labels must have at least one class with 2 or more samples to hold any out, got 3 samples in 3 classes",
        ),
    ],
)
def test_holdout_errors(kwargs: dict, error: type[Exception], message: str) -> None:
    args = {"fraction": 0.5, "seed": 0, **kwargs}
    with pytest.raises(error, match=r"holdout: " + message):
        holdout(args.pop("labels"), args.pop("fraction"), **args)


# --- parse_named_paths -------------------------------------------------------------------------


def test_parse_named_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("r", "sketch", "a=b", "home_data"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "sketch")
    specs = [
        f"imagenet-r={tmp_path / 'r'}",
        f"{tmp_path / 'sketch'}/",
        str(tmp_path / "a=b"),  # '=' inside a path, no name
        "home=~/home_data",
        f" spaced ={tmp_path / 'r'}",
    ]
    named = parse_named_paths(specs, fn="robustft finetune", option="--eval")
    assert list(named) == ["imagenet-r", "sketch", "a=b", "home", "spaced"]
    assert named["imagenet-r"] == tmp_path / "r"
    assert named["sketch"] == tmp_path / "sketch"
    assert named["a=b"] == tmp_path / "a=b"
    assert named["home"] == tmp_path / "home_data"
    assert parse_named_paths(["."], fn="f", option="--o") == {"sketch": Path(".")}
    assert parse_named_paths([], fn="f", option="--o") == {}


def test_parse_named_paths_errors(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    good = str(tmp_path / "r")

    def parse(specs: object) -> dict[str, Path]:
        return parse_named_paths(specs, fn="robustft evaluate", option="--eval")  # type: ignore[arg-type]

    prefix = r"robustft evaluate: --eval "
    with pytest.raises(TypeError, match=prefix + r"must be a list of NAME=DIR strings, got 'x=y'"):
        parse("x=y")
    with pytest.raises(TypeError, match=prefix + r"values must be NAME=DIR strings, got 3"):
        parse([good, 3])
    with pytest.raises(ValueError, match=prefix + r"must be NAME=DIR or DIR, got an empty value"):
        parse([""])
    with pytest.raises(
        ValueError, match=prefix + r"must be NAME=DIR or DIR, got '=.*' \(empty name\)"
    ):
        parse([f"={good}"])
    with pytest.raises(ValueError, match=prefix + r"must be NAME=DIR or DIR, got 'x=' \(no DIR\)"):
        parse(["x="])
    with pytest.raises(ValueError, match=prefix + r"value '/' has no folder name to use"):
        parse(["/"])
    with pytest.raises(
        FileNotFoundError, match=prefix + r"must name an existing directory, got 'x="
    ):
        parse([f"x={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match=prefix + r"names must be unique, got 'r' for both"):
        parse([good, f"r={good}"])
