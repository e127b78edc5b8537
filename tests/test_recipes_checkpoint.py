"""Checkpoints and weight files: no crafted file runs code, a kill or a fault loses nothing, and a
damaged or foreign file ends in one line naming it.

Every crafted file is first shown to run its payload under the loader it targets (a plain
unpickle, DCP's own reader, ``torch.load(weights_only=False)``): the payload creates a marker
file or removes a sentinel folder, so "refused" is evidence, not a test that cannot fail.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from robustft import averaging
from robustft.recipes import _checkpoint as ckpt
from robustft.recipes import _dcp
from robustft.recipes._runfolder import RunError
from robustft.recipes._runtime import Runtime

sys.path.insert(0, os.path.dirname(__file__))

from _dist import run_distributed

CPU = Runtime(torch.device("cpu"))
LIBRARY_WORDS = ("PytorchStreamReader", "SafetensorError", "enforce fail", "inline_container")


def _one_line(err: BaseException, *names: object) -> str:
    text = str(err)
    assert "\n" not in text
    for name in names:
        assert str(name) in text, text
    for word in LIBRARY_WORDS:
        assert word not in text
    return text


def _model(seed: int = 0, width: int = 3, layers: int = 1) -> tuple[nn.Module, Any]:
    """A tiny trained module and its AdamW (one step taken, so the optimiser has a state)."""
    torch.manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers - 1)], nn.Linear(4, width))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return net, opt


def _fill(net: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def _values(net: nn.Module) -> set[float]:
    return {float(v) for p in net.parameters() for v in p.detach().full_tensor().flatten()}


# ---------------------------------------------------------------------------------------------
# a one-rank process group (real DCP collectives, FSDP2 DTensors) in the test process


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Runtime]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield Runtime(torch.device("cpu"), 0, 1, "fsdp", dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _sharded(seed: int = 0, width: int = 3) -> tuple[nn.Module, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, width))
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return net, opt


def _dcp_save(run_dir: Path, rt: Runtime, value: float, step: int) -> tuple[nn.Module, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    net, opt = _sharded()
    _fill(net, value)
    ckpt.save(run_dir, net, opt, None, rt, step=step, best_score=0.5)
    return net, opt


def _dcp_load(run_dir: Path, rt: Runtime) -> tuple[int, set[float]]:
    net, opt = _sharded(seed=1)
    loaded = ckpt.load(run_dir, net, opt, None, rt)
    return loaded.step, _values(net)


# ---------------------------------------------------------------------------------------------
# payloads: each leaves a trace (a marker file, a removed folder) if it runs


class _Call:
    """Pickles as ``func(*args)``: the classic ``__reduce__`` payload."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _dotted(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle of ``module.<dotted name>(arg)``, as pickle's own resolver walks it."""

    def text(s: str) -> bytes:
        data = s.encode()
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


def _payloads(marker: Path, sentinel: Path) -> dict[str, bytes]:
    return {
        "dotted-global": _dotted(
            "torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"
        ),
        "reduce-os.system": pickle.dumps(_Call(os.system, f"touch {marker}")),
        "reduce-builtins.exec": pickle.dumps(
            _Call(builtins.exec, f"open({str(marker)!r}, 'w').close()")
        ),
        "reduce-subprocess": pickle.dumps(_Call(subprocess.call, ["touch", str(marker)])),
        "foreign-global": pickle.dumps(_Call(shutil.rmtree, str(sentinel))),
    }


def _ran(marker: Path, sentinel: Path) -> bool:
    return marker.exists() or not sentinel.exists()


