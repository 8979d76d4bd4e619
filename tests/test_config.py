"""Config loading: typed stage models over the packaged YAML defaults; every bad value is one line naming
where it came from, the dotted key and the reason; the YAML and the models cannot drift apart."""

from __future__ import annotations

import json
import math
from typing import ClassVar

import pytest
from pydantic import BaseModel

from histo import config
from histo.config import (
    Count,
    Fraction,
    RunOptions,
    Section,
    StageConfig,
    flatten,
    load_config,
    read_yaml,
    unflatten,
)
from histo.errors import ConfigError
from histo.robustness_config import RobustnessConfig
from pathology.config import TileConfig, TrainConfig
from search.config import IndexConfig, SearchConfig
from segmentation.config import SegmentConfig

STAGES = (TileConfig, TrainConfig, IndexConfig, SearchConfig, SegmentConfig, RobustnessConfig)


# ---- a small schema for the mechanics ------------------------------------------------------------
class Mosaic(Section):
    k: Count
    p: Fraction


class ToyRun(RunOptions):
    workers: Count


class Toy(StageConfig):
    stage: ClassVar[str] = "toy"
    seed: int
    lr: float
    name: str
    flag: bool
    mosaic: Mosaic
    run: ToyRun


TOY_YAML = "seed: 0\nlr: 0.001\nname: x\nflag: false\nmosaic:\n  k: 9\n  p: 0.15\nrun:\n  workers: 1\n"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    (tmp_path / "toy.yaml").write_text(TOY_YAML)
    return tmp_path


def test_merge_overrides_nested_values_and_keeps_the_rest():
    defaults = {"seed": 0, "lr": 0.001, "mosaic": {"k": 9, "p": 15.0}}
    merged = config.merge(defaults, {"mosaic": {"p": 5}, "lr": 1})
    assert merged == {"seed": 0, "lr": 1, "mosaic": {"k": 9, "p": 5}}
    assert defaults["mosaic"]["p"] == 15.0, "defaults must not be mutated"
    assert config.merge(defaults, {"mosaic": 3})["mosaic"] == 3  # a non-mapping replaces (then refused)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sed: 1\n", "sed: unknown key (known here: flag, lr, mosaic, name, run, seed)"),
        ("mosaic:\n  kk: 1\n", "mosaic.kk: unknown key (known here: k, p)"),
        ("seed: one\n", "seed: input should be a valid integer, got 'one'"),
        ("flag: 1\n", "flag: input should be a valid boolean, got 1"),
        ("seed: true\n", "seed: input should be a valid integer, got True"),
        ("seed: 1.0\n", "seed: input should be a valid integer, got 1.0"),
        ("mosaic: 3\n", "mosaic: must be a mapping of keys to values, got 3"),
        ("mosaic:\n  p: 1.5\n", "mosaic.p: input should be less than or equal to 1, got 1.5"),
        ("mosaic:\n  p: .nan\n", "mosaic.p: input should be a finite number, got nan"),
        ("lr: .inf\n", "lr: input should be a finite number, got inf"),
        ("name: null\n", "name: input should be a valid string, got None"),
    ],
)
def test_bad_values_are_one_line_naming_file_and_key(toy, text, needle):
    user = toy / "user.yaml"
    user.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(Toy, user)
    assert str(e.value) == f"{user}: {needle}"


def test_an_int_is_a_float_but_nothing_else_is_converted(toy):
    user = toy / "user.yaml"
    user.write_text("lr: 1\nmosaic: {p: 1}\n")
    cfg = load_config(Toy, user)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.mosaic.p, float)


def test_load_config_layers_defaults_file_and_flags(toy):
    user = toy / "user.yaml"
    user.write_text("mosaic:\n  p: 0.5\n")
    cfg = load_config(Toy, user, overrides={"mosaic.k": 4, "seed": None})
    assert cfg.model_dump() == {
        "seed": 0, "lr": 0.001, "name": "x", "flag": False, "mosaic": {"k": 4, "p": 0.5}, "run": {"workers": 1}
    }  # fmt: skip
    assert isinstance(cfg.mosaic, Mosaic) and cfg.mosaic.k == 4


