"""Out-of-range values are refused when a config is loaded, with an error naming the key.

Issue 10: ``data.batch_size=0``, ``optim.lr=-5``, ``optim.lr=nan``, ``optim.epochs=-1`` and
``distributed.checkpoint_every=0`` used to be accepted and fail (or loop) much later.
"""

from __future__ import annotations

import pytest

from adaptors.config import FinetuneConfig
from pretrain.config import PretrainConfig
from sharding.config import ShardJobConfig
from unisrec.config import load_config
from unisrec.errors import ConfigError

DOMAIN = ['domains=[{"name": "d", "format": "csv", "path": "."}]']


@pytest.mark.parametrize(
    "override",
    [
        "data.batch_size=0",
        "data.batch_size=-3",
        "data.loader_workers=-1",
        "optim.lr=-5",
        "optim.lr=0",
        "optim.lr=nan",
        "optim.lr=.inf",
        "optim.epochs=-1",
        "optim.epochs=0",
        "optim.max_steps=-1",
        "optim.warmup_steps=-1",
        "optim.weight_decay=-0.1",
        "optim.grad_clip=-1",
        "distributed.checkpoint_every=0",
        "distributed.keep_checkpoints=0",
        "distributed.cpus_per_worker=0",
        "distributed.max_failures=-2",
        "loss.temperature=0",
        "loss.lam=-1",
        "loss.item_keep_prob=1.5",
        "log_every=0",
    ],
)
def test_pretrain_config_refuses_out_of_range_values(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(PretrainConfig, None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=-5",
        "optim.lr=nan",
        "optim.batch_size=0",
        "optim.weight_decay=-1",
        "optim.grad_clip=-1",
        "eval.batch_size=0",
        "temperature=nan",
    ],
)
def test_finetune_config_refuses_out_of_range_values(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(FinetuneConfig, None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "processing.kcore=-1",
        "processing.max_seq_len=0",
        "processing.max_text_chars=0",
        "encoder.batch_size=0",
        "encoder.max_length=0",
        "encoder.word_drop_prob=1.5",
        "shards.num_shards=0",
    ],
)
def test_shard_config_refuses_out_of_range_values(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(ShardJobConfig, None, [*DOMAIN, override])


def test_a_domain_kcore_below_zero_names_the_domain_entry():
    with pytest.raises(ConfigError, match=r"^domains\[0\]\.kcore: "):
        load_config(
            ShardJobConfig,
            None,
            ['domains=[{"name": "d", "format": "csv", "path": ".", "kcore": -2}]'],
        )


def test_defaults_and_sensible_values_still_load():
    load_config(PretrainConfig, None, ["optim.lr=3e-4", "distributed.max_failures=-1"])
    load_config(FinetuneConfig, None, ["optim.max_epochs=0", "optim.grad_clip=0"])
    load_config(ShardJobConfig, None, [*DOMAIN, "processing.kcore=0"])


def test_cli_reports_the_bad_value_as_one_error_line(tmp_path, capsys):
    from recipes.cli import main

    config = tmp_path / "pretrain.yaml"
    config.write_text("optim: {lr: 0.001}\n")
    assert main(["config", "show", "--job", "pretrain", str(config), "optim.lr=nan"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: optim.lr: must be a finite number")
    assert "Traceback" not in err
