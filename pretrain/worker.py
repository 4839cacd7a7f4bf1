"""The per-worker pretraining loop that Ray Train runs on every worker.

1. read the dataset's text vectors and this rank's share of the shards
2. build the UniSRec model (seeded, or a parent backbone's weights with ``init.backbone``)
   and wrap it with DeepSpeed (ZeRO stage from the config)
3. resume from the last checkpoint Ray hands back, if any; a continued backbone's held-out
   loss is taken once before its first step
4. train: every prefix of every sequence in one causal pass; negatives gathered from all
   workers with autograd
5. rank 0 logs metrics to MLflow; every rank checkpoints through ``ray.train.report``
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.checkpoint_files import NO_HELDOUT_SCORE, disk_full
from pretrain.config import PretrainConfig
from pretrain.consolidate import DS_TAG
from unisrec.config import from_dict
from unisrec.errors import StorageError

STATE_FILE = "train_state.json"


def deepspeed_config(cfg: PretrainConfig) -> dict:
    """The DeepSpeed config for ``cfg`` (optimizer and scheduler are client objects): the
    preset of ``distributed.zero_stage``/``precision``, with the user's own JSON
    (``distributed.deepspeed_config``) merged over it when one is named."""
    from pretrain.deepspeed_presets import deepspeed_config as preset_config
    from pretrain.deepspeed_presets import read_user_config

    platform = preset_config(
        cfg.distributed.zero_stage,
        cfg.distributed.precision,
        cfg.data.batch_size,
        cfg.optim.grad_clip,
    )
    if not cfg.distributed.deepspeed_config:
        return platform
    return read_user_config(cfg.distributed.deepspeed_config, platform, cfg.distributed.num_workers)


def progress_line(
    step: int, total: int, epoch: int, loss: float, samples_per_s: float, seconds_per_step: float
) -> str:
    """Rank 0's progress line, e.g. ``step 40/232 (17%) epoch 1 loss 3.2101 61.2 seq/s ETA 3m12s``."""
    eta = max(total - step, 0) * seconds_per_step
    minutes, seconds = divmod(round(eta), 60)
    return (
        f"step {step}/{total} ({100 * step / max(total, 1):.0f}%) epoch {epoch} loss {loss:.4f} "
        f"{samples_per_s:.1f} seq/s ETA {minutes}m{seconds:02d}s"
    )


