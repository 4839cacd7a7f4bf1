"""The fine-tuning recipe (``unisrec finetune CONFIG.yaml``): one tenant's adaptor.

    unisrec finetune benchmarks/configs/finetune-scientific.yaml
    unisrec finetune benchmarks/configs/finetune-scientific.yaml \\
        backbone=models:/unisrec-backbone@latest mode=transductive

1. check the tenant may use its model name and, on a tracking server with users, that this
   user may read the backbone, log to the tenant's experiment and register its model (so a
   refusal stops the job before it trains or registers anything); open its MLflow run (the
   same one on resume), logging the domain's data and the backbone as the run's inputs
2. load the domain: text vectors, training windows, valid and test splits
3. build the model: pull the backbone (its encoder checked against the data) or start from
   scratch; freeze everything that does not train (see adaptors/config.py for the table)
4. train: every window's query prefixes in one causal pass, cross-entropy over all N items
   of the domain, every target with the same weight; each epoch rank the valid users, keep the best state, stop after ``patience``
   epochs without a better valid ``stop_metric``; ``last.pt`` lets a stopped run continue
5. best state -> valid/test metrics (+ test by target popularity) -> metrics.json and MLflow
6. write the adaptor bundle and catalogue; register the adaptor (with the backbone's weights,
   lineage tags and the alias ``candidate``; ``unisrec promote`` makes it ``production``)

Output directory (``<output_root>/<tenant>``): ``last.pt`` (model, optimizer, epoch, best
state), ``best.pt``, ``metrics.json``, ``adaptor/`` (bundle), ``catalogue/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptors.bundle import AdaptorSpec, backbone_lineage, build_model, trained_state, write_bundle
from adaptors.catalogue import write_domain_catalogue
from adaptors.config import FinetuneConfig
from adaptors.evaluate import EvalData, full_report, load_eval_data, metrics_from_ranks, rank_split
from adaptors.publish import claim_model_name, register_adaptor
from pretrain.model import SequenceRecommender
from pretrain.registry import pull_backbone
from sharding.dataset import Dataset, log_mlflow_input
from sharding.windows import training_windows
from unisrec import tags
from unisrec.config import to_dict
from unisrec.errors import ConfigError
from unisrec.tracking import logged_model_id

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainingWindows:
    """A domain's training windows (:func:`sharding.windows.training_windows`) as tensors.

    inputs: ``(W, L)`` int64, right-padded with 0; targets: ``(W, L)`` int64,
    ``targets[w, j]`` follows ``inputs[w, :j+1]``; 0 = no query there (padding, or history
    whose target an earlier window queries).
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


def window_tensor(sequences: list[np.ndarray], max_seq_len: int) -> TrainingWindows:
    """All training windows of all users, each target a query once with its full history."""
    windows = [w for seq in sequences for w in training_windows(np.asarray(seq), max_seq_len)]
    items = torch.zeros(len(windows), max_seq_len + 1, dtype=torch.long)
    first_query = torch.zeros(len(windows), 1, dtype=torch.long)
    for row, window in enumerate(windows):
        items[row, : len(window.items)] = torch.tensor(np.asarray(window.items, dtype=np.int64))
        first_query[row] = window.first_query
    history_only = torch.arange(max_seq_len) < first_query  # (W, L)
    return TrainingWindows(items[:, :-1], items[:, 1:].masked_fill(history_only, 0))


