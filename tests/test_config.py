"""Config loading: defaults are the schema; bad keys, types and files are one-line errors."""

from __future__ import annotations

import pytest

from histo import config
from histo.errors import ConfigError

DEFAULTS = {
    "seed": 0,
    "lr": 0.001,
    "name": "x",
    "flag": False,
    "sizes": [1, 2],
    "mosaic": {"k": 9, "p": 15.0},
}


def test_merge_overrides_nested_values_and_keeps_the_rest():
    merged = config.merge(DEFAULTS, {"mosaic": {"p": 5}, "lr": 1}, source="u.yaml")
    assert merged["mosaic"] == {"k": 9, "p": 5}
    assert merged["lr"] == 1 and merged["seed"] == 0
    assert DEFAULTS["mosaic"]["p"] == 15.0, "defaults must not be mutated"


@pytest.mark.parametrize(
    ("user", "needle"),
    [
        ({"sed": 1}, "unknown key 'sed'"),
        ({"mosaic": {"kk": 1}}, "unknown key 'mosaic.kk'"),
        ({"seed": "one"}, "key 'seed' must be int"),
        ({"flag": 1}, "key 'flag' must be bool"),
        ({"seed": True}, "key 'seed' must be int"),
        ({"mosaic": 3}, "key 'mosaic' must be a mapping"),
    ],
)
def test_merge_rejects_bad_keys_with_file_and_key(user, needle):
    with pytest.raises(ConfigError) as e:
        config.merge(DEFAULTS, user, source="user.yaml")
    assert str(e.value).startswith("user.yaml: ")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unflatten_drops_unset_flags():
    assert config.unflatten({"mosaic.k": 4, "seed": None, "lr": 0.1}) == {"mosaic": {"k": 4}, "lr": 0.1}


def test_load_config_layers_defaults_file_and_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    (tmp_path / "stage.yaml").write_text("seed: 0\nmosaic:\n  k: 9\n  p: 15.0\n")
    user = tmp_path / "user.yaml"
    user.write_text("mosaic:\n  p: 5\n")
    cfg = config.load_config("stage", user, overrides={"mosaic.k": 4, "seed": None})
    assert cfg == {"seed": 0, "mosaic": {"k": 4, "p": 5}}


@pytest.mark.parametrize(
    ("text", "needle"), [("a: [1,\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")]
)
def test_read_yaml_errors_name_the_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as e:
        config.read_yaml(path)
    assert str(path) in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.read_yaml(tmp_path / "nope.yaml")


def test_every_shipped_default_config_parses():
    files = sorted(config.CONFIG_DIR.glob("*.yaml"))
    for path in files:
        assert isinstance(config.read_yaml(path), dict), path
