"""Image-folder data for the recipes: class names, open-set datasets, held-out validation splits.

Data are torchvision ``ImageFolder`` trees, ``root/<class folder>/<image>`` (images may sit in
sub-folders of a class folder). The *class folders* -- from a class-names file, or the folders of
the training root -- fix the label space: label ``i`` is ``folders[i]``. An evaluation root may
lack some of those classes and may hold folders that are not among them: their images are
*unknown* samples with label ``-1`` (open set, SPEC §0); a pure out-of-distribution set
(``FolderDataset(..., ood=True)``) labels every image ``-1`` whatever its folder.

Folders are walked and images read as :mod:`robustft.recipes._images` says: hidden names
skipped, links followed once, every image read as 8-bit RGB or refused with a one-line
:class:`~robustft.recipes._images.BadImageError`.
"""

from __future__ import annotations

import functools
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
from torchvision.datasets.folder import IMG_EXTENSIONS

from robustft._checks import check_int, check_labels, check_number, describe, fmt_keys
from robustft.recipes._images import (
    escape_newlines,
    folder_entries,
    holds_image,
    images_under,
    is_folder,
    is_image_name,
    list_subfolders,
    read_image,
    scan_images,
)

__all__ = ["FolderDataset", "class_names", "holdout", "parse_named_paths"]


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
        root_real = os.path.realpath(base)
        folders = [f for f in list_subfolders(fn, base) if holds_image(fn, base / f, root_real)]
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
    simply have no samples. With ``ood=True`` (a pure out-of-distribution set) every image is
    unknown, ``-1``, whatever its folder, and images directly under ``root`` count too (they come
    first). Order is deterministic: by folder name, then path (ImageFolder's). Folders are
    walked as :mod:`robustft.recipes._images` says (hidden names skipped, links followed once, no loops).

    Images are read by :func:`read_image` (8-bit RGB; 16-bit, float, palette and alpha images
    by :mod:`robustft.recipes._images`'s rules): a file that cannot be read raises a one-line
    :class:`BadImageError` naming the set and the file when ``dataset[i]`` reads it. Nothing is
    decoded up front unless ``skip_bad_images=True``: then every image is decoded once, at
    construction, on up to 8 threads -- about the cost of one pass over the data without
    augmentation (hours for an ImageNet-sized folder on few cores) -- and the files that fail
    are dropped and listed in :attr:`skipped`.

    Attributes:
        name: the set's name in messages (``name``, or ``str(root)``).
        classes: ``list(folders)``, so ``classes[label]`` is a sample's class folder.
        class_to_idx: every sub-folder found under ``root`` -> its label (``-1`` if unknown).
        unknown_folders: the sub-folders found under ``root`` that are not class folders (with
            ``ood=True``: every sub-folder).
        samples: ``(path, label)`` pairs; ``targets``: the labels, a ``list[int]``.
        n_known: how many samples have a known class (label ``>= 0``).
        known: whether every sample has a known class (no label ``-1``).
        ood: whether the set was declared out-of-distribution (every label ``-1``).
        skipped: ``(path, reason)`` of every image dropped by ``skip_bad_images``, in order
            (empty without it).

    Args:
        root: the image folder.
        folders: the class folders in label order (non-empty, no repeats).
        transform: applied to each PIL image (e.g. :attr:`ClipBundle.eval_transform`).
        name: the set's name for messages (``"train"``, ``"val"``, an evaluation set's name);
            default: ``str(root)``.
        skip_bad_images: decode every image now and drop those that cannot be read.
        require_known: refuse a set in which no image has a known class (a validation or
            evaluation folder whose sub-folders match none of ``folders``).
        ood: a pure out-of-distribution set: every image is unknown (``-1``), images directly
            under ``root`` included. Not with ``require_known``.

    ``dataset[i]`` is ``(transform(image), label)`` with ``label`` an ``int``.

    Raises:
        TypeError: ``root`` is not a str or path, ``folders`` is not a sequence of str, ``name``
            is not a str, or a flag is not a bool.
        FileNotFoundError: ``root`` is not a directory.
        ValueError: ``folders`` is empty, repeats a folder or holds a path; ``ood`` with
            ``require_known``; ``root`` holds no image in any sub-folder (with ``ood``: none at
            all), no readable one (``skip_bad_images``), or, with ``require_known``, none of a
            known class (the message lists the sub-folders found and the class folders
            expected); a folder under ``root`` cannot be listed.
        BadImageError: from ``dataset[i]``, an image that cannot be read.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for folder in ["cat", "dog", "fox"]:
        ...     (Path(tmp.name) / folder).mkdir()
        ...     Image.new("L", (8, 8)).save(Path(tmp.name) / folder / "0.png")
        >>> data = FolderDataset(tmp.name, ["dog", "cat"], name="test")
        >>> data.targets, data.unknown_folders, data.n_known, data.known
        ([1, 0, -1], ['fox'], 2, False)
        >>> image, label = data[0]
        >>> image.mode, label
        ('RGB', 1)
        >>> FolderDataset(tmp.name, ["dog", "cat"], ood=True).targets
        [-1, -1, -1]
        >>> FolderDataset(tmp.name, ["owl"], name="val", require_known=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: FolderDataset: val: no image of root ... is in a class folder: found ...
        >>> tmp.cleanup()
    """

    samples: list[tuple[str, int]]
    targets: list[int]

    def __init__(
        self,
        root: str | os.PathLike[str],
        folders: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        name: str | None = None,
        skip_bad_images: bool = False,
        require_known: bool = False,
        ood: bool = False,
    ) -> None:
        fn = "FolderDataset"
        base = _check_dir(fn, "root", root)
        labels = _check_folders(fn, "folders", folders)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{fn}: name must be None or a str, got {describe(name)}")
        flags = {"skip_bad_images": skip_bad_images, "require_known": require_known, "ood": ood}
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"{fn}: {flag} must be a bool, got {describe(value)}")
        if ood and require_known:
            raise ValueError(
                f"{fn}: ood=True (every image unknown) contradicts require_known=True; pass one"
            )
        self.name = str(root) if name is None else name
        self.ood = ood
        self._where = fn if name is None else f"{fn}: {escape_newlines(name)}"
        self._labels = {f: i for i, f in enumerate(labels)}
        loader = functools.partial(read_image, name=self.name)
        super().__init__(str(base), transform=transform, loader=loader, allow_empty=True)
        where, shown = self._where, str(root)
        if not self.samples:
            expected = "root/<image> or " if ood else ""
            raise ValueError(
                f"{where}: root {shown!r} holds no image {'at all' if ood else 'in any sub-folder'}"
                f" (expected {expected}root/<folder>/<image> with an extension in "
                f"{', '.join(IMG_EXTENSIONS)})"
            )
        self.skipped: list[tuple[str, str]] = []
        if skip_bad_images:
            reasons = scan_images([path for path, _ in self.samples])
            self.skipped = [(p, r) for (p, _), r in zip(self.samples, reasons) if r is not None]
            if len(self.skipped) == len(self.samples):
                path, reason = self.skipped[0]
                raise ValueError(
                    f"{where}: none of the {len(self.samples)} images under root {shown!r} can "
                    f"be read (the first, {path!r}: {escape_newlines(reason)})"
                )
            self.samples = [s for s, r in zip(self.samples, reasons) if r is None]
            self.imgs = self.samples
            self.targets = [label for _, label in self.samples]
        self.classes = list(labels)
        self.unknown_folders = [f for f, i in self.class_to_idx.items() if i < 0]
        self.n_known = sum(t >= 0 for t in self.targets)
        self.known = self.n_known == len(self.targets)
        if require_known and not self.n_known:
            raise ValueError(
                f"{where}: no image of root {shown!r} is in a class folder: found sub-folders "
                f"{fmt_keys(self.class_to_idx)}, expected class folders {fmt_keys(labels)} — "
                f"name its sub-folders after the classes, or declare a set of unknown classes "
                f"only as out-of-distribution (ood=True, --ood NAME=DIR)"
            )

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Every non-hidden sub-folder of ``directory`` and its label (``-1`` if unknown)."""
        found = list_subfolders(self._where, directory)
        return found, {f: -1 if self.ood else self._labels.get(f, -1) for f in found}

    def make_dataset(
        self,
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """``(path, label)`` of every image: by sub-folder name, then path (the module's walk).

        With ``ood``, the images directly under ``directory`` come first. ``extensions``,
        ``is_valid_file`` and ``allow_empty`` are ImageFolder's and unused: images are files
        with an ``IMG_EXTENSIONS`` extension, and an empty result is checked by ``__init__``.
        """
        top = os.fspath(directory)
        root_real = os.path.realpath(top)
        samples: list[tuple[str, int]] = []
        if self.ood:
            samples += [
                (e.path, -1)
                for e in folder_entries(self._where, top)
                if is_image_name(e.name) and not is_folder(e)
            ]
        for folder in sorted(class_to_idx):
            label = class_to_idx[folder]
            images = images_under(self._where, os.path.join(top, folder), root_real)
            samples += [(path, label) for path in images]
        return samples


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
