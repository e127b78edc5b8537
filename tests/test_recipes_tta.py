"""``robustft tta``: TPT/C-TPT/TDA runs on the tiny digits equal hand loops over robustft.tta, the
reported metrics equal robustft.metrics on the predictions, resume equals an uninterrupted run,
episodic runs shard over ranks, and bad settings fail in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from test_recipes_cli import Tiny, make_tiny
from torchvision import transforms as T

from robustft import clip, metrics, scores, tta
from robustft.recipes import _tta, load_model
from robustft.recipes._cli import main
from robustft.recipes._data import FolderDataset, class_names
from robustft.recipes._runfolder import RunError
from robustft.recipes._runtime import Runtime
from robustft.recipes._tta import resolve_tta, run_tta, view_seed

VIEWS, FRACTION = 15, 0.25  # int(16 * 0.25) = 4 confident views


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


def values(tiny: Tiny, out: Path, method: str, **extra: Any) -> dict[str, Any]:
    d = tiny.digits
    v: dict[str, Any] = {
        "method": method,
        "model": str(tiny.config),
        "pretrained": str(tiny.weights),
        "classnames": str(d.names_file),
        "eval": [f"test={d.test}"],
        "templates": "simple",
        "workers": 0,
        "device": "cpu",
        "tta_views": VIEWS,
        "tta_fraction": FRACTION,
        "save_every": 0,
        "output": str(out),
    }
    v.update(extra)
    return v


def predictions(out: Path, name: str = "test") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(labels, {row: logits})`` of a finished run, in sample order, from its checkpoint."""
    part = torch.load(out / "checkpoint.pt", weights_only=True)["sets"][name]
    order = torch.argsort(part["indices"])
    assert part["indices"][order].tolist() == list(range(len(order)))
    return part["labels"][order], {r: z[order] for r, z in part["logits"].items()}


class Hand:
    """The tiny model, the test images and their views, built by hand from the public pieces."""

    def __init__(self, tiny: Tiny, root: Path, seed: int = 0):
        self.seed = seed
        self.bundle = load_model(tiny.config, pretrained=tiny.weights)
        self.model = self.bundle.model.requires_grad_(False)
        self.tok = self.bundle.tokenizer
        folders, self.names = class_names(root, tiny.digits.names_file)
        self.ds = FolderDataset(root, folders)
        pre = self.bundle.preprocess
        self.aug = T.Compose(
            [
                T.RandomResizedCrop(pre["image_size"]),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(pre["mean"], pre["std"]),
            ]
        )
        with torch.no_grad():
            self.head = clip.zero_shot_head(self.model, self.tok, self.names, ["a photo of a {}."])
        self.scale = float(clip.logit_scale(self.model))

    def features(self, i: int) -> torch.Tensor:
        image, _ = self.ds[i]
        torch.manual_seed(view_seed(self.seed, i))
        x = torch.stack(
            [self.bundle.eval_transform(image)] + [self.aug(image) for _ in range(VIEWS)]
        )
        with torch.no_grad():
            return F.normalize(self.model.visual(x), dim=-1)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- equivalence with hand loops --------------------------------------------------------------


