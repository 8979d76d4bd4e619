"""histo.checkpoint: one layout for every kind, weights_only loading, one-line refusals, histo 0.1 files."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from histo import __version__, checkpoint
from histo.cli import main
from histo.errors import InputFileError
from pathology.kimianet import FeatureExtractor, build_model, load_model, model_config, random_init_checkpoint
from segmentation.infer import load_model as load_unet
from segmentation.infer import save_model as save_unet
from segmentation.unet import UNet3D


def _unet() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(channels=(2, 4), blocks_per_level=1, expansion=1)


def _refusal(path: Path, kind: str = "kimianet") -> str:
    """The message `load` refuses `path` with, checked to be one line naming the file."""
    with pytest.raises(InputFileError) as e:
        checkpoint.load(path, kind)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message[len(f"{path}: ") :]


# ---- the layout -----------------------------------------------------------------------------------------
def test_round_trip_keeps_weights_config_and_extras(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    config = {"arch": "x", "sizes": (1, 2), "nested": {"a": None, "b": 1.5}}
    path = tmp_path / "c.pt"
    checkpoint.save(
        path, "kimianet-train-state", 1, net.state_dict(), config, optimizer=opt.state_dict(), epoch=3
    )
    ckpt = checkpoint.load(path, "kimianet-train-state")
    assert (ckpt.kind, ckpt.version, ckpt.path, ckpt.histo_version) == (
        "kimianet-train-state",
        1,
        path,
        __version__,
    )
    assert ckpt.weights.keys() == net.state_dict().keys()
    assert all(torch.equal(ckpt.weights[k], v) for k, v in net.state_dict().items())
    assert ckpt.config == {
        "arch": "x",
        "sizes": [1, 2],
        "nested": {"a": None, "b": 1.5},
    }  # JSON: tuples -> lists
    assert ckpt.extra["epoch"] == 3
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    restored.load_state_dict(ckpt.extra["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_file_is_the_documented_plain_dict(tmp_path):
    checkpoint.save(tmp_path / "c.pt", "unet3d", 1, {"w": torch.ones(2)}, {"a": 1}, epoch=2)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw == {
        "format": "histo-checkpoint",
        "format_version": 1,
        "kind": "unet3d",
        "version": 1,
        "histo_version": __version__,
        "weights": raw["weights"],
        "config": {"a": 1},
        "extra": {"epoch": 2},
    }
    assert torch.equal(raw["weights"]["w"], torch.ones(2))


def test_every_load_is_weights_only_on_cpu(tmp_path, monkeypatch):
    checkpoint.save(tmp_path / "c.pt", "kimianet", 1, {}, {})
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    checkpoint.load(tmp_path / "c.pt", "kimianet")
    assert calls == [{"map_location": "cpu", "weights_only": True}]


@pytest.mark.parametrize(
    "args,match",
    [
        (("nosuch", 1, {}, {}), "unknown checkpoint kind 'nosuch'"),
        (("kimianet", 2, {}, {}), "versions 1..1, not 2"),
        (("kimianet", 0, {}, {}), "versions 1..1, not 0"),
        (("kimianet", 1, {"w": [1.0]}, {}), "weights must map names to tensors"),
        (("kimianet", 1, {}, {"p": Path("x")}), "config is not JSON-able"),
    ],
)
def test_save_refuses_what_load_could_not_read(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        checkpoint.save(tmp_path / "c.pt", *args)
    assert not (tmp_path / "c.pt").exists()


def test_save_refuses_extras_weights_only_would_refuse(tmp_path):
    import numpy as np

    with pytest.raises(ValueError, match=r"extra\.stats\.mean is a ndarray"):
        checkpoint.save(tmp_path / "c.pt", "kimianet", 1, {}, {}, stats={"mean": np.zeros(3)})
    with pytest.raises(ValueError, match=r"extra\.path is a PosixPath"):
        checkpoint.save(tmp_path / "c.pt", "kimianet", 1, {}, {}, path=Path("x"))
    assert not (tmp_path / "c.pt").exists()


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save(path, "kimianet", 1, {"w": torch.zeros(1)}, {"n": 1})

    def dies_half_way(obj, f, *a, **kw):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, "kimianet", 1, {"w": torch.ones(1)}, {"n": 2})
    monkeypatch.undo()
    assert checkpoint.load(path, "kimianet").config == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# ---- refusals: one line naming the file and the reason -----------------------------------------------
@pytest.mark.parametrize("found", list(checkpoint.KINDS))
@pytest.mark.parametrize("expected", list(checkpoint.KINDS))
def test_wrong_kind_names_both_kinds_and_their_commands(tmp_path, found, expected):
    path = tmp_path / "c.pt"
    checkpoint.save(path, found, 1, {}, {})
    if found == expected:
        assert checkpoint.load(path, expected).kind == found
        return
    f, e = checkpoint.KINDS[found], checkpoint.KINDS[expected]
    assert _refusal(path, expected) == (
        f"is {f.description} ({f.written_by}), expected {e.description} ({e.written_by})"
    )


def test_unet_for_kimianet_reads_as_the_issue_asks(tmp_path):
    save_unet(tmp_path / "unet.pt", _unet(), {})
    assert _refusal(tmp_path / "unet.pt") == (
        "is a 3D U-Net segmentation model (histo segment train), "
        "expected a KimiaNet feature extractor (histo train)"
    )


def _write(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


def test_missing_empty_and_directory(tmp_path):
    assert _refusal(tmp_path / "missing.pt") == "checkpoint not found"
    assert _refusal(_write(tmp_path / "empty.pt", b"")) == "empty file, not a checkpoint"
    (tmp_path / "dir.pt").mkdir()
    assert _refusal(tmp_path / "dir.pt") == "is a directory, not a checkpoint file"


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_checkpoint(tmp_path, keep):
    random_init_checkpoint(tmp_path / "full.pt", arch="cbr-tiny")
    data = (tmp_path / "full.pt").read_bytes()
    cut = _write(tmp_path / "cut.pt", data[: int(len(data) * keep)])
    assert _refusal(cut).startswith("truncated or damaged (its zip directory is missing")


def test_truncated_legacy_torch_file(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "full.pt").read_bytes()
    assert _refusal(_write(tmp_path / "cut.pt", data[:200])).startswith("damaged or truncated PyTorch file")


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"not a zip", "a text file, not a PyTorch checkpoint"),
        ("epoch,loss\n1,0.5\nvalidé\n", "a text file, not a PyTorch checkpoint"),
        (bytes(range(7, 255)) * 4, "not a PyTorch checkpoint (unrecognised content starting 07 08 09 0a"),
        ("<!DOCTYPE html><html>Sign in</html>", "an HTML page, not a checkpoint (a failed download?)"),
        (
            "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
            "a Git LFS pointer, not the checkpoint itself (run `git lfs pull`)",
        ),
        (pickle.dumps({"weights": 1}), "a plain Python pickle, not a PyTorch checkpoint"),
    ],
)
def test_files_that_are_not_pytorch_files(tmp_path, content, reason):
    assert _refusal(_write(tmp_path / "x.pt", content)).startswith(reason)


def test_random_bytes(tmp_path):
    data = os.urandom(4096)
    data = data if not data.startswith((b"PK", b"\x80")) else b"\x01" + data
    assert _refusal(_write(tmp_path / "x.pt", data)).startswith("not a PyTorch checkpoint")


def test_zip_that_is_not_a_torch_file(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.pt", "w") as z:
        z.writestr("weights/readme.txt", "hello")
    assert _refusal(tmp_path / "x.pt") == "a zip archive, but not a PyTorch file (no data.pkl inside)"


@pytest.mark.parametrize("zipped", [True, False])
def test_bare_state_dict_and_other_torch_objects(tmp_path, zipped):
    def save(obj, name):
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=zipped)
        return tmp_path / name

    assert _refusal(save({"a.weight": torch.zeros(2), "a.bias": torch.zeros(1)}, "sd.pt")) == (
        "a bare state dict of 2 tensors, not a histo checkpoint (no kind or config); "
        "pretrained DenseNet weights go to `histo train --init`"
    )
    assert _refusal(save({"a": torch.zeros(1)}, "sd.pt"), "unet3d") == (
        "a bare state dict of 1 tensor, not a histo checkpoint (no kind or config)"
    )
    assert (
        _refusal(save({"model": {}, "epoch": 3}, "d.pt"))
        == "not a histo checkpoint (a dict with keys model, epoch)"
    )
    assert _refusal(save(torch.zeros(3), "t.pt")) == "not a histo checkpoint (it holds a Tensor)"


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _evil_files(tmp_path: Path, marker: Path) -> list[Path]:
    """The payload alone, inside a checkpoint-looking dict, in the pre-1.6 torch format, and as a plain pickle."""
    envelope = {"format": "histo-checkpoint", "format_version": 1, "kind": "kimianet", "version": 1,
                "weights": {}, "config": {}, "extra": {"x": _Payload(marker)}}  # fmt: skip
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    torch.save(envelope, tmp_path / "evil_envelope.pt")
    torch.save(envelope, tmp_path / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    return [tmp_path / n for n in ("evil.pt", "evil_envelope.pt", "evil_legacy.pt", "evil.pkl")]


def test_payload_runs_when_loaded_unsafely(tmp_path):
    """The payload is real: unrestricted unpickling creates the marker (so the next test can fail)."""
    marker = tmp_path / "MARKER"
    for path in _evil_files(tmp_path, marker):
        if path.suffix == ".pkl":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), path
        marker.unlink()


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "MARKER"
    reasons = [_refusal(path) for path in _evil_files(tmp_path, marker)]
    assert not marker.exists()
    assert (
        reasons[:3]
        == [
            "refused: loading it would create the Python object exec (code could run); "
            "histo checkpoints hold only tensors and plain values"
        ]
        * 3
    )
    assert reasons[3].startswith("a plain Python pickle, not a PyTorch checkpoint")


def test_cli_refuses_the_payload_in_one_line(tmp_path):
    from pathology.store import TileStore

    marker = tmp_path / "MARKER"
    evil = _evil_files(tmp_path, marker)[1]
    TileStore.create_or_open(tmp_path / "tiles.zarr", {"test": True})
    args = ["index", "--tiles", tmp_path / "tiles.zarr", "--model", evil, "--out", tmp_path / "index"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and not marker.exists() and not (tmp_path / "index").exists()
    assert result.stderr.splitlines() == [f"error: {evil}: {_refusal(evil)}"]


def test_newer_formats_and_versions_say_upgrade(tmp_path):
    def envelope(**changes):
        checkpoint.save(tmp_path / "c.pt", "kimianet", 1, {}, {})
        raw = torch.load(tmp_path / "c.pt", weights_only=True)
        torch.save({**raw, "histo_version": "9.0.0", **changes}, tmp_path / "c.pt")
        return tmp_path / "c.pt"

    assert _refusal(envelope(format_version=2)) == (
        f"checkpoint format 2 was written by histo 9.0.0; this histo {__version__} reads format 1: upgrade histo"
    )
    assert _refusal(envelope(version=3)) == (
        f"kimianet version 3 was written by histo 9.0.0; this histo {__version__} reads up to version 1: "
        "upgrade histo"
    )
    assert _refusal(envelope(kind="vit")).startswith(
        f"unknown checkpoint kind 'vit' (this histo {__version__} knows kimianet, kimianet-train-state, unet3d"
    )
    assert _refusal(envelope(weights={"w": [1.0]})) == "damaged histo checkpoint: weights are not all tensors"
    assert _refusal(envelope(config=None, extra=3)) == (
        "damaged histo checkpoint: config, extra missing or of the wrong type"
    )


def test_model_loaders_name_the_file_for_a_bad_config(tmp_path):
    checkpoint.save(tmp_path / "k.pt", "kimianet", 1, {}, {"arch": "densenet121"})
    with pytest.raises(InputFileError, match=r"k\.pt: its config has no 'norm' entry$"):
        load_model(tmp_path / "k.pt")
    config = {**model_config("cbr-tiny", "batch", "IV", [], 32), "encoder": "resnet"}
    checkpoint.save(tmp_path / "r.pt", "kimianet", 1, {}, config)
    with pytest.raises(InputFileError, match=r"r\.pt: unknown encoder 'resnet'"):
        load_model(tmp_path / "r.pt")
    legacy = {k: v for k, v in config.items() if k not in ("encoder", "architecture")} | {"arch": "resnet"}
    checkpoint.save(tmp_path / "a.pt", "kimianet", 1, {}, legacy)
    with pytest.raises(InputFileError, match=r"a\.pt: unknown encoder 'resnet'"):
        load_model(tmp_path / "a.pt")


# ---- histo 0.1 layouts, written as that release's code writes them ----------------------------------
def _old_kimianet_save_model(path, model, config):
    """pathology.kimianet.save_model of histo 0.1."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {"format": "histo-kimianet", "format_version": 1, "config": dict(config), "state_dict": state}, path
    )