def train_loop_per_worker(loop_config: dict) -> None:
    from unisrec.runtime import cpu_deepspeed, quiet_train_worker

    quiet_train_worker()  # unless -v: our progress line, not Ray's per-report messages
    cpu_deepspeed()
    import ray.train

    from pretrain.gather import Gather
    from pretrain.heldout import heldout_losses
    from sharding.dataset import Dataset

    cfg = from_dict(PretrainConfig, loop_config["cfg"])
    run_id = loop_config.get("mlflow_run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = (
        torch.device("cuda", ctx.get_local_rank())
        if cfg.distributed.use_gpu
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # 1. Data: text vectors by global item index, and this rank's stream of shards.
    dataset = Dataset(cfg.data.dir)
    stream = _shard_stream(cfg, dataset, rank, world)
    heldout = dataset.heldout_specs(cfg.data.shard_base or None, cfg.data.domains)  # {} = none

    # 2. Model: the same seeded initialisation on every rank (or the parent backbone's
    # weights, written by the driver), then DeepSpeed.
    engine, scheduler = _build_engine(cfg, dataset.encoder_dim, loop_config)
    param_dtype = next(engine.module.parameters()).dtype
    tables = tuple(
        torch.from_numpy(dataset.global_embeddings(worddrop=w)).to(device, param_dtype)
        for w in (False, True)
    )  # the items' text vectors and their word-dropped ones
    gather = Gather.from_dist()

    # 3. Resume: DeepSpeed state, sample accounting and this rank's RNG state.
    state = _restore(engine, loop_config, world, rank)
    state["started_at_step"] = state["step"]  # > 0: this worker group continued a checkpoint
    logger = _MetricLogger(cfg.mlflow.tracking_uri, run_id) if rank == 0 and run_id else None
    if heldout and loop_config.get("init_state") and "initial_heldout" not in state:
        # Where a continued backbone starts on this run's held-out users, logged at step 0.
        state["initial_heldout"] = heldout_losses(engine, heldout, *tables, cfg, gather, device)
        if logger:
            logger.log(state["initial_heldout"], 0, "heldout")
    total_steps = _total_steps(cfg, stream)

    # 4. Train: a step, its metrics, the held-out loss where due, a checkpoint where due.
    engine.train()
    meter = _WindowMeter()
    progress = _Progress(rank, total_steps, state["step"])
    metrics: dict = {}
    while state["step"] < total_steps and not state.get("plateau"):
        epoch_length = stream.batches_in_epoch(state["epoch"])
        for batch_index, batch in enumerate(stream.epoch(state["epoch"])):
            if batch_index < state["batch_in_epoch"]:
                continue  # trained before the restart
            _inject_faults(cfg, rank, state["step"])
            batch = {k: v.to(device) for k, v in batch.items()}
            _train_step(engine, batch, tables, cfg, state, meter, gather)
            state["batch_in_epoch"] = batch_index + 1

            done = state["step"] >= total_steps
            if state["step"] % cfg.log_every == 0 or done:
                metrics = {
                    **meter.report(cfg.loss.seq_seq_weight),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_seen": state["samples_seen"],
                    "epoch": state["epoch"],
                }
                if logger:
                    logger.log(metrics, state["step"])
                progress.show(state, metrics)
            end_of_epoch = state["batch_in_epoch"] == epoch_length
            score = NO_HELDOUT_SCORE  # checkpoints without a held-out loss rank last
            every = cfg.heldout_every and state["step"] % cfg.heldout_every == 0
            if heldout and (done or end_of_epoch or every):
                held = heldout_losses(engine, heldout, *tables, cfg, gather, device)
                engine.train()
                score = held["heldout_loss"]
                plateau = _record_heldout(state, held, epoch_length, end_of_epoch, cfg, logger)
                done = done or plateau
            if (
                done
                or end_of_epoch
                or score != NO_HELDOUT_SCORE
                or state["step"] % cfg.distributed.checkpoint_every == 0
            ):
                _save_and_report(
                    engine, state, rank, {**metrics, "heldout_score": score}, final=done,
                    storage=loop_config.get("storage", ""),
                )  # fmt: skip
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0


def _shard_stream(cfg: PretrainConfig, dataset, rank: int, world: int):
    from sharding.stream import ShardStream

    return ShardStream(
        dataset.shard_specs(cfg.data.shard_base or None, cfg.data.domains),
        batch_size=cfg.data.batch_size,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.loader_workers,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        bucket_batches=cfg.data.bucket_batches,
    )


def _build_engine(cfg: PretrainConfig, text_dim: int, loop_config: dict):
    """The UniSRec model (seeded, or the parent backbone's weights when the driver wrote
    them), AdamW with linear warm-up, wrapped by DeepSpeed. Returns (engine, scheduler)."""
    import deepspeed  # imported here: importing it in the Ray driver can break the controller

    from pretrain.model import UniSRec
    from unisrec.runtime import library_output

    torch.manual_seed(cfg.seed)
    model = UniSRec(cfg.model, text_dim=text_dim)
    if loop_config.get("init_state"):
        model.load_state_dict(torch.load(loop_config["init_state"], map_location="cpu"))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    warmup = max(cfg.optim.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    with library_output():  # DeepSpeed prints its communication op's build
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=loop_config.get("deepspeed") or deepspeed_config(cfg),
        )
    return engine, scheduler


def _restore(engine, loop_config: dict, world: int, rank: int) -> dict:
    """The training state to go on from: the checkpoint Ray hands back (or the one the
    driver found when Ray lost its list), loaded into ``engine`` with this rank's RNG state;
    a fresh state without one."""
    import ray.train

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "samples_seen": 0, "tokens_seen": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):  # Ray lost its list (job.py)
        checkpoint = ray.train.Checkpoint.from_directory(loop_config["resume_from"])
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt_dir = _whole_checkpoint(Path(ckpt_dir), world, rank)
            engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG)
            state = json.loads((ckpt_dir / STATE_FILE).read_text())
            rng_file = ckpt_dir / f"rng_rank{rank}.pt"
            if rng_file.exists():
                torch.set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _train_step(
    engine, batch: dict, tables: tuple, cfg: PretrainConfig, state: dict, meter, gather
):
    """One optimizer step on this rank's part of the global batch; the step and sample
    counts (over all ranks; filler rows have length 0) go into ``state`` and ``meter``."""
    from pretrain.losses import pretrain_loss

    out = pretrain_loss(
        engine, batch, *tables, cfg.loss, step=state["step"], seed=cfg.seed, gather=gather
    )
    engine.backward(out["loss"])
    engine.step()
    counts = torch.stack([(batch["lengths"] > 0).sum(), batch["lengths"].sum()]).double()
    counts = gather.all_reduce_sum(counts)
    state["step"] += 1
    state["samples_seen"] += int(counts[0])
    state["tokens_seen"] += int(counts[1])
    meter.add(int(counts[0]), int(counts[1]), out["queries"], out["seq_item"], out["seq_seq"])