@pytest.mark.parametrize(
    "kind",
    [
        "dotted-global",
        "reduce-os.system",
        "reduce-builtins.exec",
        "reduce-subprocess",
        "foreign-global",
    ],
)
def test_crafted_dcp_metadata_is_refused_without_running(tmp_path: Path, kind: str) -> None:
    marker, sentinel = tmp_path / "pwned", tmp_path / "sentinel"
    sentinel.mkdir()
    payload = _payloads(marker, sentinel)[kind]
    # the control: an unrestricted unpickle runs it
    with contextlib.suppress(Exception):
        pickle.loads(payload)
    assert _ran(marker, sentinel)
    marker.unlink(missing_ok=True)
    sentinel.mkdir(exist_ok=True)

    run = tmp_path / "run"
    (run / "checkpoint.dcp").mkdir(parents=True)
    meta = run / "checkpoint.dcp" / ".metadata"
    meta.write_bytes(payload)
    net, opt = _model()
    rt = Runtime(torch.device("cpu"), 0, 1, "fsdp", None)
    with pytest.raises(RunError, match=r"refusing checkpoint metadata") as info:
        ckpt.load(run, net, opt, None, rt)
    _one_line(info.value, meta, "--overwrite")
    assert not _ran(marker, sentinel)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.distributed.checkpoint.filesystem", "os.system"),  # attribute walk
        ("torch.distributed.checkpoint.metadata", "Metadata.__class__"),
        ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
        ("torch.distributed.checkpoint.metadata", "dataclass"),  # a real name, not allowed
        ("torch.distributed.checkpoint.planner", "LoadPlan"),  # was a whole allowed module
        ("torch", "load"),
        ("torch", "float32.__class__"),
        ("torch.serialization", "load"),
        ("builtins", "set"),
        ("builtins", "getattr"),
        ("pathlib", "Path"),
        ("collections", "OrderedDict.fromkeys"),
        ("posix", "system"),
    ],
)
def test_metadata_unpickler_refuses_every_pair_off_the_list(module: str, name: str) -> None:
    with pytest.raises(_dcp._Refused, match="DCP metadata never holds"):
        _dcp._MetadataUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_metadata_pickle_cannot_write_attributes_onto_a_class(tmp_path: Path) -> None:
    """``BUILD`` on an allowed class (not an instance) would patch torch for the whole process."""
    from torch.distributed.checkpoint.metadata import Metadata

    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    # Metadata (the class) BUILD with slot state {"__repr__": OrderedDict}
    crafted = (
        b"\x80\x04"
        + text("torch.distributed.checkpoint.metadata")
        + text("Metadata")
        + b"\x93N}"
        + text("__repr__")
        + text("collections")
        + text("OrderedDict")
        + b"\x93s\x86b."
    )
    before = Metadata.__repr__
    with contextlib.suppress(Exception):  # the control: a plain unpickle patches the class
        pickle.loads(crafted)
    patched = Metadata.__repr__ is not before
    Metadata.__repr__ = before  # type: ignore[method-assign]
    assert patched
    run = tmp_path / "run"
    (run / "checkpoint.dcp").mkdir(parents=True)
    (run / "checkpoint.dcp" / ".metadata").write_bytes(crafted)
    with pytest.raises(RunError, match=r"sets the state of a type"):
        _dcp._read_dcp_metadata(run / "checkpoint.dcp")
    assert Metadata.__repr__ is before