def test_the_error_names_the_layer_that_set_the_key(toy):
    user = toy / "user.yaml"
    user.write_text("mosaic:\n  k: -1\n")
    with pytest.raises(ConfigError, match=rf"^{user}: mosaic\.k: "):
        load_config(Toy, user)
    with pytest.raises(
        ConfigError, match=r"^--k: mosaic\.k: input should be greater than or equal to 0, got -2$"
    ):
        load_config(Toy, user, {"mosaic.k": -2}, names={"mosaic.k": "--k"})
    with pytest.raises(ConfigError, match=r"^command-line option: seed: "):
        load_config(Toy, None, {"seed": "x"})
    (toy / "toy.yaml").write_text(TOY_YAML.replace("name: x\n", ""))  # a defaults file missing a key
    with pytest.raises(ConfigError, match=rf"^{toy / 'toy.yaml'}: name: missing"):
        load_config(Toy)


def test_models_are_frozen_and_updated_copies_are_validated(toy):
    cfg = load_config(Toy)
    with pytest.raises(ValueError, match="frozen"):
        cfg.seed = 3
    assert cfg.updated({"mosaic.k": 2}).mosaic.k == 2 and cfg.mosaic.k == 9
    with pytest.raises(ConfigError, match=r"^override: mosaic\.k: "):
        cfg.updated({"mosaic.k": -1})


def test_coerce_takes_the_object_none_or_a_mapping_over_the_defaults(toy):
    cfg = load_config(Toy)
    assert Toy.coerce(cfg) is cfg and Toy.coerce(None) == cfg
    assert Toy.coerce({"mosaic": {"k": 1}}).mosaic == Mosaic(k=1, p=0.15)
    with pytest.raises(ConfigError, match=r"^config: mosaic\.p: "):
        Toy.coerce({"mosaic": {"p": "a lot"}})
    with pytest.raises(ConfigError, match=r"^config: expected a Toy or a mapping, got list"):
        Toy.coerce([1])
    assert Toy.section("mosaic", {"k": 3}) == Mosaic(k=3, p=0.15)


def test_recorded_leaves_out_the_run_options_and_is_json(toy):
    recorded = load_config(Toy).recorded()
    assert "run" not in recorded and json.loads(json.dumps(recorded)) == recorded


def test_flatten_gives_the_dotted_keys_of_the_leaves_and_unflatten_inverts_it():
    nested = {
        "seed": 0,
        "mosaic": {"k": 9, "percent": 20.0},
        "segment": {"roi": [64, 64, 32], "deep": {"a": 1}},
    }
    flat = flatten(nested)
    assert flat == {
        "seed": 0,
        "mosaic.k": 9,
        "mosaic.percent": 20.0,
        "segment.roi": [64, 64, 32],
        "segment.deep.a": 1,
    }
    assert unflatten(flat) == nested


def test_load_config_wants_a_stage_class():
    with pytest.raises(TypeError, match="TileConfig"):
        load_config("tile")