def _record_heldout(
    state: dict, held: dict, epoch_length: int, end_of_epoch: bool, cfg: PretrainConfig, logger
) -> bool:
    """Keep the best held-out record in ``state``, log it; True when an epoch end shows the
    plateau (``optim.min_heldout_gain``): every rank decides alike, from the same losses."""
    score = held["heldout_loss"]
    epochs_done = state["epoch"] + state["batch_in_epoch"] / epoch_length
    best = state.get("best")
    if best is None or score < best["heldout_loss"]:
        state["best"] = {"step": state["step"], "epoch": epochs_done, **held}
    if logger:
        logger.log({**held, "heldout_epoch": epochs_done}, state["step"], "heldout")
    plateau = end_of_epoch and _plateaued(state, score, cfg.optim.min_heldout_gain)
    if plateau:
        state["plateau"] = True
    if end_of_epoch:
        state["epoch_heldout"] = score
    return plateau


def _inject_faults(cfg: PretrainConfig, rank: int, step: int) -> None:
    """The recovery tests' faults (``fault.*``): this rank exits or stalls at a step."""
    if rank != cfg.fault.kill_rank:
        return
    if cfg.fault.kill_at_step and cfg.fault.kill_at_step == step:
        _die_once(cfg, rank)
    if cfg.fault.stall_at_step == step > 0:
        _stall_once(cfg, rank)


class _Progress:
    """Rank 0's progress line every logged step (see :func:`progress_line`)."""

    def __init__(self, rank: int, total_steps: int, first_step: int):
        self.rank, self.total, self.first = rank, total_steps, first_step
        self.started = time.perf_counter()

    def show(self, state: dict, metrics: dict) -> None:
        if self.rank != 0:
            return
        per_step = (time.perf_counter() - self.started) / max(state["step"] - self.first, 1)
        line = progress_line(
            state["step"], self.total, state["epoch"], metrics["loss"],
            metrics["sequences_per_second"], per_step,
        )  # fmt: skip
        sys.stdout.write(line + "\n")  # not print: Ray Train's patch echoes it twice
        sys.stdout.flush()


