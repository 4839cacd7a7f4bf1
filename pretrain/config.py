"""Configuration of the pretraining job (``unisrec pretrain CONFIG.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pretrain.model import BackboneConfig
from unisrec import tags
from unisrec.config import check_range
from unisrec.errors import ConfigError


@dataclass
class PretrainDataConfig:
    dir: str = "runs/data"  # dataset directory written by `unisrec shard`
    shard_base: str = ""  # read shards from here instead (URL prefix or "pipe:..." prefix)
    batch_size: int = 256  # sequences per worker per step (global batch = batch_size x workers)
    loader_workers: int = 1  # DataLoader processes per worker reading shards
    shuffle_buffer: int = 2000
    # Sort every this many batches' samples by length into batches, then shuffle the batches:
    # a batch pads to its longest window, and domains' windows differ in length (0/1 = off).
    bucket_batches: int = 16
    # Pretrain on these pretraining domains of the shards only ([] = all), e.g. [office]
    # for the paper's Figure 2; held-out losses follow the same choice.
    domains: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_range("batch_size", self.batch_size, 1)
        check_range("loader_workers", self.loader_workers, 0)
        check_range("shuffle_buffer", self.shuffle_buffer, 0)
        check_range("bucket_batches", self.bucket_batches, 0)


@dataclass
class LossConfig:
    temperature: float = 0.07
    lam: float = 1e-3  # L = L_seq-item + lam * L_seq-seq
    item_drop_batch_prob: float = 0.9  # per batch: item drop with this p, else word drop
    item_keep_prob: float = 0.8  # item drop keeps each item (always the first) with this p
    word_drop_position_prob: float = 0.2  # word drop: a position takes its word-drop vector
    seq_item: bool = True  # false: L = L_seq-seq alone (lam unused), the paper's "w/o S-I"
    seq_seq: bool = True  # false: L = L_seq-item alone, no augmented pass ("w/o S-S")

    @property
    def seq_seq_weight(self) -> float:
        """The weight of mean L_seq-seq in the loss: lam, 1 without L_seq-item, 0 if off."""
        if not self.seq_seq:
            return 0.0
        return self.lam if self.seq_item else 1.0

    def validate(self) -> None:
        if not (self.seq_item or self.seq_seq):
            raise ConfigError("seq_item, seq_seq: switch at most one of the two losses off")
        check_range("temperature", self.temperature, 0, low_open=True)
        check_range("lam", self.lam, 0)
        for key in ("item_drop_batch_prob", "item_keep_prob", "word_drop_position_prob"):
            check_range(key, getattr(self, key), 0, 1)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables
    epochs: int = 10
    max_steps: int = 0  # stop after this many steps (0 = run all epochs)
    # stop at an epoch end whose held-out loss is less than this fraction below the previous
    # epoch end's (0 = run all epochs; needs held-out shards)
    min_heldout_gain: float = 0.0

    def validate(self) -> None:
        check_range("lr", self.lr, 0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("grad_clip", self.grad_clip, 0)
        check_range("epochs", self.epochs, 1)
        check_range("max_steps", self.max_steps, 0)
        check_range("min_heldout_gain", self.min_heldout_gain, 0, 1)


@dataclass
class DistributedConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 on GPUs; fp16 is not offered
    checkpoint_every: int = 50  # steps between checkpoints (also at each epoch end)
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts after a failure (-1: no limit)
    # A DeepSpeed JSON of your own, merged over the zero_stage/precision preset: its ZeRO
    # section and bf16 win; batch sizes and clipping stay the platform's (docs/operations.md).
    deepspeed_config: str = ""
    ray_address: str = ""  # "" = $RAY_ADDRESS or a local loopback Ray
    storage_path: str = ""  # Ray Train storage (checkpoints); "" = <output_dir>/ray

    def validate(self) -> None:
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage: must be 0..3, got {self.zero_stage}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: must be >= 1, got {self.num_workers}")
        check_range("cpus_per_worker", self.cpus_per_worker, 1)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        check_range("keep_checkpoints", self.keep_checkpoints, 1)
        check_range("max_failures", self.max_failures, -1)  # -1 = retry for ever (Ray's meaning)


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "unisrec-pretrain"
    registered_model: str = tags.BACKBONE_MODEL
    alias: str = "current"  # MLflow reserves "latest" (models:/NAME/latest = newest version)


@dataclass
class FaultInjection:
    """For tests of recovery: the rank's process exits once at this step (0 = never)."""

    kill_rank: int = 0  # the rank that exits (or stalls)
    kill_at_step: int = 0
    # the rank stops responding once at this step, as on a lost node, until its process is
    # ended (a node drill removes its node); it writes its node id to a marker first (0 = never)
    stall_at_step: int = 0


@dataclass
class InitConfig:
    """Where the weights start: random (seeded) or a registered backbone's."""

    # Continue pretraining from this backbone (models:/NAME@ALIAS or models:/NAME/VERSION):
    # its Transformer and adaptor weights; the optimizer starts fresh. Its text encoder,
    # vector size and model shape must match this config's (checked before Ray starts).
    backbone: str = ""


@dataclass
class PretrainConfig:
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: BackboneConfig = field(default_factory=BackboneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    fault: FaultInjection = field(default_factory=FaultInjection)
    init: InitConfig = field(default_factory=InitConfig)
    output_dir: str = "runs/pretrain"
    seed: int = 42
    log_every: int = 10  # steps between metric reports
    # Held-out loss (the shard job's heldout-<domain>.tar, if any) at every epoch end and
    # also every this many steps (0 = epoch ends only). The registered backbone is the
    # checkpoint with the lowest held-out loss.
    heldout_every: int = 0

    def validate(self) -> None:
        check_range("log_every", self.log_every, 1)