def next_item_loss(
    model: SequenceRecommender,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    text_table: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of every query's next item over all N items of the domain.

    inputs: ``(B, T)`` long, right-padded with 0; targets: ``(B, T)`` long, ``targets[b, t]``
    follows ``inputs[b, :t+1]``, 0 = no query there. text_table: ``(N+1, D)``.
    Returns (the sum of the P cross-entropies, scalar with grad; P).

    The adaptor runs once per step over all N items (with gradients); inputs and candidates
    both read those vectors, so an item has one dropout/gate-noise sample per step.
    """
    items = model.catalogue_vectors(text_table)  # (N+1, H), row 0 = padding
    outputs = model.encode(inputs, items)  # (B, T, H)
    has_target = targets > 0
    logits = model.score(outputs[has_target], items[1:], temperature)  # (P, N)
    return F.cross_entropy(logits, targets[has_target] - 1, reduction="sum"), int(logits.shape[0])


def epoch_batches(
    lengths: torch.Tensor,
    target_counts: torch.Tensor,
    batch_targets: int,
    bucket_by_length: bool,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Window indexes for each step of an epoch, in a seeded random order.

    lengths: ``(W,)`` input items per window; target_counts: ``(W,)`` next-item targets per
    window. Consecutive windows of the order form a step until it holds ``batch_targets``
    targets: a window joins the step in which its first target falls, so a step holds
    ``batch_targets`` targets give or take one window's. With ``bucket_by_length`` the
    shuffled windows are sorted by length before being cut (ties stay shuffled) and the
    steps are shuffled: most windows are short, so random batches are mostly padding (about
    6x the real positions on Amazon Scientific) and the Transformer's cost follows the
    padding.
    """
    order = torch.randperm(len(lengths), generator=generator)
    if bucket_by_length:
        order = order[torch.argsort(lengths[order], stable=True)]
    counts = target_counts[order]
    first_target = counts.cumsum(0) - counts  # targets before each window, in this order
    _, sizes = torch.unique_consecutive(first_target // batch_targets, return_counts=True)
    batches = list(order.split(sizes.tolist()))
    if bucket_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return batches


def train_epoch(
    model: SequenceRecommender,
    windows: TrainingWindows,
    text_table: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: FinetuneConfig,
    epoch: int,
) -> float:
    """One pass over all training windows; returns the epoch's mean loss per target.
    text_table: ``(N+1, D)`` on the training device.

    A step holds about ``optim.batch_size`` next-item targets (the official code's batch
    is 2,048 targets), all scored against one adaptor pass over the catalogue. Every target
    weighs the same in every step: a step's loss is its sum of cross-entropies over
    ``batch_size``, a constant, not over its own (slightly variable) target count.
    """
    model.train()
    device = text_table.device
    # Seeded by epoch, so a resumed run sees the same order as an uninterrupted one.
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    lengths = (windows.inputs > 0).sum(dim=1)
    target_counts = (windows.targets > 0).sum(dim=1)
    batches = epoch_batches(
        lengths, target_counts, cfg.optim.batch_size, cfg.optim.bucket_by_length, generator
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total, count = 0.0, 0
    for batch in batches:
        length = int(lengths[batch].max())  # trim the padding the whole batch shares
        inputs = windows.inputs[batch, :length].to(device)
        targets = windows.targets[batch, :length].to(device)
        loss_sum, queries = next_item_loss(model, inputs, targets, text_table, cfg.temperature)
        loss = loss_sum / cfg.optim.batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        total, count = total + loss_sum.item(), count + queries
    return total / max(count, 1)


def valid_metrics(
    model: SequenceRecommender, data: EvalData, cfg: FinetuneConfig
) -> dict[str, float]:
    """Full-ranking metrics of the valid split (for early stopping)."""
    ranks = rank_split(
        model,
        data.valid,
        data.text_table,
        temperature=cfg.temperature,
        exclude_history=cfg.eval.exclude_history,
        batch_size=cfg.eval.batch_size,
        item_block=cfg.eval.item_block,
    )
    return metrics_from_ranks(ranks, cfg.eval.ks)


def training_users(num_users: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted user indexes of a seeded ``round(fraction * num_users)`` subset (at least one)."""
    if fraction >= 1.0:
        return np.arange(num_users)
    count = max(1, round(fraction * num_users))
    return np.sort(np.random.default_rng(seed).permutation(num_users)[:count])


def load_windows(
    dataset: Dataset, domain: str, max_seq_len: int, fraction: float = 1.0, seed: int = 0
) -> TrainingWindows:
    """The domain's training windows of ``fraction`` of its users
    (:func:`training_users`); refuses a domain with none."""
    sequences = list(dataset.split(domain, "train")["items"])
    sequences = [sequences[u] for u in training_users(len(sequences), fraction, seed)]
    windows = window_tensor(sequences, max_seq_len)
    if len(windows) == 0:
        raise ConfigError(f"data.domain: {domain!r} has no training sequence of two or more items")
    return windows


def prepare_model(
    cfg: FinetuneConfig, dataset: Dataset, backbone_uri: str
) -> tuple[SequenceRecommender, AdaptorSpec, list[nn.Parameter]]:
    """Build the model ``cfg`` asks for; returns it, its spec and the parameters to train.

    Frozen parameters get ``requires_grad=False`` and stay out of the optimizer, so they
    cannot change (not even through weight decay).
    """
    info = dataset.domain(cfg.data.domain)
    backbone, lineage, shape = None, {}, cfg.model
    if backbone_uri != "none":
        backbone, found = pull_backbone(backbone_uri, dataset.encoder_name, dataset.encoder_dim)
        shape = backbone.cfg
        if cfg.baseline == "unisrec":
            lineage = backbone_lineage(found)
        else:
            backbone = None  # SASRec borrows the backbone's shape only
    spec = AdaptorSpec(
        tenant=cfg.tenant,
        baseline=cfg.baseline,
        mode=cfg.mode,
        trains_everything=cfg.trains_everything,
        backbone_config=asdict(shape),
        text_dim=dataset.encoder_dim,
        num_items=info.num_items,
        temperature=cfg.temperature,
        domain=cfg.data.domain,
        data_digest=dataset.digest,
        encoder=dict(dataset.manifest["encoder"]),
        **lineage,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(spec, backbone)
    if spec.trains_everything:
        return model, spec, list(model.parameters())
    model.requires_grad_(False)
    trainable = list(model.tuned_parameters())
    for param in trainable:
        param.requires_grad_(True)
    return model, spec, trainable


def make_optimizer(trainable: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Adam:
    """Adam over the trainable parameters, as one fused kernel per step (CPU and CUDA):
    the per-parameter loop costs a few percent of a CPU step for the same arithmetic."""
    return torch.optim.Adam(
        trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True
    )


def run_identity(cfg: FinetuneConfig) -> dict:
    """The settings a checkpoint must share with the config that resumes it."""
    return {
        "tenant": cfg.tenant,
        "data": to_dict(cfg.data),
        "backbone": cfg.backbone,
        "model": to_dict(cfg.model) if cfg.backbone == "none" else None,
        "mode": cfg.mode,
        "full_finetune": cfg.full_finetune,
        "baseline": cfg.baseline,
        "seed": cfg.seed,
    }


def resolve_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Absolute data and output paths and tracking URI, so Ray tasks in other directories
    read and write the same places as the driver."""
    from unisrec.tracking import resolve_tracking_uri

    if not cfg.tenant:
        raise ConfigError("tenant: must be set (or use tenants: / --tenants)")
    if not cfg.data.domain:
        raise ConfigError("data.domain: must be set")
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, dir=str(Path(cfg.data.dir).resolve())),
        output_dir=str(Path(cfg.resolved_output_dir).resolve()),
        mlflow=dataclasses.replace(
            cfg.mlflow, tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri)
        ),
    )


def run_finetune(cfg: FinetuneConfig, restart: bool = False, progress: bool = True) -> dict:
    """Fine-tune, evaluate and register one tenant's adaptor; returns the metrics plus where
    things went (``output_dir``, ``run_id``, ``model_name``, ``model_version``)."""
    import mlflow

    from unisrec.tracking import config_params, configure_mlflow, git_commit, set_experiment

    # 1. Names, paths and the MLflow run.
    cfg = resolve_paths(cfg)
    configure_mlflow(cfg.mlflow.tracking_uri)
    check_access(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = None if restart else _read_last(out, run_identity(cfg))
    device = _device(cfg.device)

    # 2-3. Data and model (the backbone version a resumed run started with, not the alias's now).
    dataset = Dataset(cfg.data.dir)
    backbone_uri = cfg.backbone
    if resume and AdaptorSpec(**resume["spec"]).backbone_uri:
        backbone_uri = AdaptorSpec(**resume["spec"]).backbone_uri
    model, spec, trainable = prepare_model(cfg, dataset, backbone_uri)
    model.to(device)
    data = load_eval_data(dataset, cfg.data.domain, model.max_seq_len, device)
    windows = load_windows(
        dataset, cfg.data.domain, model.max_seq_len, cfg.data.train_fraction, cfg.seed
    )
    optimizer = make_optimizer(trainable, cfg)
    loop = _LoopState(best_state=_clone_state(model))
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        loop = _LoopState(**resume["loop"])
        torch.set_rng_state(resume["rng"])
        log.info(
            "%s: resuming after epoch %d from %s", cfg.tenant, loop.epoch, out / LAST_CHECKPOINT
        )
    log.info(
        "%s: %d windows, %d items, %d trainable of %d parameters",
        cfg.tenant,
        len(windows),
        data.num_items,
        sum(p.numel() for p in trainable),
        sum(p.numel() for p in model.parameters()),
    )

    if resume:  # the run goes on in its own experiment (it may predate per-tenant ones)
        run_experiment = mlflow.MlflowClient().get_run(resume["run_id"]).info.experiment_id
        mlflow.set_experiment(experiment_id=run_experiment)
    else:
        set_experiment(cfg.experiment_name, cfg.mlflow.tracking_uri)
    with mlflow.start_run(run_id=resume["run_id"] if resume else None, run_name=cfg.tenant) as run:
        if not resume:
            mlflow.log_params(config_params(cfg))
            mlflow.set_tags(
                {
                    "git_commit": git_commit(),
                    **spec.lineage_tags(),
                    tags.KIND: "finetune",
                }
            )
            log_lineage_inputs(dataset, cfg.data.domain, spec)

        # 4. Train with early stopping.
        checkpoint = {
            "identity": run_identity(cfg),
            "spec": asdict(spec),
            "run_id": run.info.run_id,
        }
        fit(model, optimizer, windows, data, cfg, loop, out, checkpoint, progress)

        # 5. The best state's metrics.
        model.load_state_dict(loop.best_state)
        report = full_report(
            model,
            data,
            temperature=cfg.temperature,
            ks=cfg.eval.ks,
            exclude_history=cfg.eval.exclude_history,
            batch_size=cfg.eval.batch_size,
            item_block=cfg.eval.item_block,
            groups=cfg.eval.popularity_groups,
        )
        metrics = {
            "tenant": cfg.tenant,
            **report,
            "best_epoch": loop.best_epoch,
            "epochs_run": loop.epoch,
            "mode": cfg.mode,
            "baseline": cfg.baseline,
            "full_finetune": cfg.full_finetune,
            "backbone": spec.backbone_uri or "none",
        }
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        mlflow.log_metrics(
            {
                **_metric_names("best_valid", report["valid"]),
                **_metric_names("test", report["test"]),
            }
        )
        mlflow.log_metric("best_epoch", loop.best_epoch)
        mlflow.log_artifact(str(out / METRICS_FILE))

    # 6. Bundle, catalogue, registry (its own start_run on the same run).
    bundle = write_bundle(out / "adaptor", spec, trained_state(model, spec))
    catalogue_dir = write_domain_catalogue(out / "catalogue", dataset, cfg.data.domain)
    version = register_adaptor(
        run_id=run.info.run_id,
        name=cfg.model_name,
        alias=cfg.mlflow.alias,
        bundle_dir=bundle,
        catalogue_dir=catalogue_dir,
        spec=spec,
    )
    log.info(
        "%s: registered %s version %s (alias %s)",
        cfg.tenant,
        cfg.model_name,
        version,
        cfg.mlflow.alias,
    )
    return {
        **metrics,
        "output_dir": str(out),
        "run_id": run.info.run_id,
        "model_name": cfg.model_name,
        "model_version": version,
    }


def check_access(cfg: FinetuneConfig) -> None:
    """Before anything trains or is written: the tenant may register its model name and, on a
    tracking server with users, this user may register versions of it (EDIT), log runs to the
    tenant's experiment (EDIT), and read the backbone and the run that holds its weights
    (READ). Raises AccessDenied (unisrec/access.py) naming what is missing."""
    from mlflow.tracking import MlflowClient

    from unisrec import access

    claim_model_name(cfg.model_name, cfg.tenant)
    if access.server_user(cfg.mlflow.tracking_uri) is None:
        return  # a store without users
    client = MlflowClient()
    with access.needs("EDIT", access.EXPERIMENT, cfg.experiment_name):
        experiment = client.get_experiment_by_name(cfg.experiment_name)
    if experiment is not None:  # else this user creates it (and may then write to it)
        access.require("EDIT", access.EXPERIMENT, experiment.experiment_id, cfg.experiment_name)
    if cfg.backbone == "none":
        return
    name, _, ref = cfg.backbone[len("models:/") :].partition("@")
    name, _, number = name.partition("/")
    with access.needs("READ", access.REGISTERED_MODEL, name):
        try:
            version = (
                client.get_model_version_by_alias(name, ref)
                if ref
                else client.get_model_version(name, number)
            )
        except Exception as err:
            if access.refusal_status(err):
                raise
            return  # not there: pull_backbone says so, with the backbone's URI
    if version.run_id:
        with access.needs(
            "READ",
            "the experiment of run",
            version.run_id,
            f"the pretraining run that holds the weights of {name} version {version.version}",
        ):
            client.get_run(version.run_id)


def log_lineage_inputs(dataset: Dataset, domain: str, spec: AdaptorSpec) -> None:
    """The active run's inputs: the tenant's domain of the dataset (digest, domain) and,
    when there is one, the backbone's logged model (which links the backbone's run).

    A tracking server with users lets only a user with EDIT on the backbone's experiment
    link its logged model (a tenant has READ): then the run goes without that input, and its
    tags still name the backbone's version and run."""
    log_mlflow_input(dataset, context="finetuning", domains=[domain])
    if spec.backbone_name:
        import mlflow
        from mlflow.entities import LoggedModelInput
        from mlflow.tracking import MlflowClient

        from unisrec.access import refusal_status

        model_id = logged_model_id(
            MlflowClient().get_model_version(spec.backbone_name, spec.backbone_version)
        )
        if model_id:
            try:
                mlflow.log_input(model=LoggedModelInput(model_id=model_id))
            except Exception as err:
                if refusal_status(err) != 403:
                    raise
                log.info(
                    "backbone %s v%s not linked as an input: the tracking server lets only "
                    "its experiment's editors link it (tags %s, %s name it)",
                    spec.backbone_name,
                    spec.backbone_version,
                    tags.BACKBONE_VERSION,
                    tags.BACKBONE_RUN_ID,
                )


@dataclass
class _LoopState:
    """What early stopping needs to continue after a restart."""

    best_state: dict
    epoch: int = 0  # epochs completed
    best_epoch: int = 0  # 0 = the initial state (no epoch beat it)
    best_metric: float = -1.0
    bad_epochs: int = 0
    stopped: bool = False


def fit(
    model: SequenceRecommender,
    optimizer: torch.optim.Optimizer,
    windows: TrainingWindows,
    data: EvalData,
    cfg: FinetuneConfig,
    loop: _LoopState,
    out: Path,
    checkpoint: dict,
    progress: bool = True,
) -> None:
    """Train epochs ``loop.epoch..max_epochs`` with early stopping, updating ``loop``.

    After every epoch: ``best.pt`` when the valid metric improved, and ``last.pt`` (the
    ``checkpoint`` entries plus model, optimizer and loop state) to resume from.
    """
    import mlflow
    from tqdm.auto import tqdm

    metric = cfg.eval.stop_metric
    epochs = range(loop.epoch, cfg.optim.max_epochs)
    bar = tqdm(epochs, desc=cfg.tenant, disable=not progress or loop.stopped)
    for epoch in bar:
        if loop.stopped:
            break
        started = time.perf_counter()
        loss = train_epoch(model, windows, data.text_table, optimizer, cfg, epoch)
        trained = time.perf_counter()
        valid = valid_metrics(model, data, cfg)
        ranked = time.perf_counter()
        loop.epoch = epoch + 1
        if valid[metric] > loop.best_metric:
            loop.best_metric, loop.best_epoch, loop.bad_epochs = valid[metric], loop.epoch, 0
            loop.best_state = _clone_state(model)
            _save(
                out / BEST_CHECKPOINT,
                {"epoch": loop.epoch, "valid": valid, "model": loop.best_state},
            )
        else:
            loop.bad_epochs += 1
            loop.stopped = loop.bad_epochs >= cfg.optim.patience
        seconds = time.perf_counter() - started
        timings = {
            "epoch_seconds": seconds,
            "train_seconds": trained - started,
            "valid_seconds": ranked - trained,
        }
        mlflow.log_metrics(
            {"train_loss": loss, **timings, **_metric_names("valid", valid)}, step=loop.epoch
        )
        bar.set_postfix(loss=f"{loss:.4f}", **{metric: f"{valid[metric]:.4f}"})
        log.info(
            "%s: epoch %d loss %.4f valid %s %.4f (best %.4f @ %d) %.1f s",
            *(cfg.tenant, loop.epoch, loss, metric, valid[metric]),
            *(loop.best_metric, loop.best_epoch, seconds),
        )
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loop": asdict(loop),
            "rng": torch.get_rng_state(),  # dropout and gate noise go on as if never stopped
        }
        _save(out / LAST_CHECKPOINT, {**checkpoint, **state})
        log.debug(
            "%s: epoch %d phases: train %.2f s, valid ranking %.2f s, rest %.2f s (incl. last.pt)",
            *(cfg.tenant, loop.epoch, timings["train_seconds"], timings["valid_seconds"]),
            time.perf_counter() - ranked,
        )


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _metric_names(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    # MLflow metric names may not contain '@'.
    return {f"{prefix}_{k.replace('@', '_at_')}": v for k, v in metrics.items()}


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a crash mid-save leaves the previous checkpoint intact


def _read_last(out: Path, identity: dict) -> dict | None:
    path = out / LAST_CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["identity"] != identity:
        changed = sorted(k for k in identity if state["identity"].get(k) != identity[k])
        raise ConfigError(
            f"{path} belongs to a run with different {', '.join(changed)}; "
            "pass --restart to start over or choose another output_dir"
        )
    return state


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
