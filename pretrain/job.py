"""The pretraining job (``unisrec pretrain CONFIG.yaml``), run from the driver.

1. open an MLflow run: the whole config as params, the dataset manifest as an input, git commit;
   with ``init.backbone`` the parent backbone's weights (checked against the config) and its
   lineage (tags, a model input of the run)
2. Ray Train ``TorchTrainer`` runs :func:`pretrain.worker.train_loop_per_worker` on N workers
   (restarted from the last checkpoint on failure; ``--resume`` continues a stopped run)
3. consolidate the checkpoint with the lowest held-out loss (the final one when the dataset
   holds nothing out) into one fp32 backbone
4. register it (lineage tags, which checkpoint, alias) and write ``summary.json``
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from pretrain.config import PretrainConfig
from sharding.dataset import Dataset, log_mlflow_input
from unisrec import tags
from unisrec.config import to_dict
from unisrec.tracking import (
    config_hash,
    config_params,
    configure_mlflow,
    git_commit,
    logged_model_id,
    set_experiment,
)

log = logging.getLogger(__name__)
RUN_STATE = "run.json"


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Pretrain, register the backbone, return the summary (also written to summary.json).

    The MLflow run ends FINISHED only when all of it succeeded: FAILED on an error, KILLED on
    Ctrl-C (``--resume`` continues either).
    """
    from pretrain.output_lock import OutputDirLock

    opened: dict[str, str] = {}
    try:
        # Held for the whole job, before anything in output_dir is read or written.
        with OutputDirLock(cfg.output_dir) as lock:
            return _run_pretrain(cfg, resume, opened, lock)
    except BaseException as err:
        if "run_id" in opened:
            from mlflow.tracking import MlflowClient

            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            try:
                MlflowClient(opened["tracking_uri"]).set_terminated(opened["run_id"], status)
            except Exception as mark_err:  # the original error matters more
                log.warning("could not mark run %s %s: %s", opened["run_id"], status, mark_err)
        raise


