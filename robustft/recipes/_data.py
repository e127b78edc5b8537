"""Image-folder data for the recipes: class names, open-set datasets, held-out validation splits.

Data are torchvision ``ImageFolder`` trees, ``root/<class folder>/<image>`` (images may sit in
sub-folders of a class folder). The *class folders* -- from a class-names file, or the folders of
the training root -- fix the label space: label ``i`` is ``folders[i]``. An evaluation root may
lack some of those classes and may hold folders that are not among them: their images are
*unknown* samples with label ``-1`` (open set, SPEC §0). Folders and files whose name starts with
a dot (``.ipynb_checkpoints``, macOS ``._x.jpg``) are skipped everywhere.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from robustft._checks import check_int, check_labels, check_number, describe, fmt_keys

__all__ = ["FolderDataset", "class_names", "holdout", "parse_named_paths"]


def _is_image(path: str) -> bool:
    """An image file by extension (torchvision's ``IMG_EXTENSIONS``), not a hidden file."""
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(
        path, IMG_EXTENSIONS
    )


def _subfolders(root: str | Path) -> list[str]:
    """The sorted, non-hidden sub-directories of ``root`` (followed symlinks included)."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _holds_image(folder: Path) -> bool:
    return any(
        _is_image(name) for _, _, files in os.walk(folder, followlinks=True) for name in files
    )


def _check_dir(fn: str, name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{fn}: {name} must be a str or a path, got {describe(value)}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{fn}: {name} must be an existing directory, got {str(value)!r} (no such directory)"
        )
    return path


def _check_folders(fn: str, name: str, folders: Any) -> list[str]:
    """Class folder names: a non-empty sequence of distinct, plain (separator-free) names."""
    if isinstance(folders, (str, bytes)) or not isinstance(folders, Sequence):
        raise TypeError(f"{fn}: {name} must be a sequence of folder names, got {describe(folders)}")
    bad = [f for f in folders if not isinstance(f, str)]
    if bad:
        raise TypeError(
            f"{fn}: {name} must hold str folder names, got {', '.join(describe(b) for b in bad[:5])}"
        )
    if not folders:
        raise ValueError(f"{fn}: {name} must name at least one class folder, got an empty list")
    plain = [f for f in folders if f in ("", ".", "..") or "/" in f or os.sep in f]
    if plain:
        raise ValueError(
            f"{fn}: {name} must hold plain folder names (no path separators, not empty, '.' or "
            f"'..'), got {plain[:5]!r}"
        )
    dup = sorted(f for f, count in Counter(folders).items() if count > 1)
    if dup:
        raise ValueError(f"{fn}: {name} must not repeat a folder, got duplicates {fmt_keys(dup)}")
    return list(folders)


def class_names(
    root: str | os.PathLike[str], names_file: str | os.PathLike[str] | None = None
) -> tuple[list[str], list[str]]:
    """The class folders of a training root, in label order, and the class names for prompts.

    Without ``names_file``: the sorted sub-folders of ``root`` holding at least one image (in
    them or below them), each named by its folder with ``_`` read as a space (``golden_retriever``
    -> ``golden retriever``). With ``names_file``, the classes are the file's, in its order:

    - a text file, one class per line: ``folder`` (named as above) or ``folder<TAB>readable name``;
      blank lines are skipped;
    - a ``.json`` file: an object ``{"folder": "readable name", ...}`` in label order, or a list
      of names that are also the folder names.

    Folders of ``root`` that the file does not list are not classes: a dataset over ``root``
    labels their images ``-1`` (unknown).

    Args:
        root: the training image folder, ``root/<class folder>/<image>``.
        names_file: an optional class-names file (text or ``.json``).

    Returns:
        ``(folders, names)``: two lists of equal length, ``folders[i]`` the folder of class ``i``
        and ``names[i]`` the text used for it in prompts.

    Raises:
        TypeError: ``root`` or ``names_file`` is not a str or path.
        FileNotFoundError: ``root`` is not a directory, or ``names_file`` is not a file.
        ValueError: no sub-folder of ``root`` holds an image (without a file); the file is
            malformed (bad JSON, an empty folder or name, no classes), repeats a folder, or lists
            folders that ``root`` lacks (listed).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for folder in ["golden_retriever", "tabby_cat"]:
        ...     (Path(tmp.name) / folder).mkdir()
        ...     Image.new("RGB", (8, 8)).save(Path(tmp.name) / folder / "0.png")
        >>> class_names(tmp.name)
        (['golden_retriever', 'tabby_cat'], ['golden retriever', 'tabby cat'])
        >>> names = Path(tmp.name) / "classes.txt"
        >>> _ = names.write_text("tabby_cat\\ttabby cat\\ngolden_retriever\\tdog\\n")
        >>> class_names(tmp.name, names)
        (['tabby_cat', 'golden_retriever'], ['tabby cat', 'dog'])
        >>> tmp.cleanup()
    """
    fn = "class_names"
    base = _check_dir(fn, "root", root)
    if names_file is None:
        folders = [f for f in _subfolders(base) if _holds_image(base / f)]
        if not folders:
            raise ValueError(
                f"{fn}: root {str(root)!r} has no class folder holding an image (expected "
                f"root/<class>/<image> with an extension in {', '.join(IMG_EXTENSIONS)})"
            )
        return folders, [f.replace("_", " ") for f in folders]

    if not isinstance(names_file, (str, os.PathLike)):
        raise TypeError(
            f"{fn}: names_file must be None, a str or a path, got {describe(names_file)}"
        )
    path = Path(names_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{fn}: names_file must be an existing file, got {str(names_file)!r} (no such file)"
        )
    what = f"names_file {str(names_file)!r}"
    if path.suffix.lower() == ".json":
        folders, names = _read_json_names(fn, what, path)
    else:
        folders, names = _read_text_names(fn, what, path)
    if not folders:
        raise ValueError(f"{fn}: {what} lists no classes")
    _check_folders(fn, what, folders)
    absent = [f for f in folders if not (base / f).is_dir()]
    if absent:
        raise ValueError(
            f"{fn}: {what} lists folders missing from root {str(root)!r}: {fmt_keys(absent)}"
        )
    return folders, names


def _read_json_names(fn: str, what: str, path: Path) -> tuple[list[str], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{fn}: {what} is not valid JSON: {err}") from err
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list):
        pairs = [(n, n) for n in data]
    else:
        raise ValueError(
            f"{fn}: {what} must hold a JSON object {{folder: name}} or a list of names, "
            f"got a JSON {type(data).__name__}"
        )
    bad = [v for pair in pairs for v in pair if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(
            f"{fn}: {what} must map folders to non-empty string names, got {bad[:5]!r}"
        )
    return [k for k, _ in pairs], [v.strip() for _, v in pairs]


def _read_text_names(fn: str, what: str, path: Path) -> tuple[list[str], list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{fn}: {what} is not a UTF-8 text file: {err}") from err
    folders: list[str] = []
    names: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        folder, tab, name = line.partition("\t")
        folder, name = folder.strip(), name.strip()
        if not tab:
            name = folder.replace("_", " ")
        if not folder or not name:
            raise ValueError(
                f"{fn}: {what} line {number} must be 'folder' or 'folder<TAB>name', got {line!r}"
            )
        folders.append(folder)
        names.append(name)
    return folders, names


class FolderDataset(ImageFolder):
    """Every image under ``root/<sub-folder>/``, labelled by a fixed list of class folders.

    A torchvision :class:`~torchvision.datasets.ImageFolder` whose label space is ``folders``
    (from :func:`class_names`) rather than the folders found under ``root``: an image in
    ``root/folders[i]/`` gets label ``i``, an image in any other sub-folder gets ``-1`` (an
    unknown class: open-set evaluation, SPEC §0). Classes of ``folders`` that ``root`` lacks
    simply have no samples. Order is deterministic: by folder name, then path. Images are read
    with torchvision's ``default_loader`` (PIL, converted to RGB).

    Attributes:
        classes: ``list(folders)``, so ``classes[label]`` is a sample's class folder.
        class_to_idx: every sub-folder found under ``root`` -> its label (``-1`` if unknown).
        unknown_folders: the sub-folders found under ``root`` that are not class folders.
        samples: ``(path, label)`` pairs; ``targets``: the labels, a ``list[int]``.
        known: whether every sample has a known class (no label ``-1``).

    Args:
        root: the image folder.
        folders: the class folders in label order (non-empty, no repeats).
        transform: applied to each PIL image (e.g. :attr:`ClipBundle.eval_transform`).

    ``dataset[i]`` is ``(transform(image), label)`` with ``label`` an ``int``.

    Raises:
        TypeError: ``root`` is not a str or path, or ``folders`` is not a sequence of str.
        FileNotFoundError: ``root`` is not a directory.
        ValueError: ``folders`` is empty, repeats a folder or holds a path, or ``root`` holds no
            image in any sub-folder.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for folder in ["cat", "dog", "fox"]:
        ...     (Path(tmp.name) / folder).mkdir()
        ...     Image.new("L", (8, 8)).save(Path(tmp.name) / folder / "0.png")
        >>> data = FolderDataset(tmp.name, ["dog", "cat"])
        >>> data.targets, data.unknown_folders, data.known
        ([1, 0, -1], ['fox'], False)
        >>> image, label = data[0]
        >>> image.mode, label
        ('RGB', 1)
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        folders: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        fn = "FolderDataset"
        base = _check_dir(fn, "root", root)
        self._labels = {f: i for i, f in enumerate(_check_folders(fn, "folders", folders))}
        super().__init__(str(base), transform=transform, is_valid_file=_is_image, allow_empty=True)
        if not self.samples:
            raise ValueError(
                f"{fn}: root {str(root)!r} holds no image in any sub-folder (expected "
                f"root/<folder>/<image> with an extension in {', '.join(IMG_EXTENSIONS)})"
            )
        self.classes = list(folders)
        self.unknown_folders = [f for f, i in self.class_to_idx.items() if i < 0]
        self.known = all(t >= 0 for t in self.targets)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Every non-hidden sub-folder of ``directory`` and its label (``-1`` if unknown)."""
        found = _subfolders(directory)
        return found, {f: self._labels.get(f, -1) for f in found}


def holdout(
    labels: Sequence[int] | np.ndarray[Any, Any] | torch.Tensor, fraction: float, *, seed: int
) -> tuple[list[int], list[int]]:
    """Split sample indices into ``(train, val)``, stratified by label and seeded.

    Per label value ``c`` with ``n_c`` samples, ``round(fraction * n_c)`` of them (Python's
    ``round``, clipped to ``[1, n_c - 1]``) go to ``val``, drawn by a ``torch.Generator`` seeded
    with ``seed``; a label with a single sample stays in ``train``. Every label value is a
    stratum, ``-1`` (unknown) included. The same labels, fraction and seed always give the same
    split.

    Args:
        labels: ``[n]`` integer labels: a sequence of ints, a NumPy array or a 1-d integer tensor.
        fraction: the share of each class held out, in ``(0, 1)``.
        seed: a non-negative int.

    Returns:
        ``(train, val)``: two sorted lists of indices into ``labels``, disjoint, covering all.

    Raises:
        TypeError: ``labels`` are not integers, ``fraction`` is not a number or ``seed`` is not
            an int.
        ValueError: ``labels`` is empty, ``fraction`` is not in ``(0, 1)``, ``seed`` is negative,
            or no label has two samples (nothing could be held out).

    Example:
        >>> train, val = holdout([0, 0, 0, 0, 1, 1, 2], 0.25, seed=0)
        >>> len(val), sorted(set(val) | set(train)) == list(range(7))
        (2, True)
        >>> holdout([0, 0, 0, 0, 1, 1, 2], 0.25, seed=0) == (train, val)
        True
    """
    fn = "holdout"
    values = _label_list(fn, labels)
    frac = check_number(
        fn, "fraction", fraction, low=0, high=1, low_inclusive=False, high_inclusive=False
    )
    seed = check_int(fn, "seed", seed, low=0)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(values):
        by_class.setdefault(label, []).append(index)
    g = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        if n < 2:
            continue
        k = min(max(round(frac * n), 1), n - 1)
        order = torch.randperm(n, generator=g)[:k].tolist()
        val.extend(members[j] for j in order)
    if not val:
        raise ValueError(
            f"{fn}: labels must have at least one class with 2 or more samples to hold any out, "
            f"got {len(values)} samples in {len(by_class)} classes of one sample each"
        )
    held = set(val)
    return [i for i in range(len(values)) if i not in held], sorted(val)


def _label_list(fn: str, labels: Any) -> list[int]:
    if isinstance(labels, torch.Tensor):
        return check_labels(fn, "labels", labels).tolist()
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"{fn}: labels must be a sequence of ints, got {describe(labels)}")
    if not isinstance(labels, (Sequence, np.ndarray)):
        raise TypeError(f"{fn}: labels must be a sequence of ints, got {describe(labels)}")
    if len(labels) == 0:
        raise ValueError(f"{fn}: labels must not be empty, got {describe(labels)}")
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TypeError(
            f"{fn}: labels must be a 1-d sequence of ints, got {describe(labels)} of "
            f"dtype {array.dtype} and shape {array.shape}"
        )
    return [int(v) for v in array.tolist()]


def parse_named_paths(specs: Sequence[str], *, fn: str, option: str) -> dict[str, Path]:
    """Parse ``NAME=DIR`` (or bare ``DIR``) command-line values into named directories.

    ``"imagenet-r=/data/r"`` names ``/data/r`` ``imagenet-r``; a bare ``"/data/sketch"`` is named
    by its last folder (``sketch``). The text before the first ``=`` is a name only if it holds
    no path separator, so ``"/data/a=b"`` is a bare path. ``~`` is expanded.

    Args:
        specs: the option's values, in order.
        fn: the command or function to name in error messages (``"robustft finetune"``).
        option: the option to name in error messages (``"--eval"``).

    Returns:
        ``{name: Path}`` in the order given.

    Raises:
        TypeError: ``specs`` is not a list of str.
        ValueError: an empty value, an empty name (``"=DIR"``), no path after ``=``, a path
            without a usable folder name, or a name used twice.
        FileNotFoundError: a path that is not an existing directory.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> named = parse_named_paths([f"clean={tmp.name}", tmp.name], fn="demo", option="--eval")
        >>> list(named) == ["clean", Path(tmp.name).name]
        True
        >>> tmp.cleanup()
    """
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise TypeError(f"{fn}: {option} must be a list of NAME=DIR strings, got {describe(specs)}")
    named: dict[str, Path] = {}
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"{fn}: {option} values must be NAME=DIR strings, got {describe(spec)}")
        name, eq, rest = spec.partition("=")
        if eq and "/" not in name and os.sep not in name:
            name = name.strip()
            if not name:
                raise ValueError(
                    f"{fn}: {option} must be NAME=DIR or DIR, got {spec!r} (empty name)"
                )
            if not rest:
                raise ValueError(f"{fn}: {option} must be NAME=DIR or DIR, got {spec!r} (no DIR)")
            path = Path(rest).expanduser()
        else:
            if not spec:
                raise ValueError(f"{fn}: {option} must be NAME=DIR or DIR, got an empty value")
            path = Path(spec).expanduser()
            name = path.name or path.resolve().name
            if not name:
                raise ValueError(
                    f"{fn}: {option} value {spec!r} has no folder name to use; write NAME=DIR"
                )
        if not path.is_dir():
            raise FileNotFoundError(
                f"{fn}: {option} must name an existing directory, got {spec!r} (no such directory)"
            )
        if name in named:
            raise ValueError(
                f"{fn}: {option} names must be unique, got {name!r} for both "
                f"{str(named[name])!r} and {str(path)!r}; write NAME=DIR to tell them apart"
            )
        named[name] = path
    return named
