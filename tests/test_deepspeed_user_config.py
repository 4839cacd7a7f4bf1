"""A user's own DeepSpeed JSON (``distributed.deepspeed_config``), merged with what the
platform must set: batch sizes from the data config, clipping from the optimizer config."""

from __future__ import annotations

import json

import pytest

from pretrain.config import PretrainConfig
from pretrain.deepspeed_presets import merge_user_config, read_user_config
from pretrain.worker import deepspeed_config
from unisrec.config import load_config
from unisrec.errors import ConfigError

PLATFORM = {
    "train_micro_batch_size_per_gpu": 64,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": False},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
    "gradient_clipping": 1.0,
}


def test_the_users_zero_section_and_extras_pass_through_with_the_platforms_batch_sizes():
    user = {
        "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e7},
        "bf16": {"enabled": True},
        "activation_checkpointing": {"partition_activations": True},
        "train_micro_batch_size_per_gpu": 64,  # repeating the platform's value is fine
    }
    merged = merge_user_config(user, PLATFORM, world_size=2, source="ds.json")
    assert merged["zero_optimization"] == {
        "stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e7
    }  # fmt: skip
    assert merged["bf16"] == {"enabled": True}
    assert merged["activation_checkpointing"] == {"partition_activations": True}
    assert merged["train_micro_batch_size_per_gpu"] == 64
    assert merged["train_batch_size"] == 128
    assert merged["gradient_accumulation_steps"] == 1
    assert merged["gradient_clipping"] == 1.0


@pytest.mark.parametrize(
    ("user", "named"),
    [
        ({"train_micro_batch_size_per_gpu": 32}, "train_micro_batch_size_per_gpu=32"),
        ({"train_batch_size": 512}, "train_batch_size=512"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
        ({"gradient_clipping": 0.5}, "gradient_clipping=0.5"),
        ({"optimizer": {"type": "AdamW"}}, "'optimizer' is set by the platform"),
        ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' is set by the platform"),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
    ],
)
def test_a_key_that_contradicts_the_platform_is_an_error_naming_file_and_key(user, named):
    with pytest.raises(ConfigError, match="my-ds.json") as err:
        merge_user_config(user, PLATFORM, world_size=2, source="my-ds.json")
    assert named in str(err.value)


def test_a_missing_or_malformed_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_user_config(str(tmp_path / "nope.json"), PLATFORM, 1)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(line 2"):
        read_user_config(str(bad), PLATFORM, 1)


def test_the_job_config_names_the_file_and_gets_the_merged_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": False}}))
    cfg = load_config(
        PretrainConfig,
        None,
        [f"distributed.deepspeed_config={path}", "data.batch_size=16", "optim.grad_clip=2.0"],
    )
    merged = deepspeed_config(cfg)
    assert merged["zero_optimization"] == {"stage": 1, "overlap_comm": False}
    assert merged["train_micro_batch_size_per_gpu"] == 16
    assert merged["train_batch_size"] == 16 * cfg.distributed.num_workers
    assert merged["gradient_clipping"] == 2.0