def _run_pretrain(cfg: PretrainConfig, resume: bool, opened: dict[str, str], lock) -> dict:
    from pretrain.worker import deepspeed_config
    from unisrec.runtime import ensure_ray

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(
        cfg,
        output_dir=str(out),
        data=dataclasses.replace(cfg.data, dir=str(Path(cfg.data.dir).resolve())),
        mlflow=dataclasses.replace(
            cfg.mlflow, tracking_uri=configure_mlflow(cfg.mlflow.tracking_uri)
        ),
    )
    dataset = Dataset(cfg.data.dir)
    dataset.shard_specs(cfg.data.shard_base or None, cfg.data.domains)  # fail here, not in workers
    ds_config = deepspeed_config(cfg)  # a user's DeepSpeed file is read (and checked) here
    dataset.check_shards(cfg.data.shard_base or None)  # a truncated shard: named, before Ray

    # 1. The MLflow run (the same one again on --resume), and the parent backbone, if any.
    previous = _read_run_state(out) if resume else None
    if resume and previous is None:
        raise FileNotFoundError(f"--resume: no earlier run in {out} ({RUN_STATE} missing)")
    parent = (previous or {}).get("parent") or _write_parent(cfg, dataset, out)
    run_id, run_name = _open_run(cfg, dataset, ds_config, previous, parent)
    (out / RUN_STATE).write_text(
        json.dumps({"run_id": run_id, "ray_run_name": run_name, "parent": parent})
    )
    opened.update(run_id=run_id, tracking_uri=cfg.mlflow.tracking_uri)
    lock.describe(run_id=run_id)

    # 2. Ray Train: N DeepSpeed workers; a failed worker restarts the group from the last checkpoint.
    ensure_ray(cfg.distributed.ray_address)
    storage = Path(cfg.distributed.storage_path or out / "ray").resolve()
    loop_config = {
        "cfg": to_dict(cfg),
        "mlflow_run_id": run_id,
        "deepspeed": ds_config,
        "storage": str(storage / run_name),
        "init_state": parent["state_file"] if parent else "",
    }
    scored = bool(dataset.heldout_specs(cfg.data.shard_base or None, cfg.data.domains))

    def make_trainer():
        resume_from = _set_aside_unreadable_run_state(
            storage / run_name, cfg.distributed.num_workers
        )
        return _trainer(cfg, {**loop_config, "resume_from": resume_from}, storage, run_name, scored)

    started = time.perf_counter()
    result = _fit_with_restarts(make_trainer, cfg.distributed.max_failures, storage / run_name)
    wall = time.perf_counter() - started
    # A run resumed after its last step (cut off while registering, say) trains and reports
    # nothing new: its final checkpoint is the newest whole one on disk.
    final = result.checkpoint or _newest_whole(storage / run_name, cfg.distributed.num_workers)
    if final is None:
        raise RuntimeError("pretraining finished without a checkpoint")

    # 3. One fp32 backbone from the best (possibly ZeRO-partitioned) checkpoint.
    chosen = _best_checkpoint(result, cfg.distributed.num_workers) or final
    model, chosen_state = _consolidate(chosen, cfg, dataset.encoder_dim)
    final_metrics = {**_train_state(final), **_last_losses(run_id)}
    best = final_metrics.get("best")  # the held-out record of the chosen checkpoint
    chosen_tags = {
        tags.CHECKPOINT_STEP: str(chosen_state.get("step")),
        tags.CHECKPOINT_EPOCH: f"{best['epoch']:.3f}" if best else str(chosen_state.get("epoch")),
        tags.HELDOUT_LOSS: f"{best['heldout_loss']:.6f}" if best else "none",
        **(_parent_tags(parent) if parent else {}),
    }

    # 4. Register with lineage, then the summary.
    from pretrain.registry import register_backbone

    version = register_backbone(
        model,
        run_id=run_id,
        name=cfg.mlflow.registered_model,
        alias=cfg.mlflow.alias,
        data_digest=dataset.digest,
        encoder=dataset.encoder_name,
        encoder_dim=dataset.encoder_dim,
        config_hash=config_hash(cfg),
        extra_tags=chosen_tags,
    )
    summary = {
        "run_id": run_id,
        "registered_model": cfg.mlflow.registered_model,
        "model_version": version,
        "model_uri": f"models:/{cfg.mlflow.registered_model}@{cfg.mlflow.alias}",
        "tracking_uri": cfg.mlflow.tracking_uri,
        **_run_figures(run_id, final_metrics, wall),
        "checkpoint": final.path,
        "registered_checkpoint": chosen.path,
        "registered_step": chosen_state.get("step"),
        "best_heldout": best,  # step, epoch, heldout_loss (+ per domain) of the registered one
        # the parent backbone's held-out losses on this run's data, before any step
        "initial_heldout": final_metrics.get("initial_heldout"),
        "parent_backbone": f"{parent['name']}/{parent['version']}" if parent else None,
        "heldout_history": _metric_history(run_id, "heldout_loss"),
        "num_workers": cfg.distributed.num_workers,
        "zero_stage": ds_config["zero_optimization"]["stage"],
    }
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("wall_seconds", wall)
        mlflow.log_dict(summary, "summary.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot_loss(run_id, out / "pretrain_loss.png")
    return summary


def _open_run(
    cfg: PretrainConfig, dataset: Dataset, ds_config: dict, previous: dict | None, parent
) -> tuple[str, str]:
    """Start the MLflow run (or reopen ``previous``'s on --resume): config as params, the
    dataset as an input, commit and lineage tags. Returns (run id, Ray run name); the run
    stays RUNNING until the job finishes, fails or is killed."""
    import mlflow
    from mlflow.tracking import MlflowClient

    set_experiment(cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
    run_name = (
        previous["ray_run_name"] if previous else f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    with mlflow.start_run(
        run_id=previous["run_id"] if previous else None, run_name=run_name
    ) as run:
        if not previous:
            mlflow.log_params(config_params(cfg))
            mlflow.set_tags(
                {
                    "git_commit": git_commit(),
                    tags.KIND: "pretrain",
                    tags.DATA_DIGEST: dataset.digest,
                }
            )
            log_mlflow_input(dataset, context="pretraining")
            mlflow.log_dict(dataset.manifest, "dataset_manifest.json")
            mlflow.log_dict(ds_config, "deepspeed_config.json")
            if parent:
                _log_parent(parent)
    MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id, run_name


def _trainer(cfg: PretrainConfig, loop_config: dict, storage: Path, run_name: str, scored: bool):
    """Ray Train's TorchTrainer over :func:`pretrain.worker.train_loop_per_worker`; Ray keeps
    the best checkpoints by held-out loss when ``scored`` (and always the latest one)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pretrain.worker import train_loop_per_worker
    from unisrec.runtime import verbose

    resources = {"CPU": cfg.distributed.cpus_per_worker}
    if cfg.distributed.use_gpu:
        resources["GPU"] = 1
    keep = {"checkpoint_score_attribute": "heldout_score", "checkpoint_score_order": "min"}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.distributed.num_workers,
            use_gpu=cfg.distributed.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            # Restarts are made by _fit_with_restarts, which knows which errors repeat.
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.distributed.keep_checkpoints, **(keep if scored else {})
            ),
            # Ray Train's per-step messages only with -v: rank 0 prints its own progress line.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "ERROR"),
        ),
    )


def _run_figures(run_id: str, final_metrics: dict, wall: float) -> dict:
    """The summary's progress and throughput figures (throughput: means over the logged
    windows, without Ray and DeepSpeed start-up)."""
    history = _metric_history(run_id)
    return {
        "steps": final_metrics.get("step"),
        "stopped_on_plateau": bool(final_metrics.get("plateau", False)),
        "resumed_from_step": final_metrics.get("started_at_step", 0),  # of the last start
        "samples_seen": final_metrics.get("samples_seen"),
        "wall_seconds": wall,
        "sequences_per_second": _mean_metric(run_id, "sequences_per_second"),
        "tokens_per_second": _mean_metric(run_id, "tokens_per_second"),
        "targets_per_second": _mean_metric(run_id, "targets_per_second"),
        "final_loss": final_metrics.get("loss"),
        "final_loss_seq_item": final_metrics.get("loss_seq_item"),
        "final_loss_seq_seq": final_metrics.get("loss_seq_seq"),
        "first_loss": history[0][1] if history else None,
    }


PARENT_STATE_FILE = "parent_backbone.pt"


def _write_parent(cfg: PretrainConfig, dataset: Dataset, out: Path) -> dict | None:
    """Resolve ``init.backbone`` to one version, check it fits the config and the dataset
    (:func:`pretrain.registry.parent_backbone`), and write its weights for the workers.

    Returns ``{"name", "version", "run_id", "model_id", "state_file"}`` (recorded in
    ``run.json``, so a resumed run keeps the same parent even if the alias moved), or None.
    """
    if not cfg.init.backbone:
        return None
    import torch

    from pretrain.registry import parent_backbone

    model, parent_tags = parent_backbone(
        cfg.init.backbone, cfg.model, dataset.encoder_name, dataset.encoder_dim
    )
    state_file = out / PARENT_STATE_FILE
    torch.save(model.state_dict(), state_file)
    from mlflow.tracking import MlflowClient

    version = MlflowClient().get_model_version(parent_tags["name"], parent_tags["version"])
    return {
        "name": parent_tags["name"],
        "version": parent_tags["version"],
        "run_id": parent_tags.get(tags.RUN_ID, version.run_id or ""),
        "model_id": logged_model_id(version) or "",
        "state_file": str(state_file),
    }


def _parent_tags(parent: dict) -> dict[str, str]:
    return {
        tags.PARENT_BACKBONE: f"{parent['name']}/{parent['version']}",
        tags.PARENT_RUN_ID: parent["run_id"],
    }


def _log_parent(parent: dict) -> None:
    """The parent backbone on the open run: its tags, and the parent's logged model as the
    run's model input (MLflow's lineage view)."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    mlflow.set_tags(_parent_tags(parent))
    if parent["model_id"]:
        mlflow.log_input(model=LoggedModelInput(model_id=parent["model_id"]))


def _set_aside_unreadable_run_state(run_dir: Path, workers: int) -> str:
    """Ray Train rewrites its list of a run's checkpoints in place, so a full disk can leave
    it empty or cut, and Ray then refuses to start the run again. Such a list is renamed
    ``*.unreadable`` and the newest whole checkpoint on disk is returned for the workers
    to resume from ("" when the list is fine or absent)."""
    from pretrain.checkpoint_files import newest_whole_checkpoint

    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train 2.x's name for it
    try:
        json.loads(snapshot.read_text())
        return ""
    except FileNotFoundError:
        return ""
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    snapshot.rename(snapshot.with_name(snapshot.name + ".unreadable"))
    whole = newest_whole_checkpoint(run_dir, workers)
    log.warning(
        "%s was unreadable (cut short by a full disk?); set aside; resuming from %s",
        snapshot, whole or "the start (no whole checkpoint on disk)",
    )  # fmt: skip
    return str(whole or "")


def _fit_with_restarts(make_trainer, max_failures: int, run_dir: Path):
    """``make_trainer().fit()``, started again from the last checkpoint after a worker failure,
    up to ``max_failures`` times (-1: no limit).

    A data or config error in a worker (a truncated shard, say) or a full disk would only
    repeat: it is raised at once as one line for the CLI, without using up a restart.
    """
    from ray.train import TrainingFailedError

    failures = 0
    while True:
        try:
            return make_trainer().fit()
        except TrainingFailedError as err:
            fatal = _deterministic_error(err, run_dir)
            if fatal is not None:
                raise fatal from None
            if 0 <= max_failures <= failures:
                raise
            failures += 1
            log.warning(
                "training failed (%s); restart %d of %s from the last checkpoint",
                str(err).strip().splitlines()[-1][:300],
                failures,
                max_failures if max_failures >= 0 else "unlimited",
            )


def _deterministic_error(err: Exception, run_dir: Path) -> Exception | None:
    """The first DataError, ConfigError or StorageError a worker raised, as one clean line;
    a StorageError when Ray's own writes (its checkpoint list) hit a full disk; else None."""
    from pretrain.checkpoint_files import disk_full
    from unisrec.errors import ConfigError, DataError, StorageError

    if disk_full(err) and not getattr(err, "worker_failures", None):
        return StorageError(
            f"{run_dir}: no space left on device while Ray Train recorded a checkpoint; free "
            "space and run again with --resume: it continues from the last whole checkpoint"
        )
    for failure in getattr(err, "worker_failures", {}).values():
        if isinstance(failure, (DataError, ConfigError, StorageError)):
            # Raised in a DataLoader process, the message is that process's whole traceback:
            # its last line is the error itself.
            last = str(failure).strip().splitlines()[-1] if str(failure).strip() else ""
            name = f"{type(failure).__module__}.{type(failure).__name__}: "
            return type(failure)(last.removeprefix(name))
    return None


def _newest_whole(run_dir: Path, workers: int):
    """The newest whole checkpoint directory of the run, as a Ray checkpoint (or None)."""
    from ray.train import Checkpoint

    from pretrain.checkpoint_files import newest_whole_checkpoint

    path = newest_whole_checkpoint(run_dir, workers)
    return Checkpoint.from_directory(str(path)) if path else None


def _best_checkpoint(result, workers: int):
    """The kept whole checkpoint with the lowest finite held-out loss, else the final one."""
    from pretrain.checkpoint_files import NO_HELDOUT_SCORE, incomplete_reason

    scored = [
        (metrics["heldout_score"], checkpoint)
        for checkpoint, metrics in (result.best_checkpoints or [])
        if metrics.get("heldout_score", NO_HELDOUT_SCORE) < NO_HELDOUT_SCORE
        and incomplete_reason(checkpoint.path, workers) is None
    ]
    return min(scored, key=lambda pair: pair[0])[1] if scored else result.checkpoint


def _train_state(checkpoint) -> dict:
    from pretrain.worker import STATE_FILE

    path = Path(checkpoint.path) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _consolidate(checkpoint, cfg: PretrainConfig, text_dim: int):
    """Merge the checkpoint in a Ray task (DeepSpeed stays out of the driver process)."""
    import ray
    import torch

    from pretrain.consolidate import consolidated_state_dict
    from pretrain.model import UniSRec

    state_dict = ray.get(ray.remote(num_cpus=1)(consolidated_state_dict).remote(checkpoint.path))
    model = UniSRec(cfg.model, text_dim=text_dim)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
    return model, _train_state(checkpoint)


def _last_losses(run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    data = MlflowClient().get_run(run_id).data.metrics
    return {k: data[k] for k in ("loss", "loss_seq_item", "loss_seq_seq") if k in data}


def _metric_history(run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def _mean_metric(run_id: str, key: str) -> float | None:
    values = [v for _, v in _metric_history(run_id, key)]
    return sum(values) / len(values) if values else None


def _read_run_state(out: Path) -> dict | None:
    path = out / RUN_STATE
    return json.loads(path.read_text()) if path.exists() else None


def _plot_loss(run_id: str, path: Path) -> None:
    """Training curves as a PNG beside summary.json and as a run artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "loss_seq_item", "heldout_loss"):
        history = _metric_history(run_id, key)
        if history:
            axes[0].plot(*zip(*history), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("pretraining loss")
    axes[0].legend()
    history = _metric_history(run_id, "sequences_per_second")
    if history:
        axes[1].plot(*zip(*history))
    axes[1].set_xlabel("step")
    axes[1].set_title("sequences / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(path))