def test_a_real_fsdp2_checkpoint_needs_only_the_allow_list(group: Runtime, tmp_path: Path) -> None:
    net, opt = _sharded()
    state = averaging.ema(0.9).init(ckpt.trained_tree(net))
    ckpt.save(tmp_path, net, opt, state, group, step=3, best_score=0.25)
    seen: set[tuple[str, str]] = set()

    class Recording(pickle._Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.add((module, name))
            return super().find_class(module, name)

    with open(tmp_path / "checkpoint.dcp" / ".metadata", "rb") as f:
        Recording(f).load()
    allowed = _dcp._allowed()
    assert seen <= set(allowed), seen - set(allowed)
    assert ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata") in seen
    # the list itself: exact names in a few modules, no dotted name
    modules = {m for m, _ in allowed}
    assert modules == {
        "torch",
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.serialization",
        "collections",
        "pathlib",
    }
    assert not any("." in n for _, n in allowed)
    # and the round trip through the restricted reader restores everything
    expected = {k: v.detach().full_tensor().clone() for k, v in net.state_dict().items()}
    average = {k: v.detach().full_tensor().clone() for k, v in state.average.items()}
    net2, opt2 = _sharded(seed=5)
    state2 = averaging.ema(0.9).init(ckpt.trained_tree(net2))
    assert ckpt.load(tmp_path, net2, opt2, state2, group) == ckpt.Loaded(3, 0.25)
    for k, v in net2.state_dict().items():
        torch.testing.assert_close(v.full_tensor(), expected[k])
    for k, v in state2.average.items():
        torch.testing.assert_close(v.full_tensor(), average[k])


def test_dcp_metadata_declaring_a_bytes_item_is_refused(group: Runtime, tmp_path: Path) -> None:
    """Metadata made only of DCP's own classes, with a pickled item DCP would ``torch.load``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _dcp_save(run, group, 1.0, step=2)
    folder = run / "checkpoint.dcp"
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file
    evil = pickle.dumps(_Call(os.system, f"touch {marker}"))
    (folder / "__0_1.distcp").write_bytes(evil)
    metadata.state_dict_metadata["loop.step"] = BytesStorageMetadata()
    index = MetadataIndex("loop.step")
    metadata.storage_data = {
        k: v for k, v in metadata.storage_data.items() if k.fqn != "loop.step"
    } | {index: _StorageInfo("__0_1.distcp", 0, len(evil))}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    # the control: DCP's own reader runs the payload
    with contextlib.suppress(BaseException):
        dcp.load({"loop": {"step": torch.tensor(0)}}, checkpoint_id=str(folder))
    assert marker.exists()
    marker.unlink()
    net, opt = _sharded()
    with pytest.raises(
        RunError, match=r"declares 'loop.step' a pickled \(non-tensor\) item"
    ) as info:
        ckpt.load(run, net, opt, None, group)
    _one_line(info.value, folder / ".metadata")
    assert not marker.exists()


def test_dcp_storage_records_cannot_point_outside_the_folder(
    group: Runtime, tmp_path: Path
) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    _dcp_save(tmp_path, group, 1.0, step=2)
    meta = tmp_path / "checkpoint.dcp" / ".metadata"
    for rel, why in (("../../x.distcp", "points outside"), ("__0_0.distcp", "transforms")):
        metadata = pickle.loads(meta.read_bytes())
        key = next(iter(metadata.storage_data))
        metadata.storage_data[key] = _StorageInfo(
            rel, 0, 8, ["zstd/1"] if why == "transforms" else None
        )
        meta.write_bytes(pickle.dumps(metadata))
        with pytest.raises(RunError, match=why):
            _dcp._read_dcp_metadata(meta.parent)


# ---------------------------------------------------------------------------------------------
# checkpoint.pt


def test_checkpoint_pt_round_trip_is_read_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, opt = _model()
    state = averaging.ema(0.9).init(ckpt.trained_tree(net))
    state = averaging.ema(0.9).update_(state, ckpt.trained_tree(net))
    ckpt.save(tmp_path, net, opt, state, CPU, step=7, best_score=0.5)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt"}  # no temporary left
    calls: list[Any] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    net2, opt2 = _model(seed=3)
    state2 = averaging.ema(0.9).init(ckpt.trained_tree(net2))
    assert ckpt.load(tmp_path, net2, opt2, state2, CPU) == ckpt.Loaded(7, 0.5)
    assert calls == [True]
    for (_, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b)
    assert int(state2.step) == 1
    torch.testing.assert_close(opt2.state_dict()["state"], opt.state_dict()["state"])


def test_crafted_checkpoint_pt_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    net, opt = _model()
    payload = {"loop": {}, "module": _Call(os.system, f"touch {marker}")}
    torch.save(payload, tmp_path / "checkpoint.pt")
    with contextlib.suppress(Exception):  # the control: an unrestricted load runs it
        torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RunError, match="holds objects other than tensors") as info:
        ckpt.load(tmp_path, net, opt, None, CPU)
    _one_line(info.value, tmp_path / "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "garbage", "empty"])
def test_damaged_checkpoint_pt_is_one_line(tmp_path: Path, damage: str) -> None:
    net, opt = _model()
    ckpt.save(tmp_path, net, opt, None, CPU, step=1, best_score=0.0)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "zeroed": bytes(len(data)),
            "garbage": bytes(range(256)) * 8,
            "empty": b"",
        }[damage]
    )
    with pytest.raises(RunError, match="is damaged") as info:
        ckpt.load(tmp_path, net, opt, None, CPU)
    _one_line(info.value, path, "--overwrite")


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ({"width": 5}, r"0.weight has shape \[5, 4\], expected \[3, 4\]"),
        ({"layers": 2}, r"unexpected keys \['1.bias', '1.weight'\]"),
    ],
)
def test_checkpoint_pt_of_another_model_is_refused_untouched(
    tmp_path: Path, other: dict[str, int], expected: str
) -> None:
    foreign, fopt = _model(**other)
    ckpt.save(tmp_path, foreign, fopt, None, CPU, step=1, best_score=0.0)
    net, opt = _model(seed=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RunError, match=expected) as info:
        ckpt.load(tmp_path, net, opt, None, CPU)
    _one_line(info.value, tmp_path / "checkpoint.pt", "was not written by this run")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_checkpoint_pt_without_or_with_an_averaging_state(tmp_path: Path) -> None:
    net, opt = _model()
    ckpt.save(tmp_path, net, opt, None, CPU, step=1, best_score=0.0)
    state = averaging.ema(0.9).init(ckpt.trained_tree(net))
    with pytest.raises(RunError, match="its averaged parameters are not a dict of tensors"):
        ckpt.load(tmp_path, net, opt, state, CPU)
    ckpt.save(tmp_path, net, opt, state, CPU, step=1, best_score=0.0)
    with pytest.raises(RunError, match="this run averages nothing"):
        ckpt.load(tmp_path, net, opt, None, CPU)
    torch.save({"loop": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match=r"it must hold the entries \['loop'"):
        ckpt.load(tmp_path, net, opt, None, CPU)
    ckpt.save(tmp_path, net, opt, None, CPU, step=1, best_score=0.0)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**payload, "loop": {"step": torch.arange(2)}}, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match="its loop state must hold the scalars"):
        ckpt.load(tmp_path, net, opt, None, CPU)


def test_checkpoint_pt_with_another_optimiser_layout(tmp_path: Path) -> None:
    net, opt = _model()
    ckpt.save(tmp_path, net, opt, None, CPU, step=1, best_score=0.0)
    two_groups = torch.optim.AdamW([{"params": [net[0].weight]}, {"params": [net[0].bias]}])
    _fill(net, 9.0)
    with pytest.raises(RunError, match="optimiser state that does not fit") as info:
        ckpt.load(tmp_path, net, two_groups, None, CPU)
    _one_line(info.value, tmp_path / "checkpoint.pt")
    assert {float(v) for p in net.parameters() for v in p.detach().flatten()} == {9.0}


def test_missing_checkpoint_keeps_its_message(tmp_path: Path) -> None:
    net, opt = _model()
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint\.pt to resume from"):
        ckpt.load(tmp_path, net, opt, None, CPU)


# ---------------------------------------------------------------------------------------------
# full and read-only disks: one line, the previous checkpoint intact


def _fail_with(code: int) -> Callable[..., None]:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("code", "says"), [(errno.ENOSPC, "free some space"), (errno.EROFS, "read-only")]
)
def test_failed_writes_keep_the_previous_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, says: str
) -> None:
    from safetensors import SafetensorError

    net, opt = _model()
    ckpt.save(tmp_path, net, opt, None, CPU, step=1, best_score=0.0)
    ckpt.save_tree(tmp_path / "w.safetensors", {"a": torch.ones(2)})
    with monkeypatch.context() as m:
        m.setattr(torch, "save", _fail_with(code))
        with pytest.raises(RunError, match=says) as info:
            ckpt.save(tmp_path, net, opt, None, CPU, step=2, best_score=0.0)
        _one_line(info.value, tmp_path / "checkpoint.pt")
    for error in (
        OSError(code, os.strerror(code)),
        SafetensorError(
            f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})"
        ),
    ):
        with monkeypatch.context() as m:

            def fail(*args: Any, error: Exception = error, **kwargs: Any) -> None:
                raise error

            m.setattr("safetensors.torch.save_file", fail)
            with pytest.raises(RunError, match=says) as info:
                ckpt.save_tree(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
            _one_line(info.value, tmp_path / "w.safetensors")
    assert ckpt.load(tmp_path, net, opt, None, CPU).step == 1
    assert torch.equal(ckpt.load_tree(tmp_path / "w.safetensors")["a"], torch.ones(2))
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "w.safetensors"}


def test_failed_dcp_save_keeps_the_previous_checkpoint(
    group: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dcp_save(tmp_path, group, 1.0, step=1)
    net, opt = _sharded()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _fail_with(errno.ENOSPC))  # inside DCP's writer
        with pytest.raises(RunError, match="No space left on device") as info:
            ckpt.save(tmp_path, net, opt, None, group, step=2, best_score=0.0)
    _one_line(info.value, tmp_path / "checkpoint.dcp.tmp")
    assert _dcp_load(tmp_path, group) == (1, {1.0})


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (skipped where this process may not mount one)."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20, check=False)


def test_real_full_disk(small_disk: Path) -> None:
    small, big = nn.Linear(4, 3), nn.Linear(128, 128)  # big: 66 KiB of weights
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    ckpt.save(small_disk, small, opt, None, CPU, step=1, best_score=0.0)
    ckpt.save_tree(small_disk / "w.safetensors", dict(small.named_parameters()))
    with pytest.raises(RunError, match="No space left on device") as info:
        ckpt.save_tree(small_disk / "w.safetensors", dict(big.named_parameters()))
    _one_line(info.value, small_disk / "w.safetensors", "free some space")
    with pytest.raises(RunError, match="No space left on device") as info:
        ckpt.save(
            small_disk, big, torch.optim.SGD(big.parameters()), None, CPU, step=2, best_score=0.0
        )
    _one_line(info.value, small_disk / "checkpoint.pt")
    assert {p.name for p in small_disk.iterdir()} == {"checkpoint.pt", "w.safetensors"}
    again = nn.Linear(4, 3)
    assert ckpt.load(small_disk, again, torch.optim.SGD(again.parameters()), None, CPU).step == 1
    assert torch.equal(again.weight, small.weight)
    loaded = ckpt.load_tree(small_disk / "w.safetensors", like=dict(small.named_parameters()))
    assert torch.equal(loaded["weight"], small.weight.detach())


def test_real_full_disk_under_fsdp2(group: Runtime, small_disk: Path) -> None:
    _dcp_save(small_disk, group, 1.0, step=1)
    from torch.distributed.fsdp import fully_shard

    big = nn.Linear(128, 128)  # 66 KiB of weights, 130 KiB with AdamW's state
    fully_shard(big)
    opt = torch.optim.AdamW(big.parameters())
    with pytest.raises(RunError, match="No space left on device") as info:
        ckpt.save(small_disk, big, opt, None, group, step=2, best_score=0.0)
    _one_line(info.value, small_disk / "checkpoint.dcp.tmp", "free some space")
    assert _dcp_load(small_disk, group) == (1, {1.0})
    shutil.rmtree(small_disk / "checkpoint.dcp")  # room for the next save, which tidies up
    _dcp_save(small_disk, group, 2.0, step=2)
    assert {p.name for p in small_disk.iterdir()} == {"checkpoint.dcp"}


def test_real_read_only_folder(small_disk: Path) -> None:
    net, opt = _model()
    ckpt.save(small_disk, net, opt, None, CPU, step=1, best_score=0.0)
    ckpt.save_tree(small_disk / "w.safetensors", {"a": torch.ones(2)})
    (small_disk / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n', encoding="utf-8")
    done = subprocess.run(
        ["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, timeout=20, check=False
    )
    if done.returncode != 0:
        pytest.skip("remounting read-only is not permitted here")
    with pytest.raises(RunError, match="read-only") as info:
        ckpt.save(small_disk, net, opt, None, CPU, step=2, best_score=0.0)
    _one_line(info.value, small_disk / "checkpoint.pt")
    with pytest.raises(RunError, match="read-only"):
        ckpt.save_tree(small_disk / "w.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(RunError, match="read-only"):
        ckpt.trim_metrics(small_disk, 1)
    assert ckpt.load(small_disk, net, opt, None, CPU).step == 1
    assert torch.equal(ckpt.load_tree(small_disk / "w.safetensors")["a"], torch.ones(2))


# ---------------------------------------------------------------------------------------------
# the DCP rotation survives a kill between any two of its steps


def _incomplete(src: Path, dst: Path) -> None:
    """A copy of the checkpoint folder ``src`` as a kill mid-write (or mid-removal) leaves it."""
    shutil.copytree(src, dst)
    (dst / ".metadata").unlink()


STATES: dict[str, tuple[Callable[[Path, Path, Path], None], int | None]] = {
    # a first save killed while writing: nothing to resume from
    "first-save-killed": (lambda a, b, r: _incomplete(b, r / "checkpoint.dcp.tmp"), None),
    # killed inside dcp.save: the previous checkpoint and a partial .tmp
    "killed-writing": (
        lambda a, b, r: (
            shutil.copytree(a, r / "checkpoint.dcp"),
            _incomplete(b, r / "checkpoint.dcp.tmp"),
        ),
        1,
    ),
    # dcp.save done, nothing renamed yet
    "written": (
        lambda a, b, r: (
            shutil.copytree(a, r / "checkpoint.dcp"),
            shutil.copytree(b, r / "checkpoint.dcp.tmp"),
        ),
        1,
    ),
    # the previous checkpoint moved to .old, the new one not yet in place
    "moved-to-old": (
        lambda a, b, r: (
            shutil.copytree(a, r / "checkpoint.dcp.old"),
            shutil.copytree(b, r / "checkpoint.dcp.tmp"),
        ),
        1,
    ),
    # the new one in place, .old not yet removed
    "renamed": (
        lambda a, b, r: (
            shutil.copytree(a, r / "checkpoint.dcp.old"),
            shutil.copytree(b, r / "checkpoint.dcp"),
        ),
        2,
    ),
    # killed while removing .old
    "removing-old": (
        lambda a, b, r: (
            _incomplete(a, r / "checkpoint.dcp.old"),
            shutil.copytree(b, r / "checkpoint.dcp"),
        ),
        2,
    ),
    # killed while a tidy-up promoted .old over an incomplete checkpoint.dcp
    "promoting-old": (
        lambda a, b, r: (
            _incomplete(b, r / "checkpoint.dcp"),
            shutil.copytree(a, r / "checkpoint.dcp.old"),
        ),
        1,
    ),
}


@pytest.mark.parametrize("name", list(STATES))
def test_dcp_rotation_survives_a_kill_between_any_two_steps(
    group: Runtime, tmp_path: Path, name: str
) -> None:
    make, expected = STATES[name]
    _dcp_save(tmp_path / "a", group, 1.0, step=1)
    _dcp_save(tmp_path / "b", group, 2.0, step=2)
    run = tmp_path / "run"
    run.mkdir()
    make(tmp_path / "a" / "checkpoint.dcp", tmp_path / "b" / "checkpoint.dcp", run)
    if expected is None:
        with pytest.raises(FileNotFoundError, match=r"has no checkpoint\.dcp to resume from"):
            _dcp_load(run, group)
    else:
        assert _dcp_load(run, group) == (expected, {float(expected)})
    _dcp_save(run, group, 3.0, step=3)  # the next save succeeds, and tidies up
    assert {p.name for p in run.iterdir()} == {"checkpoint.dcp"}
    assert _dcp_load(run, group) == (3, {3.0})


def test_dcp_checkpoint_of_another_model_is_refused(group: Runtime, tmp_path: Path) -> None:
    net, opt = _sharded(width=5)
    ckpt.save(tmp_path, net, opt, None, group, step=1, best_score=0.0)
    net, opt = _sharded(width=3)
    with pytest.raises(
        RunError, match=r"model.0.weight has shape \[5, 4\], expected \[3, 4\]"
    ) as info:
        ckpt.load(tmp_path, net, opt, None, group)
    _one_line(info.value, tmp_path / "checkpoint.dcp", "was not written by this run")


@pytest.mark.parametrize("damage", ["metadata-truncated", "data-truncated", "data-missing"])
def test_damaged_dcp_checkpoint_is_one_line(group: Runtime, tmp_path: Path, damage: str) -> None:
    _dcp_save(tmp_path, group, 1.0, step=1)
    folder = tmp_path / "checkpoint.dcp"
    data = next(folder.glob("*.distcp"))
    if damage == "metadata-truncated":
        meta = folder / ".metadata"
        meta.write_bytes(meta.read_bytes()[:100])
    elif damage == "data-truncated":
        data.write_bytes(data.read_bytes()[:50])
    else:
        data.unlink()
    with pytest.raises(RunError, match="is damaged") as info:
        _dcp_load(tmp_path, group)
    _one_line(info.value, folder, "--overwrite")
    if damage == "data-missing":
        assert str(data) in str(info.value)


# ---------------------------------------------------------------------------------------------
# weight files


def test_weights_with_metadata_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tree = {"head": torch.randn(3, 2), "visual.proj": torch.randn(2, 2).t()}  # not contiguous
    meta = {"method": "clipood", "classes": ["a", "b"], "mean": [0.5, 0.25], "n": 3}
    ckpt.save_tree(path, tree, metadata=meta)
    assert ckpt.read_metadata(path) == {
        "method": "clipood",
        "classes": '["a", "b"]',
        "mean": "[0.5, 0.25]",
        "n": "3",
    }
    loaded = ckpt.load_tree(path, like=tree)
    assert loaded.keys() == tree.keys()
    for k in tree:
        assert torch.equal(loaded[k], tree[k])
    ckpt.save_tree(path, tree)
    assert ckpt.read_metadata(path) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_weights_metadata_must_be_strings_or_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"save_tree: metadata keys must be strings, got 3"):
        ckpt.save_tree(tmp_path / "w.safetensors", {}, metadata={3: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"save_tree: metadata\['x'\] must be a string or JSON"):
        ckpt.save_tree(tmp_path / "w.safetensors", {}, metadata={"x": object()})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "garbage", "empty"])
def test_damaged_weights_are_one_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "w.safetensors"
    ckpt.save_tree(path, {"a": torch.randn(64)}, metadata={"k": "v"})
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) - 40],
            "zeroed": bytes(len(data)),
            "garbage": b"\xff" * 8 + bytes(range(256)),
            "empty": b"",
        }[damage]
    )
    for read in (ckpt.load_tree, ckpt.read_metadata):
        with pytest.raises(RunError, match="cannot read weights file") as info:
            read(path)
        _one_line(info.value, path, "write it again")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"load_tree: best weights file .* does not exist"):
        ckpt.load_tree(tmp_path / "none.safetensors", what="best weights")
    with pytest.raises(FileNotFoundError, match=r"read_metadata: weights file"):
        ckpt.read_metadata(tmp_path / "none.safetensors")


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ({"head": torch.zeros(3, 2)}, r"missing keys \['visual.proj'\]"),
        (
            {"head": torch.zeros(3, 2), "visual.proj": torch.zeros(2, 2), "x": torch.zeros(1)},
            r"unexpected keys \['x'\]",
        ),
        (
            {"head": torch.zeros(7, 2), "visual.proj": torch.zeros(2, 2)},
            r"head has shape \[7, 2\], expected \[3, 2\]",
        ),
        (
            {"head": torch.zeros(3, 2, dtype=torch.int64), "visual.proj": torch.zeros(2, 2)},
            r"head is integer, expected floating-point",
        ),
    ],
)
def test_weights_of_another_model_are_refused(
    tmp_path: Path, saved: dict[str, torch.Tensor], expected: str
) -> None:
    path = tmp_path / "w.safetensors"
    ckpt.save_tree(path, saved)
    like = {"head": torch.zeros(3, 2), "visual.proj": torch.zeros(2, 2, dtype=torch.bfloat16)}
    with pytest.raises(RunError, match=expected) as info:
        ckpt.load_tree(path, like=like, what="classifier")
    _one_line(info.value, f"classifier file {str(path)!r}", "another model or class list")


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def _lines(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


@pytest.mark.parametrize("tail", ['{"step": 6, "lo', "\x00\x00\x00", '{"step": 6, "loss": 0.5}'])
def test_trim_metrics_drops_a_partial_last_line(tmp_path: Path, tail: str) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(1, 2, 3, 4, 5) + tail, encoding="utf-8")
    kept = ckpt.trim_metrics(tmp_path, 4)
    assert [line["step"] for line in kept] == [1, 2, 3, 4]
    assert path.read_text(encoding="utf-8") == _lines(1, 2, 3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (_lines(1) + "{oops\n" + _lines(2), 2),
        (_lines(1, 2) + "[1, 2]\n" + _lines(3), 3),
        (_lines(1) + '{"step": "x"}\n', 2),  # complete (newline-ended) yet not a metrics line
        ("\xff\n" + _lines(1), 1),
    ],
)
def test_trim_metrics_refuses_a_damaged_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(text.encode("utf-8") if "\xff" not in text else b"\xff" + text[1:].encode())
    before = path.read_bytes()
    with pytest.raises(RunError, match=rf"line {line} is not a metrics line") as info:
        ckpt.trim_metrics(tmp_path, 5)
    _one_line(info.value, path, "fix or delete that line")
    assert path.read_bytes() == before


def test_trim_metrics_rewrites_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(1, 2, 3), encoding="utf-8")
    assert ckpt.trim_metrics(tmp_path / "none", 1) == []
    monkeypatch.setattr("robustft.recipes._runfolder.os.replace", _fail_with(errno.ENOSPC))
    with pytest.raises(RunError, match="free some space") as info:
        ckpt.trim_metrics(tmp_path, 1)
    _one_line(info.value, path)
    assert path.read_text(encoding="utf-8") == _lines(1, 2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# ---------------------------------------------------------------------------------------------
# two ranks: a failure on one rank ends both; the rotation under real FSDP2 shards


def _two_ranks(rank: int, world: int, tmp: str) -> list[str]:
    out = []
    rt = Runtime(torch.device("cpu"), rank, world, "fsdp", dist.group.WORLD)
    run = Path(tmp) / "fsdp"
    for step in (1, 2):
        net, opt = _sharded()
        _fill(net, float(step))
        ckpt.save(run, net, opt, None, rt, step=step, best_score=0.0)
    dist.barrier()
    if rank == 0:  # a kill after checkpoint.dcp moved to .old, with a partial .tmp
        os.replace(run / "checkpoint.dcp", run / "checkpoint.dcp.old")
        _incomplete(run / "checkpoint.dcp.old", run / "checkpoint.dcp.tmp")
    dist.barrier()
    out.append(f"load {_dcp_load(run, rt)}")
    net, opt = _sharded()
    _fill(net, 3.0)
    ckpt.save(run, net, opt, None, rt, step=3, best_score=0.0)
    out.append(f"then {_dcp_load(run, rt)} {sorted(p.name for p in run.iterdir())}")
    # DDP: rank 0 cannot write checkpoint.pt; both ranks fail, none waits
    ddp = Runtime(torch.device("cpu"), rank, world, "ddp", dist.group.WORLD)
    net = nn.Linear(4, 3)
    blocked = Path(tmp) / "ddp"
    blocked.mkdir(exist_ok=True)
    if rank == 0:
        (blocked / "checkpoint.pt").mkdir()  # a folder where the file goes: the rename fails
    dist.barrier()
    try:
        ckpt.save(blocked, net, torch.optim.SGD(net.parameters()), None, ddp, step=1, best_score=0)
    except RunError as err:
        out.append(f"ddp {err}")
    return out


@pytest.mark.distributed
def test_two_ranks_rotation_and_failure(tmp_path: Path) -> None:
    ranks = run_distributed(_two_ranks, world_size=2, args=(str(tmp_path),), timeout=120)
    for out in ranks:
        assert out[0] == "load (2, {2.0})"
        assert out[1] == "then (3, {3.0}) ['checkpoint.dcp']"
    assert ranks[0][2].startswith(
        f"ddp could not write {str(tmp_path / 'ddp' / 'checkpoint.pt')!r}"
    )
    assert ranks[1][2] == (
        f"ddp rank 0 could not write {str(tmp_path / 'ddp' / 'checkpoint.pt')!r} (see its error)"
    )