@pytest.mark.parametrize("method", ["tpt", "ctpt"])
def test_tpt_episodic_equals_a_per_sample_hand_loop(
    tiny: Tiny, tmp_path: Path, method: str
) -> None:
    out = tmp_path / method
    run_tta(resolve_tta(values(tiny, out, method, tta_steps=2)))
    labels, rows = predictions(out)
    hand = Hand(tiny, tiny.digits.test)
    ctx0 = clip.init_context(hand.model, hand.tok, "a photo of a").detach()
    n = len(hand.ds)
    want: dict[str, list[torch.Tensor]] = {"zero-shot": [], "prompt": [], method: []}
    for i in range(n):
        f = hand.features(i)
        ctx = ctx0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([ctx], lr=5e-3)
        idx = None
        for _ in range(2):
            text = clip.encode_text_with_context(hand.model, ctx, hand.names, hand.tok)
            z = hand.scale * f @ text.T
            if idx is None:
                idx = tta.confident_views(z, fraction=FRACTION)
                want["prompt"].append(z[0].detach())
            if method == "tpt":
                loss = tta.tpt_loss(z, fraction=FRACTION, indices=idx)
            else:
                loss = tta.ctpt_loss(z, text_features=text, fraction=FRACTION, indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            text = clip.encode_text_with_context(hand.model, ctx, hand.names, hand.tok)
            want[method].append(hand.scale * f[0] @ text.T)
        want["zero-shot"].append(hand.scale * f[0] @ hand.head.T)
    assert labels.tolist() == [y for _, y in hand.ds.samples]
    for row, z in want.items():
        close(rows[row], torch.stack(z))
    assert not torch.allclose(rows[method], rows["prompt"], atol=1e-3)  # the tuning did something


def _tda_hand(hand: Hand, order: list[int], *, episodic: bool) -> torch.Tensor:
    cache = tta.tda()
    c, d = hand.head.shape
    state = cache.init(c, d)
    out = torch.empty(len(order), c)
    for i in order:
        f = hand.features(i)
        z = hand.scale * f @ hand.head.T
        idx = tta.confident_views(z, fraction=FRACTION)
        feature = f[idx].mean(0)
        if episodic:
            state = cache.init(c, d)
        state = cache.update(state, feature, z[idx])
        out[i] = z[idx].mean(0) + cache.logits(state, feature)
    return out


def test_tda_online_equals_a_hand_loop_over_the_seeded_stream(tiny: Tiny, tmp_path: Path) -> None:
    out = tmp_path / "tda"
    config = resolve_tta(values(tiny, out, "tda", seed=3))
    assert config.tta_protocol == "online"
    run_tta(config)
    _, rows = predictions(out)
    hand = Hand(tiny, tiny.digits.test, seed=3)
    n = len(hand.ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    close(rows["tda"], _tda_hand(hand, order, episodic=False))
    # episodic TDA: only the sample's own entry in the caches, so the prediction is the argmax of
    # the confident views' mean logits (its confidence differs)
    ep = tmp_path / "tda-episodic"
    run_tta(resolve_tta(values(tiny, ep, "tda", seed=3, tta_protocol="episodic")))
    _, erows = predictions(ep)
    want = _tda_hand(hand, list(range(n)), episodic=True)
    close(erows["tda"], want)
    assert not torch.allclose(erows["tda"], rows["tda"], atol=1e-4)  # the stream matters online


def test_reported_metrics_equal_robustft_metrics_on_the_predictions(
    tiny: Tiny, tmp_path: Path
) -> None:
    d = tiny.digits
    out = tmp_path / "run"
    payload = run_tta(
        resolve_tta(
            values(
                tiny, out, "tda", eval=[f"open={d.open}"], ood=[f"far={d.shifted}"], score="energy"
            )
        )
    )
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(payload))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "summary.md").read_text().startswith("# tta tda")
    for name in ("open", "ood:far"):
        labels, rows = predictions(out, name)
        known = labels >= 0
        assert 0 < int(known.sum()) < len(labels)
        for row in ("zero-shot", "tda"):
            got, z = payload["results"][row][name], rows[row]
            assert got["accuracy"] == pytest.approx(
                float(metrics.accuracy(z[known], labels[known]))
            )
            assert got["ece"] == pytest.approx(float(metrics.ece(z[known], labels[known])))
            want = metrics.auroc(scores.energy(z), known)
            assert got["auroc"] == pytest.approx(float(want))
            assert got["num_known"] == int(known.sum())
    # the OOD stream is the reference set's images followed by the OOD ones
    assert len(predictions(out, "ood:far")[0]) == len(predictions(out, "open")[0]) + 60


def test_zero_shot_method_reports_the_zero_shot_row_alone(tiny: Tiny, tmp_path: Path) -> None:
    out = tmp_path / "zs"
    payload = run_tta(resolve_tta(values(tiny, out, "zero-shot")))
    assert list(payload["results"]) == ["zero-shot"]
    labels, rows = predictions(out)
    hand = Hand(tiny, tiny.digits.test)
    with torch.no_grad():
        x = torch.stack([hand.bundle.eval_transform(hand.ds[i][0]) for i in range(len(hand.ds))])
        z = hand.scale * F.normalize(hand.model.visual(x), dim=-1) @ hand.head.T
    close(rows["zero-shot"], z)
    assert payload["results"]["zero-shot"]["test"]["accuracy"] == pytest.approx(
        float(metrics.accuracy(z, labels))
    )


# --- views ------------------------------------------------------------------------------------


def test_views_are_seeded_per_sample_and_leave_the_global_generator(tiny: Tiny) -> None:
    hand = Hand(tiny, tiny.digits.test)
    views = _tta.Views(hand.ds, hand.bundle.eval_transform, hand.aug, 4, 7)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = views[5]
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)
    b = views[5]
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:] == (hand.ds.samples[5][1], 5)
    assert a[0].shape == (5, 3, 32, 32)
    assert torch.equal(a[0][0], hand.bundle.eval_transform(hand.ds[5][0]))
    assert not torch.equal(a[0][1], a[0][2])
    assert not torch.equal(views[6][0][1:], a[0][1:])
    assert view_seed(7, 5) != view_seed(7, 6) and view_seed(7, 5) != view_seed(8, 5)
    aug = _tta.view_transforms(hand.bundle.preprocess, augmix=True)
    assert aug(hand.ds[0][0]).shape == (3, 32, 32)


