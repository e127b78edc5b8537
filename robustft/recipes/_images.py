"""Image files for the recipes' data: walking image folders, reading one image as 8-bit RGB.

How folders are walked, everywhere (:func:`~robustft.recipes._data.class_names` and
:class:`~robustft.recipes._data.FolderDataset`):

- folders and files whose name starts with a dot (``.git``, ``.ipynb_checkpoints``, macOS
  ``._x.jpg``) are skipped at every depth;
- symbolic links are followed, but each real directory is visited once per class folder, a link
  back to the class folder, the root or one of their parents (``cls/loop -> ..``) is not
  followed, and each real file counts once per class (two links to one image are one sample);
- an image is a file with one of torchvision's ``IMG_EXTENSIONS`` (any case).

How pixels are read (:func:`read_image`, what ``dataset[i]`` returns before its transform): every
image becomes 8-bit RGB.

- 8-bit modes as Pillow converts them: ``L`` and ``1`` are repeated over the three channels,
  ``P`` (palette) takes its palette colours, ``CMYK`` uses Pillow's conversion; alpha (``LA``,
  ``RGBA``, ``PA``, a palette's transparency) is dropped: the stored colour is kept as it is,
  not blended over a background.
- 16-bit (``I;16``, ``I;16B``, and 16-bit RGB/RGBA PNGs, which Pillow reads as ``RGB``/``RGBA``)
  and 32-bit integer images (``I``) holding values in ``0..65535``: the high byte,
  ``v // 256``, so ``0..65535`` spans ``0..255`` (an 8-bit image widened by ``v * 257`` reads
  back exactly); an ``I`` image with values outside ``0..65535`` is refused.
- float images (``F``): values in ``[0, 1]`` are intensities, ``round(255 * v)``; any value
  outside ``[0, 1]`` (or NaN) is refused rather than clipped.
- A file that cannot be decoded (empty, truncated, corrupt, not an image, a link to nothing) or
  whose size exceeds Pillow's ``Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb: both
  Pillow's warning and its error) raises :class:`BadImageError`, one line naming the set and the
  file; ``FolderDataset(..., skip_bad_images=True)`` drops such files up front instead.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

__all__ = [
    "BadImageError",
    "escape_newlines",
    "folder_entries",
    "holds_image",
    "images_under",
    "is_folder",
    "is_image_name",
    "list_subfolders",
    "read_image",
    "scan_images",
]

_FIX = "remove or fix it, or pass --skip-bad-images"
_SCAN_THREADS = 8


class BadImageError(ValueError):
    """An image file that cannot be read: ``<set>: cannot read image '<path>': <why> — <fix>``.

    The message is one line, so that the last line of the report PyTorch re-raises from a
    ``DataLoader`` worker is this message.
    """


class _RefusedError(Exception):
    """A decoded image whose pixel values :func:`read_image` refuses to convert (the reason)."""


# --- walking folders ---------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not _hidden(name) and has_file_allowed_extension(name, IMG_EXTENSIONS)


def _contains(parent: str, path: str) -> bool:
    """Whether the real path ``parent`` is ``path`` or one of its ancestors."""
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def folder_entries(fn: str, folder: str) -> list[os.DirEntry[str]]:
    """The non-hidden entries of ``folder``, sorted by name; an unreadable folder is refused."""
    try:
        with os.scandir(folder) as it:
            found = [e for e in it if not _hidden(e.name)]
    except OSError as err:
        raise ValueError(
            f"{fn}: cannot list folder {folder!r}: {err.strerror or err} — fix its permissions "
            f"or remove it"
        ) from err
    return sorted(found, key=lambda e: e.name)


def is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling or looping link is not a directory
    except OSError:
        return False


def _walk(fn: str, top: str, root_real: str) -> Iterator[tuple[str, str]]:
    """``(folder, file name)`` of every image under ``top``, each real file once, in no order.

    Links are followed, but only after every folder reachable without one, so a file or folder
    reachable both ways is listed by its link-free path. Each real directory is entered once; a
    link to ``top``, to the dataset root (``root_real``) or to one of their parents is a loop
    and not followed; ``top`` itself yields nothing if it is the root or one of its parents (a
    class folder linking back up). Each real file is listed once (the first path reaching it).
    """
    top_real = os.path.realpath(top)
    if _contains(top_real, root_real):
        return
    # Every folder in ``visited`` has been walked by the time links are followed, so a linked
    # file is a repeat if its real folder is in ``visited`` (and its real name is an image's)
    # or another link reached it; only link targets are stored (memory: folders + links).
    visited, linked = {top_real}, set()
    folders = [(top, top_real)]  # to walk: (path, real path), depth first
    links: deque[tuple[str, str, str, bool]] = deque()  # deferred: (folder, name, target, dir?)
    while folders or links:
        if not folders:
            folder, name, target, is_dir = links.popleft()
            if is_dir:
                if not (
                    target in visited or _contains(target, top_real) or _contains(target, root_real)
                ):
                    visited.add(target)
                    folders.append((os.path.join(folder, name), target))
            elif target not in linked and not (
                os.path.dirname(target) in visited
                and is_image_name(os.path.basename(target))
                and os.path.exists(target)  # a dangling link is not a repeat
            ):
                linked.add(target)
                yield folder, name
            continue
        folder, real = folders.pop()
        subfolders = []
        for entry in folder_entries(fn, folder):
            is_dir = is_folder(entry)
            if not is_dir and not is_image_name(entry.name):
                continue
            if entry.is_symlink():
                links.append((folder, entry.name, os.path.realpath(entry.path), is_dir))
            elif is_dir:
                target = os.path.join(real, entry.name)
                visited.add(target)
                subfolders.append((entry.path, target))
            elif os.path.join(real, entry.name) not in linked:
                yield folder, entry.name
        folders.extend(reversed(subfolders))


def list_subfolders(fn: str, root: str | Path) -> list[str]:
    """The sorted, non-hidden sub-directories of ``root`` (followed symlinks included)."""
    return [e.name for e in folder_entries(fn, str(root)) if is_folder(e)]


def holds_image(fn: str, folder: Path, root_real: str) -> bool:
    return any(True for _ in _walk(fn, str(folder), root_real))


def images_under(fn: str, top: str, root_real: str) -> list[str]:
    """Every image path under ``top`` in ImageFolder's order: by folder path, then file name."""
    return [os.path.join(folder, name) for folder, name in sorted(_walk(fn, top, root_real))]


# --- reading images ----------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """An opened, loaded image as 8-bit RGB, by the rules of the module docstring."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;"):
        values = np.asarray(image).astype(np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise _RefusedError(
                f"integer pixel values span {low}..{high}, outside 0..65535 (mode {mode}); "
                f"save it as an 8- or 16-bit image"
            )
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise _RefusedError("float pixel values include NaN or infinity (mode F)")
        smallest, largest = float(values.min()), float(values.max())
        if smallest < 0 or largest > 1:
            raise _RefusedError(
                f"float pixel values span {smallest:g}..{largest:g}, outside [0, 1] (mode F: "
                f"read as intensities in [0, 1]); rescale it or save it as an 8-bit image"
            )
        return Image.fromarray(np.rint(values * 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's advice for palette transparency (no warning)
    return image.convert("RGB")


def _decode(path: str) -> Image.Image:
    """``path`` decoded in full and converted to RGB; raises whatever reading it raises.

    The caller decides how Pillow's ``DecompressionBombWarning`` is treated (an error).
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise _RefusedError("not a regular file")
    if info.st_size == 0:
        raise _RefusedError("empty file (0 bytes)")
    with open(path, "rb") as handle, Image.open(handle) as image:
        image.load()
        return _to_rgb(image)


def _reason(err: BaseException) -> str:
    """A short, one-line reason for a failure of :func:`_decode`."""
    if isinstance(err, _RefusedError):
        return str(err)
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can identify (not an image, or its header is damaged)"
    if isinstance(err, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        text = str(err).split(",")[0]
        return (
            f"possible decompression bomb: {text} (Pillow's Image.MAX_IMAGE_PIXELS; raise it if "
            f"the image is genuine)"
        )
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = " ".join(str(err).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def escape_newlines(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def read_image(path: str | os.PathLike[str], *, name: str) -> Image.Image:
    """Read one image file as 8-bit RGB, or refuse it with a one-line :class:`BadImageError`.

    The image is decoded in full (a truncated file fails here, not later in a transform) and
    converted by the rules of the module docstring (16-bit, float, palette, alpha, CMYK).
    Pillow's ``DecompressionBombWarning`` (an image over ``Image.MAX_IMAGE_PIXELS`` pixels) is
    refused like its ``DecompressionBombError`` (over twice that).

    Args:
        path: the image file.
        name: the set it belongs to, for the message (``"train"``, ``"val"``, an eval set).

    Returns:
        An RGB :class:`PIL.Image.Image`, detached from the file.

    Raises:
        BadImageError: ``<name>: cannot read image '<path>': <reason> — remove or fix it, or
            pass --skip-bad-images``.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> grey16 = Image.fromarray(np.array([[0, 257 * 7, 65535]], dtype=np.uint16))
        >>> grey16.save(Path(tmp.name) / "grey16.png")
        >>> np.asarray(read_image(Path(tmp.name) / "grey16.png", name="demo"))[0, :, 0].tolist()
        [0, 7, 255]
        >>> _ = (Path(tmp.name) / "notes.png").write_text("not an image")
        >>> read_image(Path(tmp.name) / "notes.png", name="demo")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        robustft.recipes._images.BadImageError: demo: cannot read image '.../notes.png': not an ...
        >>> tmp.cleanup()
    """
    file = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(file)
        except Exception as err:  # any failure to decode one file is that file's fault
            raise BadImageError(_bad_image_message(name, file, _reason(err))) from err


def _bad_image_message(name: str, path: str, reason: str) -> str:
    return (
        f"{escape_newlines(name)}: cannot read image {path!r}: {escape_newlines(reason)} — {_FIX}"
    )


def _try_decode(path: str) -> str | None:
    """Why ``path`` cannot be read, or ``None`` (the caller makes bomb warnings errors)."""
    try:
        _decode(path)
    except Exception as err:  # as in read_image
        return _reason(err)
    return None


def scan_images(paths: Sequence[str]) -> list[str | None]:
    """:func:`_try_decode` of every path, on a few threads (Pillow decodes without the GIL)."""
    threads = max(1, min(_SCAN_THREADS, os.cpu_count() or 1, len(paths)))
    with warnings.catch_warnings():  # set once here: the filters are shared by the threads
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(_try_decode, paths))