# ---- YAML ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"), [("a: [1,\n", r"not valid YAML \(line 2"), ("- 1\n- 2\n", "expected a mapping")]
)
def test_read_yaml_errors_name_the_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as e:
        read_yaml(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        read_yaml(tmp_path)


def test_exponents_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-9 as a string; people and YAML 1.2 mean a number."""
    path = tmp_path / "c.yaml"
    path.write_text("a: 1e-9\nb: -2E+3\nc: 1.0e-3\nd: 12\ne: 1_000\nf: 0x10\ng: e5\nh: '1e-9'\n")
    assert read_yaml(path) == {
        "a": 1e-9,
        "b": -2000.0,
        "c": 1e-3,
        "d": 12,
        "e": 1000,
        "f": 16,
        "g": "e5",
        "h": "1e-9",
    }
    path.write_text("cellularity:\n  mpp: 1e-9\n")
    assert load_config(TileConfig, path).cellularity.mpp == 1e-9


# ---- the shipped stages --------------------------------------------------------------------------
def _keys(node: object, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return set()
    out = set()
    for key, value in node.items():
        out |= {f"{prefix}{key}"} | _keys(value, f"{prefix}{key}.")
    return out


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        out.add(f"{prefix}{name}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= _fields(field.annotation, f"{prefix}{name}.")
    return out


def _defaults_in_code(model: type[BaseModel], prefix: str = "") -> list[str]:
    found = []
    for name, field in model.model_fields.items():
        if not field.is_required():
            found.append(f"{prefix}{name}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _defaults_in_code(field.annotation, f"{prefix}{name}.")
    return found


@pytest.mark.parametrize("schema", STAGES, ids=lambda s: s.stage)
def test_yaml_keys_and_model_fields_are_the_same_and_defaults_live_only_in_the_yaml(schema):
    assert _keys(read_yaml(schema.defaults_path())) == _fields(schema)
    assert _defaults_in_code(schema) == [], "a default in code would be a second copy of the YAML's"
    cfg = load_config(schema)
    assert cfg.model_dump(mode="json") == json.loads(json.dumps(cfg.model_dump(mode="json")))
    assert "run" in cfg.model_dump() and "run" not in cfg.recorded()


def test_every_defaults_file_has_a_stage_model():
    assert {p.stem for p in config.CONFIG_DIR.glob("*.yaml")} == {s.stage for s in STAGES}


@pytest.mark.parametrize("path", sorted((config.CONFIG_DIR / "demo").glob("*.yaml")), ids=lambda p: p.name)
def test_demo_configs_are_valid_user_files(path):
    schema = next(s for s in STAGES if s.stage == path.stem)
    assert isinstance(load_config(schema, path), schema)


def test_old_tile_stores_compare_equal_with_unchanged_params():
    """A store records the recorded part of the config; before the `run:` section it recorded the whole
    tile.yaml, so a store made with unchanged defaults has the same params as one made today."""
    from pathology.tiler import store_params, tiling_config

    params = store_params(load_config(TileConfig))
    old = {k: v for k, v in read_yaml(TileConfig.defaults_path()).items() if k != "run"}
    assert {k: v for k, v in params.items() if k != "resolved"} == old
    assert params["resolved"] == {"tile_px": 1000, "target_mpp": 0.5, "tile_um": 500.0}
    assert tiling_config(params, "store") == load_config(TileConfig)
    with pytest.raises(ConfigError, match=r"^store: tissue\.method: input should be 'hsd' or 'otsu'"):
        tiling_config({**params, "tissue": {**params["tissue"], "method": "hds"}}, "store")


def test_a_manifest_with_a_bad_search_value_is_one_line(tmp_path):
    from search.slide_index import recorded_config

    manifest = {"index": {"type": "flat", "params_requested": {}}, "search": {"tile_k": "lots"}}
    with pytest.raises(ConfigError) as e:
        recorded_config(tmp_path, manifest)
    assert (
        str(e.value)
        == f"{tmp_path / 'manifest.json'}: search.tile_k: input should be a valid integer, got 'lots'"
    )
    old = {"index": {"type": "ivf", "params_requested": {"nprobe": 4}}, "search": {"stage1_tiles": 8}}
    recorded = recorded_config(tmp_path, old)  # an older, partial manifest: the rest are the defaults
    assert recorded.params.nprobe == 4 and recorded.search.stage1_tiles == 8 and recorded.params.rerank >= 1


@pytest.mark.parametrize(
    ("schema", "overrides", "needle"),
    [
        (TileConfig, {"tile.mpp": "half"}, "tile.mpp: input should be a valid number, got 'half'"),
        (TileConfig, {"tile.magnification": 0}, "tile.magnification: input should be greater than 0"),
        (TileConfig, {"mosaic.percent": -10}, "mosaic.percent: input should be greater than 0"),
        (
            TileConfig,
            {"mosaic.n_clusters": 0},
            "mosaic.n_clusters: input should be greater than or equal to 1",
        ),
        (TileConfig, {"cellularity.top_fraction": 5}, "cellularity.top_fraction: input should be less than"),
        (
            TileConfig,
            {"mosaic.min_tissue_fraction": math.nan},
            "mosaic.min_tissue_fraction: input should be a finite",
        ),
        (TileConfig, {"tissue.method": "hds"}, "tissue.method: input should be 'hsd' or 'otsu', got 'hds'"),
        (TileConfig, {"tile.um": 100.0, "tile.mpp": 0.5}, "tile.um: set tile.um or tile.mpp, not both"),
        (TrainConfig, {"model.norm": "nosuch"}, "model.norm: unknown norm 'nosuch' (known: batch,"),
        (TrainConfig, {"model.norm": "rn_b"}, "model.norm: norm 'rn_b' cannot be used here"),
        (TrainConfig, {"model.encoder": "resnet"}, "model.encoder: unknown encoder 'resnet'"),
        (
            TrainConfig,
            {"model.encoder": "cbr-tiny", "model.variant": "II"},
            "model.variant: variant II freezes dense",
        ),
        (TrainConfig, {"augment.crop_scale": [0.9, 0.5]}, "augment.crop_scale: needs 0 < low <= high <= 1"),
        (TrainConfig, {"optim.epochs": 0}, "optim.epochs: input should be greater than or equal to 1"),
        (
            IndexConfig,
            {"search.tile_k": "lots"},
            "search.tile_k: input should be a valid integer, got 'lots'",
        ),
        (IndexConfig, {"params.train_points_per_list": 20}, "params.train_points_per_list: input should be"),
        (IndexConfig, {"evaluate.k": [1, 0]}, "evaluate.k[1]: input should be greater than or equal to 1"),
        (SearchConfig, {"k": -1}, "k: input should be greater than or equal to 1, got -1"),
        (SearchConfig, {"run.verify": "quick"}, "run.verify: input should be 'full', 'size' or 'none'"),
        (SegmentConfig, {"model.norm": "nosuch"}, "model.norm: unknown norm 'nosuch' (known: batch,"),
        (SegmentConfig, {"data.roi": [8, 8, 7]}, "data.roi: [8, 8, 7] must be divisible by 8 on every side"),
        (SegmentConfig, {"infer.threshold": 2.0}, "infer.threshold: input should be less than 1, got 2.0"),
        (SegmentConfig, {"infer.roi": [8, 8]}, "infer.roi: needs 3 sides (or [] for the training crop)"),
        (SegmentConfig, {"model.channels": [16, 33]}, "model.channels[1]: input should be a multiple of 2"),
        (SegmentConfig, {"train.epochs": 0}, "train.epochs: input should be greater than or equal to 1"),
        (RobustnessConfig, {"severities": "1-9"}, "severities: every severity must be in 1..5, got '1-9'"),
        (RobustnessConfig, {"severities": "x"}, "severities: expected e.g. 1-5 or 1,3,5, got 'x'"),
        (RobustnessConfig, {"alpha_bn": 2.0}, "alpha_bn: input should be less than or equal to 1"),
        (RobustnessConfig, {"pathology.k": 0}, "pathology.k: input should be greater than or equal to 1"),
    ],
)
def test_stage_ranges_and_choices(schema, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(schema, overrides=overrides)
    assert str(e.value).startswith(f"command-line option: {needle}"), str(e.value)
    assert "\n" not in str(e.value)


def test_null_where_a_value_is_needed_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tile:\n  px: null\n")
    with pytest.raises(ConfigError, match=rf"^{path}: tile\.px: input should be a valid integer, got None$"):
        load_config(TileConfig, path)


def test_good_values_pass_and_parse():
    assert load_config(RobustnessConfig, overrides={"severities": "3,1-2"}).severities == (1, 2, 3)
    assert load_config(RobustnessConfig, overrides={"severities": 4}).severities == (4,)
    assert load_config(SegmentConfig, overrides={"infer.roi": [64, 64, 32]}).infer.roi == (64, 64, 32)
    tile = load_config(TileConfig, overrides={"tile.um": 256.0, "tile.mpp": None})
    assert tile.tile.um == 256.0 and tile.tile.mpp is None
    assert load_config(TrainConfig, overrides={"model.init": "w.pt"}).model.init == "w.pt"
