"""Typed YAML configs: overrides, errors that name the key, environment defaults."""

from __future__ import annotations

import pytest

from recipes.cli import main
from sharding.config import ShardJobConfig
from unisrec.config import load_config
from unisrec.errors import ConfigError

YAML = """
domains:
  - name: office
    format: csv
    path: ${DATA_ROOT_FOR_TEST:-/data}/office
processing:
  kcore: 5
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "shard.yaml"
    path.write_text(YAML)
    return path


def test_dotted_overrides_are_parsed_as_yaml_values(config_file):
    cfg = load_config(ShardJobConfig, config_file, ["processing.kcore=10", "shards.seed=3"])
    assert cfg.processing.kcore == 10 and cfg.shards.seed == 3
    assert cfg.domains[0].path == "/data/office"


def test_environment_variables_fill_values_and_nested_defaults(config_file, monkeypatch):
    monkeypatch.setenv("DATA_ROOT_FOR_TEST", "/mnt/x")
    monkeypatch.setenv("UNISREC_CACHE", "/tmp/cache-for-test")
    cfg = load_config(ShardJobConfig, config_file)
    assert cfg.domains[0].path == "/mnt/x/office"
    assert cfg.encoder.cache_dir == "/tmp/cache-for-test/embeddings"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("processing.kcor=3", "unknown key 'processing.kcor' (did you mean 'processing.kcore'?)"),
        ("processing.kcore=abc", "processing.kcore: expected an integer, got 'abc'"),
        (
            "encoder.pooling=max",
            "encoder.pooling: expected one of ['auto', 'cls', 'mean'], got 'max'",
        ),
        (
            "processing.tie_order=random",
            "processing.tie_order: expected one of ['file', 'shuffle'], got 'random'",
        ),
        ("processing.tie_ordre=file", "(did you mean 'processing.tie_order'?)"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_a_wrong_key_or_value_is_an_error_naming_it(config_file, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ShardJobConfig, config_file, [override])
    assert message in str(err.value)


def test_tie_order_is_null_by_default_and_resolves_per_format(config_file):
    from sharding.config import DomainSource, resolve_tie_order

    cfg = load_config(ShardJobConfig, config_file)
    assert cfg.processing.tie_order is None and cfg.processing.seed == 0
    retail = DomainSource(name="r", format="online-retail", path="x")
    assert resolve_tie_order(cfg.domains[0], cfg.processing) == "file"  # csv
    assert resolve_tie_order(retail, cfg.processing) == "shuffle"
    cfg = load_config(ShardJobConfig, config_file, ["processing.tie_order=file"])
    assert resolve_tie_order(retail, cfg.processing) == "file"


def test_config_show_prints_the_resolved_config(config_file, capsys):
    assert main(["config", "show", str(config_file), "processing.max_seq_len=20"]) == 0
    out = capsys.readouterr().out
    assert "max_seq_len: 20" in out and "pooling: auto" in out


def test_cli_reports_config_errors_without_a_traceback(config_file, capsys):
    assert main(["config", "show", str(config_file), "processing.kcor=3"]) == 2
    assert "error: unknown key 'processing.kcor'" in capsys.readouterr().err