def test_old_kimianet_model_loads_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model("cbr-tiny", "batch", num_classes=2, variant="scratch")
    config = model_config("cbr-tiny", "batch", "scratch", ["a", "b"], 32, "hash", epoch=1)
    _old_kimianet_save_model(tmp_path / "old.pt", model, config)
    with caplog.at_level(logging.WARNING, logger="histo.checkpoint"):
        loaded, cfg = load_model(tmp_path / "old.pt")
    assert cfg == config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'old.pt'}: kimianet checkpoint in the histo 0.1 layout (histo-kimianet); "
        "loaded as is, later releases may drop this layout"
    ]
    assert checkpoint.load(tmp_path / "old.pt", "kimianet").histo_version is None
    fx = FeatureExtractor.from_checkpoint(tmp_path / "old.pt", device="cpu")  # an index's model.pt of 0.1
    assert fx.model_hash == hashlib.sha256((tmp_path / "old.pt").read_bytes()).hexdigest()


def test_old_kimianet_training_state_loads(tmp_path):
    from histo.training import EarlyStopping, rng_state

    model = build_model("cbr-tiny", "batch", num_classes=2, variant="scratch")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    old = {  # pathology.train.Trainer._state of histo 0.1
        "format": "histo-kimianet-train-state", "config": {"seed": 0},
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(), "epoch": 2,
        "early_stopping": EarlyStopping(3).state_dict(), "best_epoch": 1, "finished": False,
    }  # fmt: skip
    torch.save(old, tmp_path / "old.last.pt")
    state = checkpoint.load(tmp_path / "old.last.pt", "kimianet-train-state")
    assert state.config == {"seed": 0} and state.weights.keys() == old["model"].keys()
    assert state.extra.keys() == {
        "optimizer",
        "scheduler",
        "rng",
        "epoch",
        "early_stopping",
        "best_epoch",
        "finished",
    }
    assert (state.extra["epoch"], state.extra["best_epoch"], state.extra["finished"]) == (2, 1, False)
    assert "expected a KimiaNet feature extractor" in _refusal(tmp_path / "old.last.pt")


