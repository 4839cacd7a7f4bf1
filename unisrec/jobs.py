"""The platform's jobs and the typed config each reads: the one list the CLI, ``config
show`` and ``unisrec submit`` share. Classes are named, not imported, so reading this list
imports nothing heavy."""

from __future__ import annotations

import importlib

# job name -> "module:ConfigClass"
JOB_CONFIGS = {
    "shard": "sharding.config:ShardJobConfig",
    "pretrain": "pretrain.config:PretrainConfig",
    "finetune": "adaptors.config:FinetuneConfig",
    "demo": "recipes.demo:DemoConfig",
    "experiment": "experiments.config:ExperimentConfig",
}


def config_class(job: str) -> type:
    """The config dataclass of ``job`` (a key of :data:`JOB_CONFIGS`)."""
    module, _, name = JOB_CONFIGS[job].partition(":")
    return getattr(importlib.import_module(module), name)