# --- resume -----------------------------------------------------------------------------------


class StopError(Exception):
    pass


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    real = _tta._Adapter.__call__
    count = {"n": 0}

    def stopping(self: Any, *args: Any) -> Any:
        count["n"] += 1
        if count["n"] > calls:
            raise StopError
        return real(self, *args)

    monkeypatch.setattr(_tta._Adapter, "__call__", stopping)


@pytest.mark.parametrize(
    "method, calls, saved", [("tda", 70, {"test": 60, "open": 7}), ("tpt", 20, {"test": 14})]
)
def test_resume_equals_an_uninterrupted_run(
    tiny: Tiny,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    calls: int,
    saved: dict[str, int],
) -> None:
    d = tiny.digits
    extra = {"eval": [f"test={d.test}", f"open={d.open}"], "save_every": 7, "tta_steps": 1}
    whole = run_tta(resolve_tta(values(tiny, tmp_path / "whole", method, **extra)))
    out = tmp_path / "cut"
    config = resolve_tta(values(tiny, out, method, **extra))
    with monkeypatch.context() as m:
        _interrupt_after(m, calls)
        with pytest.raises(StopError):
            run_tta(config)
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {k: len(v["indices"]) for k, v in blob["sets"].items()} == saved
    if method == "tda":
        assert blob["sets"]["open"]["position"] == 7
        assert isinstance(blob["sets"]["open"]["state"], tta.TdaState)
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert main(["tta", "--resume", str(out), "--workers", "0"]) == 0
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(whole))
    # a finished run is left as it is
    assert run_tta(config, resume=True) == json.loads((out / "results.json").read_text())