def _old_segment_save(paths, model, config, epoch, row, improved, optimizer, scheduler, early):
    """segmentation.train._save of histo 0.1."""
    weights = {"format": "histo-segment-checkpoint", "version": 1, "model": model.state_dict(),
               "model_config": model.config, "config": config, "epoch": epoch}  # fmt: skip
    if improved:
        torch.save({**weights, "val": {k: v for k, v in row.items() if k.startswith("val_")}}, paths["best"])
    resumable = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save({**weights, **resumable, "early_stopping": early.state_dict()}, paths["last"])


def test_old_segmentation_checkpoints_load(tmp_path):
    from histo.training import EarlyStopping

    model = _unet()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    paths = {"best": tmp_path / "m.pt", "last": tmp_path / "m.last.pt"}
    config = {"data": {"roi": [8, 8, 8]}}
    _old_segment_save(
        paths, model, config, 4, {"val_dice_WT": 0.5, "lr": 1.0}, True, opt, sched, EarlyStopping(2)
    )
    loaded, train_config = load_unet(paths["best"])
    assert train_config == config and loaded.config == model.config
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    best = checkpoint.load(paths["best"], "unet3d")
    assert best.extra == {"epoch": 4, "val": {"val_dice_WT": 0.5}}
    last = checkpoint.load(paths["last"], "unet3d-train-state")
    assert last.config == config and last.extra.keys() == {
        "optimizer",
        "scheduler",
        "early_stopping",
        "epoch",
    }
    assert _refusal(paths["last"], "unet3d").startswith("is a 3D U-Net training state")


def test_damaged_old_checkpoint_is_one_line(tmp_path):
    torch.save({"format": "histo-kimianet", "format_version": 1, "config": {}}, tmp_path / "old.pt")
    assert (
        _refusal(tmp_path / "old.pt")
        == "damaged histo 0.1 checkpoint (histo-kimianet): no 'state_dict' entry"
    )


# ---- the commands ------------------------------------------------------------------------------------
def test_histo_index_with_a_unet_says_what_it_is(tmp_path):
    from pathology.store import TileStore

    TileStore.create_or_open(tmp_path / "tiles.zarr", {"test": True})
    save_unet(tmp_path / "unet.pt", _unet(), {})
    out = tmp_path / "index"
    args = ["index", "--tiles", tmp_path / "tiles.zarr", "--model", tmp_path / "unet.pt", "--out", out]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'unet.pt'}: is a 3D U-Net segmentation model (histo segment train), "
        "expected a KimiaNet feature extractor (histo train)"
    ]


def test_segment_predict_with_a_kimianet_says_what_it_is(tmp_path):
    from segmentation.synthetic import make_cases

    cases = make_cases(tmp_path / "cases", 1, shape=(16, 16, 16), seed=0)
    model = random_init_checkpoint(tmp_path / "kimianet.pt", arch="cbr-tiny")
    out = tmp_path / "pred"
    args = ["segment", "predict", "--model", model, cases[0], "--out", out, "--device", "cpu"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.splitlines() == [
        f"error: {model}: is a KimiaNet feature extractor (histo train), "
        "expected a 3D U-Net segmentation model (histo segment train)"
    ]
