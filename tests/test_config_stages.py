"""Every command refuses a bad config value of each kind (wrong type, unknown choice, out of range, unknown
key, bad YAML) with exit code 2 and one line `error: SOURCE: key.path: reason`, before any output exists;
flags and Python API arguments meet the same rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from histo.cli import main
from histo.errors import ConfigError

# stage -> (file text, the line's end after "error: FILE: ") for each kind of bad value
BAD = {
    "tile": [
        ("tile:\n  mpp: half\n", "tile.mpp: input should be a valid number, got 'half'"),
        ("tissue:\n  method: hds\n", "tissue.method: input should be 'hsd' or 'otsu', got 'hds'"),
        ("mosaic:\n  percent: -10\n", "mosaic.percent: input should be greater than 0, got -10"),
        ("tile:\n  pxx: 3\n", "tile.pxx: unknown key (known here: magnification, mpp, px, um)"),
    ],
    "train": [
        ("optim:\n  lr: fast\n", "optim.lr: input should be a valid number, got 'fast'"),
        (
            "optim:\n  monitor: val_f1\n",
            "optim.monitor: input should be 'val_macro_f1', 'val_acc', 'val_slide_acc'",
        ),
        ("optim:\n  epochs: 0\n", "optim.epochs: input should be greater than or equal to 1, got 0"),
        ("optim:\n  epoch: 3\n", "optim.epoch: unknown key (known here: accumulate, amp,"),
        (
            "model:\n  arch: densenet121\n",  # the key before the encoder registry
            "model.arch: renamed model.encoder: rename the key (arch densenet121 is encoder kimianet; see `histo encoders`)",
        ),
        (
            "model:\n  arch: vgg16\n",
            "model.arch: renamed model.encoder: rename the key (see `histo encoders`)",
        ),
    ],
    "index": [
        ("search:\n  tile_k: lots\n", "search.tile_k: input should be a valid integer, got 'lots'"),
        ("type: lsh\n", "type: input should be 'flat', 'ivf', 'ivfpq', 'hnsw' or 'ivf_hnsw', got 'lsh'"),
        ("params:\n  recall_target: 1.5\n", "params.recall_target: input should be less than or equal to 1"),
        ("params:\n  nprobes: 3\n", "params.nprobes: unknown key (known here: barcode_index,"),
    ],
    "search": [
        ("k: five\n", "k: input should be a valid integer, got 'five'"),
        ("mode: cosine\n", "mode: input should be 'barcode' or 'float', got 'cosine'"),
        ("k: 0\n", "k: input should be greater than or equal to 1, got 0"),
        ("kk: 1\n", "kk: unknown key (known here: exclude_same_patient, exhaustive, k,"),
    ],
    "segment": [
        ("train:\n  epochs: many\n", "train.epochs: input should be a valid integer, got 'many'"),
        ("model:\n  head: voxels\n", "model.head: input should be 'regions' or 'labels', got 'voxels'"),
        ("infer:\n  threshold: 2.0\n", "infer.threshold: input should be less than 1, got 2.0"),
        ("infer:\n  window: 3\n", "infer.window: unknown key (known here: overlap, overlay_slices, roi,"),
    ],
    "robustness": [
        ("pathology:\n  k: one\n", "pathology.k: input should be a valid integer, got 'one'"),
        ("run:\n  device: gpu\n", "run.device: input should be 'auto', 'cpu' or 'cuda', got 'gpu'"),
        ("alpha_bn: 2.0\n", "alpha_bn: input should be less than or equal to 1, got 2.0"),
        ("segment:\n  rois: [8, 8, 8]\n", "segment.rois: unknown key (known here: max_cases, overlap, roi,"),
    ],
}
BAD_YAML = ("a: [1,\n", "not valid YAML (line 2")


def commands(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """stage of each command -> its arguments, with --out (or the folder it would fill) at tmp/'out'."""
    tmp.joinpath("model.pt").write_bytes(b"")  # click checks these exist; the config is refused first
    tmp.joinpath("data").mkdir(exist_ok=True)
    out, model, data = str(tmp / "out"), str(tmp / "model.pt"), str(tmp / "data")
    return {
        "tile": ("tile", ["tile", data, "--out", out]),
        "train": ("train", ["train", "--tiles", data, "--out", out]),
        "index": ("index", ["index", "--tiles", data, "--model", model, "--out", out]),
        "search": ("search", ["search", "--index", out, "query.svs"]),
        "segment train": ("segment", ["segment", "train", "--data", data, "--out", out]),
        "segment predict": ("segment", ["segment", "predict", "--model", model, data, "--out", out]),
        "segment eval": ("segment", ["segment", "eval", "--pred", data, "--data", data, "--out", out]),
        "robustness pathology": (
            "robustness",
            ["robustness", "pathology", "--tiles", data, "--model", model, "--out", out],
        ),
        "robustness segment": (
            "robustness",
            ["robustness", "segment", "--data", data, "--model", model, "--out", out],
        ),
    }


def refused(args: list[str], tmp: Path) -> str:
    """Run a command that must be refused: exit 2, one `error:` line, no traceback, nothing written."""
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, (
        result.output
    )
    assert not (tmp / "out").exists()
    return lines[0]


COMMANDS = ("tile", "train", "index", "search", "segment train", "segment predict", "segment eval",
            "robustness pathology", "robustness segment")  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_each_kind_of_bad_value_is_refused_before_any_output(command, tmp_path):
    stage, args = commands(tmp_path)[command]
    cfg = tmp_path / "bad.yaml"
    for text, reason in [*BAD[stage], BAD_YAML]:
        cfg.write_text(text)
        line = refused([*args, "--config", str(cfg)], tmp_path)
        assert line.startswith(f"error: {cfg}: {reason}"), (text, line)


@pytest.mark.parametrize(
    ("command", "flags", "line"),
    [
        (
            "tile",
            ["--tile-px", "4"],
            "error: --tile-px: tile.px: input should be greater than or equal to 8, got 4",
        ),
        (
            "tile",
            ["--workers", "0"],
            "error: --workers: run.workers: input should be greater than or equal to 1",
        ),
        (
            "train",
            ["--epochs", "0"],
            "error: --epochs: optim.epochs: input should be greater than or equal to 1",
        ),
        (
            "train",
            ["--variant", "V"],
            "error: --variant: model.variant: input should be 'I', 'II', 'III', 'IV'",
        ),
        (
            "index",
            ["--type", "lsh"],
            "error: --type: type: input should be 'flat', 'ivf', 'ivfpq', 'hnsw' or 'ivf_hnsw'",
        ),
        (
            "index",
            ["--device", "gpu"],
            "error: --device: run.device: input should be 'auto', 'cpu' or 'cuda'",
        ),
        ("search", ["--k", "0"], "error: --k: k: input should be greater than or equal to 1, got 0"),
        ("search", ["--k", "-1"], "error: --k: k: input should be greater than or equal to 1, got -1"),
        (
            "segment train",
            ["--epochs", "0"],
            "error: --epochs: train.epochs: input should be greater than or equal",
        ),
        (
            "segment train",
            ["--roi", "8,8,7"],
            "error: --roi: data.roi: [8, 8, 7] must be divisible by 8 on every",
        ),
        (
            "segment predict",
            ["--overlap", "1.5"],
            "error: --overlap: infer.overlap: input should be less than 1",
        ),
        (
            "segment predict",
            ["--roi", "8,0,8"],
            "error: --roi: infer.roi[1]: input should be greater than or equal",
        ),
        (
            "robustness pathology",
            ["--k", "-1"],
            "error: --k: pathology.k: input should be greater than or equal to 1",
        ),
        (
            "robustness pathology",
            ["--alpha-bn", "2"],
            "error: --alpha-bn: alpha_bn: input should be less than or",
        ),
        (
            "robustness segment",
            ["--severities", "0-3"],
            "error: --severities: severities: every severity must be",
        ),
    ],
)
def test_flags_meet_the_same_rules(command, flags, line, tmp_path):
    _, args = commands(tmp_path)[command]
    assert refused([*args, *flags], tmp_path).startswith(line)


def test_an_unknown_norm_reads_the_same_in_every_command(tmp_path):
    cmds = commands(tmp_path)
    lines = [refused([*cmds[c][1], "--norm", "nosuch"], tmp_path) for c in ("train", "segment train")]
    assert lines[0] == lines[1] and lines[0].startswith(
        "error: --norm: model.norm: unknown norm 'nosuch' (known:"
    )


def test_python_api_arguments_are_validated_before_any_output(tmp_path):
    """The API takes the typed object or a dict over the defaults, checked like a config file."""
    from pathology.tiler import tile_slides
    from pathology.train import train_kimianet
    from search.slide_index import SlideIndex
    from segmentation.infer import predict_cases
    from segmentation.train import train_segmenter

    out = tmp_path / "out"
    calls = [
        (lambda: tile_slides([tmp_path], out, {"tile": {"px": "big"}}), "config: tile.px: input should be"),
        (lambda: train_kimianet(tmp_path, out, {"optim": {"epochs": 0}}), "config: optim.epochs: "),
        (
            lambda: SlideIndex.build(tmp_path, "m.pt", out, {"search": {"tile_k": "lots"}}),
            "config: search.tile_k",
        ),
        (lambda: train_segmenter(tmp_path, out, {"train": {"epochs": 0}}), "config: train.epochs: "),
        (
            lambda: predict_cases("m.pt", [tmp_path], out, {"infer": {"threshold": 2.0}}),
            "config: infer.threshold",
        ),
    ]
    for call, start in calls:
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value).startswith(start), str(e.value)
        assert not out.exists()