def test_resume_refuses_changed_data_settings_and_checkpoints(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cut"
    config = resolve_tta(values(tiny, out, "tda", save_every=5))
    with monkeypatch.context() as m:
        _interrupt_after(m, 12)
        with pytest.raises(StopError):
            run_tta(config)
    assert main(["tta", "--resume", str(out), "--tta-views", "7"]) == 2
    err = capsys.readouterr().err
    assert "may change only" in err and "--tta-views" in err
    record = json.loads((out / "run.json").read_text())
    edited = {**record, "tta_sets": {"test": {"images": 1, "fingerprint": "x"}}}
    (out / "run.json").write_text(json.dumps(edited))
    with pytest.raises(RunError, match=r"the images of \['test'\] changed"):
        run_tta(config, resume=True)
    (out / "run.json").write_text(json.dumps(record))
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    blob = torch.load(ckpt, weights_only=True)
    torch.save({**blob, "settings": {**blob["settings"], "tta_views": 3}}, ckpt)
    with pytest.raises(RunError, match="other settings"):
        run_tta(config, resume=True)
    torch.save({"format": "other"}, ckpt)
    with pytest.raises(RunError, match="not a robustft tta checkpoint"):
        run_tta(config, resume=True)
    ckpt.write_bytes(good[:100])
    with pytest.raises(RunError, match="is damaged"):
        run_tta(config, resume=True)


def test_resume_refuses_a_flag_change_and_other_runs(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    (out).mkdir()
    (out / "config.json").write_text(json.dumps(resolve_tta(values(tiny, out, "tpt")).to_json()))
    (out / "run.json").write_text(json.dumps({"command": "tta", "status": "running"}))
    assert main(["tta", "--resume", str(out), "--tta-views", "7", "--method", "tpt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "may change only" in err and "--tta-views" in err
    (out / "run.json").write_text(json.dumps({"command": "finetune", "status": "running"}))
    assert main(["tta", "--resume", str(out)]) == 2
    assert "not a tta run" in capsys.readouterr().err
    with pytest.raises(RunError, match="not a tta run"):
        run_tta(resolve_tta(values(tiny, out, "tpt")), resume=True)
    assert main(["tta", "--override", "train=/x", "--eval", f"t={tiny.digits.test}"]) == 2
    assert "use it with --resume" in capsys.readouterr().err


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, kind, message",
    [
        ({"method": "bogus"}, ValueError, "--method must be one of tpt, ctpt, tda, zero-shot"),
        ({"tta_protocol": "stream"}, ValueError, "--tta-protocol must be episodic or online"),
        ({"tta_protocol": "online"}, ValueError, "tpt has none to carry"),
        ({"method": "zero-shot", "tta_protocol": "online"}, ValueError, "zero-shot has none"),
        ({"tta_steps": -1}, ValueError, "--tta-steps must be an integer >= 0, got -1"),
        ({"tta_steps": True}, TypeError, "--tta-steps must be an integer >= 0"),
        ({"tta_views": 2.5}, TypeError, "--tta-views must be an integer >= 0"),
        ({"tta_lr": 0.0}, ValueError, "--tta-lr must be a finite number > 0"),
        ({"tta_lr": "fast"}, TypeError, "--tta-lr must be a number"),
        ({"tta_fraction": 1.5}, ValueError, r"--tta-fraction must be in \(0, 1\]"),
        ({"tta_fraction": 0}, ValueError, "--tta-fraction must be a finite number > 0"),
        ({"tta_augmix": "yes"}, TypeError, "--tta-augmix must be true or false"),
        ({"tda_alpha_neg": -1.0}, ValueError, "--tda-alpha-neg must be a finite number >= 0"),
        ({"ctpt_weight": math.inf}, ValueError, "--ctpt-weight must be a finite number >= 0"),
        ({"tta_views": 0}, ValueError, "--tta-views must be >= 1 for tpt"),
        ({"tta_views": 3, "tta_fraction": 0.1}, ValueError, "keeps no confident view"),
        ({"method": "tda", "tta_views": 3, "tta_fraction": 0.1}, ValueError, "no confident view"),
        ({"eval": []}, ValueError, "give at least one --eval or --shift set"),
        ({"steps": 3}, ValueError, r"unknown key\(s\) \['steps'\]"),
        ({"batch_size": 0}, ValueError, "unknown key"),
    ],
)
def test_bad_settings(
    tiny: Tiny, tmp_path: Path, change: dict[str, Any], kind: type, message: str
) -> None:
    with pytest.raises(kind, match=message):
        resolve_tta({**values(tiny, tmp_path, "tpt"), **change})


def test_defaults_and_train_default(tiny: Tiny, tmp_path: Path) -> None:
    v = values(tiny, tmp_path, "tpt")
    for key in ("tta_views", "tta_fraction", "save_every"):
        del v[key]
    c = resolve_tta(v)
    assert (c.tta_protocol, c.tta_steps, c.tta_lr, c.tta_views, c.tta_fraction) == (
        "episodic",
        1,
        5e-3,
        63,
        0.1,
    )
    assert c.run.train == str(tiny.digits.test) and c.ctpt_weight == 50.0
    assert resolve_tta({**v, "method": "tda"}).tta_protocol == "online"
    assert resolve_tta({**v, "method": "tda", "tta_views": 0}).tta_views == 0
    assert resolve_tta(c.to_json()) == c


def test_online_refused_under_several_ranks(tiny: Tiny, tmp_path: Path) -> None:
    config = resolve_tta(values(tiny, tmp_path, "tda"))
    two = Runtime(torch.device("cpu"), rank=0, world=2, strategy="ddp")
    with pytest.raises(ValueError, match=r"online adapts one stream in order.*got 2 ranks"):
        _tta.check_protocol(config, two)
    _tta.check_protocol(resolve_tta(values(tiny, tmp_path, "tda", tta_protocol="episodic")), two)


def test_command_line_errors_are_one_line(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["tta", "--method", "bogus"])
    assert stop.value.code == 2
    capsys.readouterr()
    d = tiny.digits
    args = ["tta", "--eval", f"t={d.test}", "--classnames", str(d.names_file)]
    assert main([*args, "--tta-protocol", "online", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("robustft: error: resolve_tta: --tta-protocol online")
        and err.count("\n") == 1
    )


# --- data parallelism -------------------------------------------------------------------------


def _two_ranks(rank: int, world: int, folder: str, config: Any) -> Any:
    import torch.distributed as dist

    runtime = Runtime(torch.device("cpu"), rank, world, "ddp", dist.group.WORLD)
    return run_tta(config, runtime=runtime)


def test_episodic_shards_over_ranks_and_equals_one_process(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.digits
    extra = {"eval": [f"open={d.open}"], "save_every": 5, "tta_views": 9, "tta_fraction": 0.5}
    one = run_tta(
        resolve_tta(values(tiny, tmp_path / "one", "tda", tta_protocol="episodic", **extra))
    )
    config = resolve_tta(values(tiny, tmp_path / "two", "tda", tta_protocol="episodic", **extra))
    ranks = run_distributed(_two_ranks, world_size=2, args=(str(tmp_path), config), timeout=240)
    assert ranks[0] == ranks[1] == one
    labels, _ = predictions(tmp_path / "two", "open")
    assert len(labels) == 72
