"""Named DeepSpeed configurations: a ZeRO stage and a precision.

==============  =====  =========  ================================================
name            ZeRO   precision  when
==============  =====  =========  ================================================
``zero0``       0      fp32       plain data parallel (same result as DDP)
``zero1``       1      fp32       optimizer state sharded across workers
``zero2``       2      fp32       + gradients sharded: the pretraining default
``zero3``       3      fp32       + parameters sharded
``zeroN-bf16``  N      bf16       GPUs with bf16 (A10G, A100, H100); CPUs also run it
==============  =====  =========  ================================================

A preset is :func:`deepspeed_config` of its ``(stage, precision)``; ``pretrain.distributed``
names the same two settings as ``zero_stage`` and ``precision``. A user's own DeepSpeed JSON
(``distributed.deepspeed_config``) is merged over the preset by :func:`merge_user_config`. ``zero0-bf16`` steps through
DeepSpeed's non-ZeRO bf16 optimizer and drifts a little from ``zero1-bf16`` and up, which
agree with each other; prefer those.

What no preset offers, and why:

* no optimizer or scheduler section: the pretraining loop passes client torch objects, and
  a DeepSpeed-config optimizer JIT-builds ``fused_adam`` on first use (over a minute);
* no CPU offload: ZeRO-Offload wants ``DeepSpeedCPUAdam`` rather than a client optimizer, and
  the UniSRec backbone (a few million parameters) fits any GPU many times over;
* no fp16: it needs loss scaling, and DeepSpeed refuses it on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from unisrec.errors import ConfigError

Precision = Literal["fp32", "bf16"]

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
PRESETS: dict[str, tuple[int, Precision]] = {
    f"zero{stage}" + ("" if precision == "fp32" else f"-{precision}"): (stage, precision)
    for precision in PRECISIONS
    for stage in ZERO_STAGES
}
# DeepSpeed logs a line every `steps_per_print` steps; the job reports its own metrics.
_NEVER = 10**9


def deepspeed_config(
    zero_stage: int,
    precision: Precision,
    micro_batch: int,
    grad_clip: float = 0.0,
    grad_accumulation: int = 1,
) -> dict:
    """The DeepSpeed config dict for one worker.

    ``micro_batch`` is sequences per worker per forward pass; the global batch is
    ``micro_batch x grad_accumulation x workers``. ``grad_clip`` > 0 clips the global
    gradient norm (0 disables it).
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage: must be one of {ZERO_STAGES}, got {zero_stage}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS}, got {precision!r}")
    if micro_batch < 1 or grad_accumulation < 1:
        raise ValueError(
            f"micro_batch and grad_accumulation must be >= 1, got {micro_batch}, {grad_accumulation}"
        )
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accumulation,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        # Always explicit: DeepSpeed clips at 1.0 when the key is absent.
        "gradient_clipping": grad_clip,
    }
    return config


def preset(name: str, micro_batch: int, grad_clip: float = 0.0) -> dict:
    """The DeepSpeed config of preset ``name`` (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown DeepSpeed preset {name!r}; known: {', '.join(PRESETS)}")
    stage, precision = PRESETS[name]
    return deepspeed_config(stage, precision, micro_batch, grad_clip)


def preset_overrides(name: str) -> list[str]:
    """The pretrain config overrides that select preset ``name``, e.g. for ``unisrec submit``."""
    if name not in PRESETS:
        raise ValueError(f"unknown DeepSpeed preset {name!r}; known: {', '.join(PRESETS)}")
    stage, precision = PRESETS[name]
    return [f"distributed.zero_stage={stage}", f"distributed.precision={precision}"]


# Keys the platform sets from its own config: a user file may repeat them only with the same
# value. Batch sizes follow data.batch_size (the loop steps once per batch, so no gradient
# accumulation); clipping follows optim.grad_clip.
PLATFORM_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)
# Sections the loop owns as client objects (a config optimizer also JIT-builds fused_adam).
CLIENT_SECTIONS = {
    "optimizer": "optim.lr / optim.weight_decay (the loop passes a torch AdamW)",
    "scheduler": "optim.warmup_steps (the loop passes a torch LambdaLR)",
}


def merge_user_config(user: dict, platform: dict, world_size: int, source: str) -> dict:
    """A user's DeepSpeed config merged with the one the platform must run.

    user: the parsed JSON of ``source``; platform: :func:`deepspeed_config` of the job's
    settings. The result is the user's config with the platform's batch sizes and clipping
    (``train_batch_size`` = micro batch x workers). The user's ``zero_optimization`` and
    ``bf16`` win over the preset's stage and precision (its other sections, e.g. ZeRO
    bucket sizes, overlap_comm, activation checkpointing, pass through). A key that
    contradicts the platform is a :class:`ConfigError` naming the file and the key.
    """
    if not isinstance(user, dict):
        raise ConfigError(f"{source}: a DeepSpeed config must be a JSON object")
    for section, instead in CLIENT_SECTIONS.items():
        if section in user:
            raise ConfigError(f"{source}: {section!r} is set by the platform; use {instead}")
    expected = {key: platform[key] for key in PLATFORM_KEYS if key in platform}
    expected["train_batch_size"] = platform["train_micro_batch_size_per_gpu"] * world_size
    for key, value in expected.items():
        if key in user and user[key] != value:
            raise ConfigError(
                f"{source}: {key}={user[key]!r} contradicts the platform's {value!r} "
                "(set by data.batch_size x workers and optim.grad_clip; drop it from the file)"
            )
    merged = {**platform, **user, **expected}
    merged["zero_optimization"] = {
        **platform["zero_optimization"],
        **user.get("zero_optimization", {}),
    }
    stage = merged["zero_optimization"].get("stage")
    if stage not in ZERO_STAGES:
        raise ConfigError(f"{source}: zero_optimization.stage must be one of {ZERO_STAGES}")
    return merged


def read_user_config(path: str, platform: dict, world_size: int) -> dict:
    """:func:`merge_user_config` of the JSON file at ``path``; a missing or malformed file
    is a :class:`ConfigError` naming it."""
    file = Path(path)
    try:
        user = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: no such file {file}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON (line {err.lineno}: {err.msg})") from None
    return merge_user_config(user, platform, world_size, str(file))