class _WindowMeter:
    """Mean losses; sequences, non-padding tokens and next-item targets (seq-item queries, all
    ranks) per second since the last report.

    Losses are averaged over the window's steps: one step's loss is noisy, and an epoch's
    last, partly filled batch has fewer negatives and so a lower loss.
    """

    def __init__(self):
        self.start, self.sequences, self.tokens, self.targets = time.perf_counter(), 0, 0, 0
        self.steps, self.seq_item, self.seq_seq = 0, 0.0, 0.0

    def add(
        self, sequences: int, tokens: int, targets: int, seq_item: float, seq_seq: float
    ) -> None:
        self.sequences += sequences
        self.tokens += tokens
        self.targets += targets
        self.steps += 1
        self.seq_item += seq_item
        self.seq_seq += seq_seq

    def report(self, ss_weight: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        out = {
            "loss": (self.seq_item + ss_weight * self.seq_seq) / steps,
            "loss_seq_item": self.seq_item / steps,
            "loss_seq_seq": self.seq_seq / steps,
            "sequences_per_second": self.sequences / elapsed,
            "tokens_per_second": self.tokens / elapsed,
            "targets_per_second": self.targets / elapsed,
        }
        self.__init__()
        return out


def _total_steps(cfg: PretrainConfig, stream) -> int:
    per_epoch = [stream.batches_in_epoch(e) for e in range(cfg.optim.epochs)]
    total = sum(per_epoch)
    return min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total


def _whole_checkpoint(directory: Path, world: int, rank: int) -> Path:
    """``directory`` when whole, else the newest whole checkpoint before it (named in the log)."""
    from pretrain.checkpoint_files import incomplete_reason, newest_whole_checkpoint, step_of

    reason = incomplete_reason(directory, world)
    if reason is None:
        return directory
    older = newest_whole_checkpoint(directory.parent, world, before_step=step_of(directory))
    if older is None:
        raise StorageError(
            f"{directory}: checkpoint incomplete ({reason}) and no whole one before it"
        )
    if rank == 0:
        sys.stdout.write(
            f"checkpoint {directory} is incomplete ({reason}); resuming from {older.name}\n"
        )
        sys.stdout.flush()
    return older


def _plateaued(state: dict, heldout_loss: float, min_gain: float) -> bool:
    """True when this epoch's held-out loss is less than ``min_gain`` (a fraction) below the
    previous epoch's; never before a previous epoch's loss exists or with ``min_gain`` 0."""
    previous = state.get("epoch_heldout")
    return min_gain > 0 and previous is not None and heldout_loss > previous * (1 - min_gain)


def _save_and_report(
    engine, state: dict, rank: int, metrics: dict, final: bool, storage: str = ""
) -> None:
    """Every rank writes its DeepSpeed shard and reports it; Ray merges them into one
    checkpoint directory named after the step (under ``storage``).

    A full disk is a :class:`StorageError` naming where: it would fail again on every
    restart, and the last complete checkpoint stays the one a resume starts from (Ray
    registers a checkpoint only when every rank's part of it is written).
    """
    import ray.train

    from pretrain.checkpoint_files import write_file_list

    name = f"step_{state['step']:07d}"
    with tempfile.TemporaryDirectory() as tmp:
        where = tmp
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"unisrec_state": dict(state)})
            torch.save(torch.get_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            write_file_list(tmp, rank)  # lets a resume tell a whole checkpoint from a cut one
            where = f"{storage}/{name}" if storage else name
            ray.train.report(
                {**metrics, "step": state["step"], "final": final},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        except OSError as err:
            if not disk_full(err):
                raise
            raise StorageError(
                f"{where}: no space left on device writing the step {state['step']} checkpoint "
                f"(rank {rank}); free space and run again with --resume: it continues from "
                "the last complete checkpoint"
            ) from None


def _die_once(cfg: PretrainConfig, rank: int) -> None:
    marker = Path(cfg.output_dir).resolve() / f".killed-rank{rank}-step{cfg.fault.kill_at_step}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)


def _stall_once(cfg: PretrainConfig, rank: int) -> None:
    """Write this node's id to a marker, then hang (the first time only)."""
    import ray

    marker = Path(cfg.output_dir).resolve() / f".stalled-rank{rank}-step{cfg.fault.stall_at_step}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.tmp")
        tmp.write_text(ray.get_runtime_context().get_node_id())
        tmp.replace(marker)  # whole, for whoever watches for it
        while True:
            time.sleep(60)


class _MetricLogger:
    """Rank 0's per-step metrics straight into the driver's MLflow run, each step once.

    Metric groups (training metrics, held-out losses) are logged at the same steps, so each
    group remembers its own last step (named by its first metric's history)."""

    GROUPS = {"train": "loss", "heldout": "heldout_loss"}

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        # After a restart the steps since the last checkpoint run again: log each step once.
        self.last_step = {
            group: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
            for group, key in self.GROUPS.items()
        }

    def log(self, metrics: dict, step: int, group: str = "train") -> None:
        from mlflow.entities import Metric

        if step <= self.last_step[group]:
            return
        self.last_step[group] = step
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )
