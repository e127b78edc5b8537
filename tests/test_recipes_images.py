"""robustft.recipes._data, image files: bad images named, pixel values, links, hidden folders, sets.

Every message check is a full match of the one-line message (``BadImageError`` must stay one
line: a DataLoader worker re-raises it with a multi-line report whose last line is the message).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import signal
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from robustft.recipes import _images
from robustft.recipes._data import FolderDataset, class_names
from robustft.recipes._images import BadImageError, read_image

FIX = " — remove or fix it, or pass --skip-bad-images"


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (rather than hang) if the block runs longer than ``seconds`` (main thread, Unix)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _save(path: Path, image: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def _png(path: Path, value: int = 0, size: tuple[int, int] = (4, 4)) -> Path:
    return _save(path, Image.new("RGB", size, (value,) * 3))


def _rel(root: Path, data: FolderDataset) -> list[tuple[str, int]]:
    return [(Path(p).relative_to(root).as_posix(), y) for p, y in data.samples]


def _pixels(data: FolderDataset, index: int = 0) -> torch.Tensor:
    """The ``[H, W, 3]`` uint8 tensor of what a transform-free dataset returns."""
    image, _ = data[index]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return torch.from_numpy(np.array(image))


def _rgb16_png(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG written byte by byte (Pillow cannot write one): ``pixels`` ``[H, W, 3]``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


# --- bad images: one line naming the set and the file -------------------------------------------


def _truncated_png(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])


def _truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _corrupt_png(path: Path) -> None:
    data = bytearray(_png(path, 5).read_bytes())
    data[12:30] = b"\xff" * 18  # the IHDR chunk
    path.write_bytes(bytes(data))


def _tiff(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        Image.fromarray(array).save(path, "TIFF")

    return write


BAD = [
    ("empty.png", lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    ("notes.png", lambda p: p.write_text("not an image"), r"not an image Pillow can identify .*"),
    ("corrupt.png", _corrupt_png, r"not an image Pillow can identify .*"),
    ("cut.png", _truncated_png, r"OSError: (image file is truncated|Truncated File Read).*"),
    ("cut.jpg", _truncated_jpeg, r"OSError: (image file is truncated|Truncated File Read).*"),
    ("gone.png", lambda p: p.symlink_to(p.parent / "missing.png"), r"No such file or directory"),
    ("pipe.png", lambda p: os.mkfifo(p), r"not a regular file"),
    (
        "wide.tif",
        _tiff(np.array([[0, 70000]], dtype=np.int32)),
        r"integer pixel values span 0\.\.70000, outside 0\.\.65535 \(mode I\); save it as an 8- "
        r"or 16-bit image",
    ),
    (
        "negative.tif",
        _tiff(np.array([[-1, 5]], dtype=np.int32)),
        r"integer pixel values span -1\.\.5, outside 0\.\.65535 \(mode I\).*",
    ),
    (
        "bright.tif",
        _tiff(np.array([[0.0, 1.5]], dtype=np.float32)),
        r"float pixel values span 0\.\.1\.5, outside \[0, 1\] \(mode F: read as intensities in "
        r"\[0, 1\]\); rescale it or save it as an 8-bit image",
    ),
    (
        "dark.tif",
        _tiff(np.array([[-0.25, 0.5]], dtype=np.float32)),
        r"float pixel values span -0\.25\.\.0\.5, outside \[0, 1\].*",
    ),
    (
        "nan.tif",
        _tiff(np.array([[np.nan, 0.5]], dtype=np.float32)),
        r"float pixel values include NaN or infinity \(mode F\)",
    ),
]


def _bad_tree(tmp_path: Path, file: str, write: Callable[[Path], Any]) -> tuple[Path, Path]:
    root = tmp_path / "root"
    _png(root / "cls" / "0good.png", 3)
    bad = root / "cls" / file
    write(bad)
    return root, bad


def _message(name: str, path: Path, reason: str) -> str:
    return re.escape(f"{name}: cannot read image {str(path)!r}: ") + reason + re.escape(FIX)


@pytest.mark.parametrize(("file", "write", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_image_is_named_in_one_line(
    tmp_path: Path, file: str, write: Callable[[Path], Any], reason: str
) -> None:
    root, bad = _bad_tree(tmp_path, file, write)
    data = FolderDataset(root, ["cls"], name="val")
    assert [Path(p).name for p, _ in data.samples] == ["0good.png", file]
    assert _pixels(data, 0).tolist() == [[[3, 3, 3]] * 4] * 4  # the good one still reads
    with deadline(20), pytest.raises(BadImageError) as info:
        data[1]
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(_message("val", bad, reason), message), message
    assert isinstance(info.value, ValueError) and info.value.__cause__ is not None


@pytest.mark.parametrize(("size", "kind"), [((11, 10), "warning"), ((21, 10), "error")])
def test_decompression_bombs_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], kind: str
) -> None:
    root = tmp_path / "root"
    bomb = _save(root / "cls" / "bomb.png", Image.new("L", size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # warning over 100 pixels, error over 200
    pixels, limit = size[0] * size[1], 100 if kind == "warning" else 200
    reason = re.escape(
        f"possible decompression bomb: Image size ({pixels} pixels) exceeds limit of {limit} "
        f"pixels (Pillow's Image.MAX_IMAGE_PIXELS; raise it if the image is genuine)"
    )
    data = FolderDataset(root, ["cls"], name="shift")
    with pytest.raises(BadImageError) as info:
        data[0]
    assert re.fullmatch(_message("shift", bomb, reason), str(info.value)), str(info.value)
    expected = Image.DecompressionBombWarning if kind == "warning" else Image.DecompressionBombError
    assert isinstance(info.value.__cause__, expected)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert _pixels(data).shape == (10, size[0], 3)


def test_bad_image_default_name_is_the_root_and_pickles(tmp_path: Path) -> None:
    root, bad = _bad_tree(tmp_path, "empty.png", lambda p: p.write_bytes(b""))
    data = FolderDataset(str(root) + "/", ["cls"])
    assert data.name == str(root) + "/"
    copy = pickle.loads(pickle.dumps(data))  # what a DataLoader worker receives
    with pytest.raises(BadImageError) as info:
        copy[1]
    assert str(info.value) == f"{root}/: cannot read image {str(bad)!r}: empty file (0 bytes){FIX}"


def test_bad_image_in_a_worker_ends_with_the_one_line_message(tmp_path: Path) -> None:
    root, bad = _bad_tree(tmp_path, "notes.png", lambda p: p.write_text("text"))
    data = FolderDataset(root, ["cls"], name="train", transform=lambda image: np.array(image))
    loader = DataLoader(data, batch_size=2, num_workers=1, timeout=60)
    batches = iter(loader)
    try:
        with pytest.raises(BadImageError) as info:
            next(batches)
    finally:
        batches._shutdown_workers()  # now, not at garbage collection (a 5 s join)
    last = str(info.value).splitlines()[-1]
    assert re.fullmatch(
        r"(\S+\.)?BadImageError: " + _message("train", bad, r"not an image Pillow can .*"), last
    ), last


def test_read_image_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(
        BadImageError,
        match="^" + _message("eval a\\nb", missing, "No such file or directory") + "$",
    ):
        read_image(missing, name="eval a\nb")  # a newline in a name stays on one line


# --- skip_bad_images -----------------------------------------------------------------------------


def _mixed(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    _png(root / "a" / "0.png", 1)
    (root / "a" / "1.png").write_bytes(b"")
    (root / "b" / "0.png").parent.mkdir(parents=True)
    (root / "b" / "0.png").write_text("text")
    _png(root / "b" / "1.png", 2)
    _save(root / "b" / "2.png", Image.new("L", (11, 10)))  # a bomb once the limit is 100
    _png(root / "c" / "0.png", 4)
    return root


def test_skip_bad_images_drops_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _mixed(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = FolderDataset(root, ["a", "b"], name="train", skip_bad_images=True)
    assert _rel(root, data) == [("a/0.png", 0), ("b/1.png", 1), ("c/0.png", -1)]
    assert data.targets == [0, 1, -1] and data.imgs == data.samples
    assert (data.n_known, data.known) == (2, False)
    assert [(Path(p).relative_to(root).as_posix(), r) for p, r in data.skipped] == [
        ("a/1.png", "empty file (0 bytes)"),
        ("b/0.png", "not an image Pillow can identify (not an image, or its header is damaged)"),
        (
            "b/2.png",
            "possible decompression bomb: Image size (110 pixels) exceeds limit of 100 pixels "
            "(Pillow's Image.MAX_IMAGE_PIXELS; raise it if the image is genuine)",
        ),
    ]
    assert [_pixels(data, i)[0, 0].tolist() for i in range(3)] == [[1] * 3, [2] * 3, [4] * 3]


def test_no_decoding_up_front_without_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _mixed(tmp_path)
    calls: list[str] = []
    decode = _images._decode

    def counting(path: str) -> Image.Image:
        calls.append(path)
        return decode(path)

    monkeypatch.setattr(_images, "_decode", counting)
    data = FolderDataset(root, ["a", "b"])
    assert calls == [] and data.skipped == [] and len(data) == 6
    _ = data[0]
    assert calls == [data.samples[0][0]]
    FolderDataset(root, ["a", "b"], skip_bad_images=True)
    assert len(calls) == 1 + 6


def test_skip_bad_images_with_nothing_readable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(b"")
    (root / "a" / "1.png").write_text("x")
    with pytest.raises(ValueError) as info:
        FolderDataset(root, ["a"], name="val", skip_bad_images=True)
    assert str(info.value) == (
        f"FolderDataset: val: none of the 2 images under root {str(root)!r} can be read (the "
        f"first, {str(root / 'a' / '0.png')!r}: empty file (0 bytes))"
    )


def test_skip_then_require_known(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(b"")  # the one known image is unreadable
    _png(root / "z" / "0.png")
    with pytest.raises(ValueError, match=r"^FolderDataset: val: no image of root .* class folder"):
        FolderDataset(root, ["a"], name="val", skip_bad_images=True, require_known=True)


# --- pixel values --------------------------------------------------------------------------------

GREY16 = [0, 255, 256, 257 * 7, 32895, 65535]
HIGH_BYTE = [0, 0, 1, 7, 128, 255]  # v // 256


def _grey(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)[None, :, None].expand(1, len(values), 3)


def _one(tmp_path: Path, write: Callable[[Path], Any], file: str = "x.png") -> FolderDataset:
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    write(root / "cls" / file)
    return FolderDataset(root, ["cls"])


@pytest.mark.parametrize(
    ("file", "mode", "dtype"),
    [("g.png", "I;16", np.uint16), ("g.tif", "I;16B", ">u2"), ("g.tif", "I", np.int32)],
)
def test_sixteen_bit_grey_is_scaled_not_clipped(
    tmp_path: Path, file: str, mode: str, dtype: Any
) -> None:
    array = np.array([GREY16], dtype=dtype)
    image = Image.frombytes(mode, (len(GREY16), 1), array.tobytes()) if mode == "I;16B" else None
    image = image or Image.fromarray(array)

    def write(path: Path) -> None:
        image.save(path)
        with Image.open(path) as check:  # the file really holds this mode
            assert check.mode == mode

    data = _one(tmp_path, write, file)
    torch.testing.assert_close(_pixels(data), _grey(HIGH_BYTE), rtol=0, atol=0)


def test_sixteen_bit_rgb_png(tmp_path: Path) -> None:
    pixels = np.array([[[0, 255, 65535], [256, 32895, 511]]], dtype=np.uint16)
    data = _one(tmp_path, lambda p: _rgb16_png(p, pixels))
    expected = torch.tensor([[[0, 0, 255], [1, 128, 1]]], dtype=torch.uint8)
    torch.testing.assert_close(_pixels(data), expected, rtol=0, atol=0)


def test_float_image_in_unit_range(tmp_path: Path) -> None:
    values = [0.0, 0.125, 0.25, 0.75, 1.0]  # 255 v = 0, 31.875, 63.75, 191.25, 255 (exact floats)
    data = _one(tmp_path, _tiff(np.array([values], dtype=np.float32)), "f.tif")
    torch.testing.assert_close(_pixels(data), _grey([0, 32, 64, 191, 255]), rtol=0, atol=0)


def _palette(transparency: bool) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        image = Image.new("P", (2, 1))
        image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
        image.putpixel((1, 0), 1)
        if transparency:
            image.info["transparency"] = b"\x00\x80" + b"\xff" * 254
        image.save(path)
        with Image.open(path) as check:
            assert check.mode == "P" and ("transparency" in check.info) == transparency

    return write


@pytest.mark.parametrize(
    ("write", "file", "expected"),
    [
        (_palette(False), "p.png", [[10, 20, 30], [40, 50, 60]]),
        (_palette(True), "pt.png", [[10, 20, 30], [40, 50, 60]]),  # no warning, alpha dropped
        (lambda p: Image.new("LA", (2, 1), (100, 7)).save(p), "la.png", [[100] * 3] * 2),
        (lambda p: Image.new("RGBA", (2, 1), (1, 2, 3, 0)).save(p), "a.png", [[1, 2, 3]] * 2),
        (lambda p: Image.new("PA", (2, 1), (0, 9)).save(p), "pa.tif", [[0, 0, 0]] * 2),
        (
            lambda p: Image.new("1", (2, 1), 1).save(p),
            "bw.png",
            [[255, 255, 255]] * 2,
        ),
        (
            # Pillow: (255 - k)(255 - c) / 255 per channel: (215·245, 215·235, 215·225) / 255
            lambda p: Image.new("CMYK", (2, 1), (10, 20, 30, 40)).save(p),
            "c.tif",
            [[207, 198, 190]] * 2,
        ),
    ],
)
def test_eight_bit_modes_convert_as_pillow_does(
    tmp_path: Path, write: Callable[[Path], None], file: str, expected: list[list[int]]
) -> None:
    data = _one(tmp_path, write, file)
    got = _pixels(data)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.uint8), rtol=0, atol=0)


# --- links ---------------------------------------------------------------------------------------


def _linked(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    _png(root / "cls" / "0.png")
    _png(root / "cls" / "sub" / "1.png")
    _png(root / "other" / "2.png")
    return root


@pytest.mark.parametrize("target", ["..", ".", "../..", "../cls"])
def test_link_loops_do_not_repeat_images(tmp_path: Path, target: str) -> None:
    root = _linked(tmp_path)
    (root / "cls" / "loop").symlink_to(target)
    (root / "cls" / "sub" / "back").symlink_to("..")
    with deadline(20):
        assert class_names(root)[0] == ["cls", "other"]
        data = FolderDataset(root, ["cls", "other"])
    assert _rel(root, data) == [("cls/0.png", 0), ("cls/sub/1.png", 0), ("other/2.png", 1)]


def test_many_self_links_do_not_explode(tmp_path: Path) -> None:
    root = _linked(tmp_path)
    for name in "abcd":  # os.walk(followlinks=True) would visit 4**40 paths
        (root / "cls" / name).symlink_to(".")
        (root / "empty_loops" / name).parent.mkdir(exist_ok=True)
        (root / "empty_loops" / name).symlink_to(".")
    with deadline(20):
        assert class_names(root)[0] == ["cls", "other"]
        data = FolderDataset(root, ["cls", "other"])
    assert len(data) == 3 and data.class_to_idx["empty_loops"] == -1


def test_links_are_followed_once_and_prefer_real_paths(tmp_path: Path) -> None:
    root = _linked(tmp_path)
    outside = tmp_path / "outside"
    _png(outside / "dogs" / "d.png", 6)
    _png(outside / "e.png", 8)
    (root / "dog").symlink_to(outside / "dogs")  # a linked class folder
    (root / "cls" / "a_alias.png").symlink_to("0.png")  # a second name for 0.png
    (root / "cls" / "a_sub").symlink_to("sub")  # a second path to sub/ (sorts first)
    (root / "cls" / "z.png").symlink_to(outside / "e.png")  # a linked file
    (root / "cls" / "zz.png").symlink_to(outside / "dogs" / "d.png")  # also in class dog
    (root / "cls" / "broken").symlink_to(tmp_path / "nowhere")  # a dangling folder link
    assert class_names(root)[0] == ["cls", "dog", "other"]
    data = FolderDataset(root, ["cls", "dog"])
    assert _rel(root, data) == [  # by folder, then name (ImageFolder's order)
        ("cls/0.png", 0),
        ("cls/z.png", 0),
        ("cls/zz.png", 0),  # once per class: also below as dog/d.png
        ("cls/sub/1.png", 0),
        ("dog/d.png", 1),
        ("other/2.png", -1),
    ]
    assert _pixels(data, 1)[0, 0].tolist() == [8] * 3
    assert _pixels(data, 4)[0, 0].tolist() == [6] * 3


def test_a_file_reached_by_a_file_link_and_a_folder_link_counts_once(tmp_path: Path) -> None:
    root = _linked(tmp_path)
    outside = tmp_path / "outside"
    _png(outside / "d.png")
    _png(outside / ".hidden.png")
    (root / "cls" / "b.png").symlink_to(outside / "d.png")
    (root / "cls" / "c.png").symlink_to(outside / ".hidden.png")  # linked under a visible name
    (root / "cls" / "d.png").symlink_to("0.png")
    (root / "cls" / "out").symlink_to(outside)
    data = FolderDataset(root, ["cls"])
    assert _rel(root, data) == [
        ("cls/0.png", 0),
        ("cls/b.png", 0),  # not again as cls/out/d.png
        ("cls/c.png", 0),  # the hidden file was not listed through cls/out
        ("cls/sub/1.png", 0),
        ("other/2.png", -1),
    ]


def test_class_folder_linking_to_the_root(tmp_path: Path) -> None:
    root = _linked(tmp_path)
    (root / "up").symlink_to(".")
    (root / "upper").symlink_to("..")
    with deadline(20):
        assert class_names(root)[0] == ["cls", "other"]
        data = FolderDataset(root, ["cls", "up"])
    assert _rel(root, data) == [("cls/0.png", 0), ("cls/sub/1.png", 0), ("other/2.png", -1)]
    assert data.class_to_idx == {"cls": 0, "other": -1, "up": 1, "upper": -1}


def test_unlistable_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _linked(tmp_path)
    locked = root / "cls" / "sub"
    scandir = os.scandir

    def refuse(path: Any = ".") -> Any:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    tail = (
        f"cannot list folder {str(locked)!r}: Permission denied — fix its permissions or remove it"
    )
    with pytest.raises(ValueError) as info:
        FolderDataset(root, ["cls"], name="val")
    assert str(info.value) == "FolderDataset: val: " + tail
    with pytest.raises(ValueError) as info:
        class_names(root / "cls")
    assert str(info.value) == "class_names: " + tail


# --- hidden files and folders --------------------------------------------------------------------


def test_hidden_names_are_skipped_at_every_depth(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _png(root / "cls" / "0.png")
    _png(root / "cls" / "sub" / "1.png")
    for hidden in [
        "cls/.ipynb_checkpoints/0-checkpoint.png",
        "cls/.git/objects/x.png",
        "cls/sub/.cache/y.png",
        "cls/sub/.y.png",
        "cls/._0.png",
        ".trash/cls/0.png",
        "only_hidden/.git/x.png",
        ".root.png",
    ]:
        _png(root / hidden)
    assert class_names(root)[0] == ["cls"]
    data = FolderDataset(root, ["cls"])
    assert _rel(root, data) == [("cls/0.png", 0), ("cls/sub/1.png", 0)]
    assert data.class_to_idx == {"cls": 0, "only_hidden": -1}
    ood = FolderDataset(root, ["cls"], ood=True)
    assert _rel(root, ood) == [("cls/0.png", -1), ("cls/sub/1.png", -1)]
    (root / "cls" / "sub" / "1.png").unlink()
    (root / "cls" / "0.png").unlink()
    with pytest.raises(ValueError, match=r"class_names: root .* has no class folder holding"):
        class_names(root)


# --- known classes, out-of-distribution sets -----------------------------------------------------


def _eval_tree(tmp_path: Path) -> Path:
    root = tmp_path / "eval"
    _png(root / "zebra" / "0.png")
    _png(root / "yak" / "0.png")
    (root / "cat").mkdir()  # a class folder, but empty
    _png(root / "direct.png")
    return root


def test_require_known_refuses_a_set_of_no_class(tmp_path: Path) -> None:
    root = _eval_tree(tmp_path)
    loose = FolderDataset(root, ["cat", "dog"])
    assert (loose.n_known, loose.known, loose.targets) == (0, False, [-1, -1])
    with pytest.raises(ValueError) as info:
        FolderDataset(root, ["cat", "dog"], name="sketch", require_known=True)
    assert str(info.value) == (
        f"FolderDataset: sketch: no image of root {str(root)!r} is in a class folder: found "
        f"sub-folders ['cat', 'yak', 'zebra'], expected class folders ['cat', 'dog'] — name its "
        f"sub-folders after the classes, or declare a set of unknown classes only as "
        f"out-of-distribution (ood=True, --ood NAME=DIR)"
    )
    many = [f"class{i:02d}" for i in range(12)]
    with pytest.raises(ValueError, match=r"expected class folders \['class00', .*\(2 more\)\] — "):
        FolderDataset(root, many, require_known=True)


def test_require_known_accepts_a_partly_known_set(tmp_path: Path) -> None:
    root = _eval_tree(tmp_path)
    _png(root / "dog" / "0.png")
    _png(root / "dog" / "1.png")
    data = FolderDataset(root, ["cat", "dog"], name="val", require_known=True)
    assert (data.n_known, data.known, len(data)) == (2, False, 4)
    assert data.ood is False and data.name == "val"


def test_ood_set_labels_everything_unknown(tmp_path: Path) -> None:
    root = _eval_tree(tmp_path)
    _png(root / "cat" / "0.png")
    data = FolderDataset(root, ["cat", "dog"], name="textures", ood=True)
    assert _rel(root, data) == [
        ("direct.png", -1),
        ("cat/0.png", -1),
        ("yak/0.png", -1),
        ("zebra/0.png", -1),
    ]
    assert data.class_to_idx == {"cat": -1, "yak": -1, "zebra": -1}
    assert data.unknown_folders == ["cat", "yak", "zebra"]
    assert (data.n_known, data.known, data.ood, data.classes) == (0, False, True, ["cat", "dog"])


def test_ood_set_of_loose_images(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _png(root / "b.png", 2)
    _png(root / "a.jpeg", 1)
    (root / "notes.txt").parent.mkdir(exist_ok=True)
    (root / "notes.txt").write_text("x")
    data = FolderDataset(root, ["cat"], ood=True)
    assert _rel(root, data) == [("a.jpeg", -1), ("b.png", -1)]
    assert _pixels(data, 1)[0, 0].tolist() == [2, 2, 2]
    with pytest.raises(
        ValueError, match=r"^FolderDataset: root .* holds no image in any sub-folder \(expected "
    ):
        FolderDataset(root, ["cat"])
    (root / "a.jpeg").unlink()
    (root / "b.png").unlink()
    with pytest.raises(
        ValueError,
        match=r"^FolderDataset: ood: root .* holds no image at all \(expected root/<image> or "
        r"root/<folder>/<image> with an extension in",
    ):
        FolderDataset(root, ["cat"], name="ood", ood=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": 3}, TypeError, r"FolderDataset: name must be None or a str, got 3"),
        (
            {"skip_bad_images": 1},
            TypeError,
            r"FolderDataset: skip_bad_images must be a bool, got 1",
        ),
        ({"require_known": "yes"}, TypeError, r"FolderDataset: require_known must be a bool"),
        ({"ood": None}, TypeError, r"FolderDataset: ood must be a bool, got None"),
        (
            {"ood": True, "require_known": True},
            ValueError,
            r"FolderDataset: ood=True \(every image unknown\) contradicts require_known=True",
        ),
    ],
)
def test_keyword_errors(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    root = _linked(tmp_path)
    with pytest.raises(error, match="^" + message):
        FolderDataset(root, ["cls"], **kwargs)


def test_set_name_in_structural_errors(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    (root / "cls").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"^FolderDataset: val: root .* holds no image in any sub-folder"
    ):
        FolderDataset(root, ["cls"], name="val")
