"""Run an experiment grid (``unisrec experiment CONFIG.yaml``).

1. open the experiment's MLflow parent run (the same one on every later invocation)
2. pretraining cells, one at a time, each a Ray task that runs the ordinary pretraining job
   (Ray Train + DeepSpeed workers); the backbone is registered as
   ``unisrec-backbone-<experiment>-<cell>`` and fine-tuning pulls that exact version
3. fine-tuning runs (cell x train fraction x seed) as parallel Ray tasks, each the ordinary
   fine-tuning job (early stopping and the reported state chosen on valid only)
4. every finished run is recorded in ``results.json`` at once and never run again; every
   run's MLflow run is tagged as a child of the parent run
5. tables (markdown + JSON) and PNGs under ``report/`` (see :mod:`experiments.report`),
   logged to the parent run

A run stopped halfway continues where it stopped (the jobs' own resume: ``last.pt`` for
fine-tuning, ``--resume`` from the last checkpoint for pretraining).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from experiments.config import ExperimentConfig, FinetuneCell, PretrainCell
from unisrec.config import apply_overrides, flatten, from_dict, load_config, to_dict

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
STATE_FILE = "experiment.json"
PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests child runs


def pretrain_key(cell: PretrainCell) -> str:
    return f"pretrain/{cell.name}"


def finetune_key(cell: FinetuneCell, fraction: float, seed: int) -> str:
    return f"finetune/{cell.name}/f{fraction:g}/s{seed}"


def finetune_runs(
    cfg: ExperimentConfig, only_fractions: list[float] | None = None
) -> list[tuple[FinetuneCell, float, int]]:
    """Every (cell, train fraction, seed) of the grid (of ``only_fractions``, if given):
    first seed before later seeds, then each cell's fractions in its listed order, then cells
    in config order -- so a stopped grid has whole comparisons (every cell at one seed and
    fraction) rather than all seeds of one cell."""
    runs, position = [], 0
    for cell in cfg.finetune:
        fractions, seeds = cell.train_fractions, cell.seeds or cfg.seeds
        for f, fraction in enumerate(fractions):
            if only_fractions and not any(abs(fraction - x) < 1e-9 for x in only_fractions):
                continue
            runs += [((s, f, position), (cell, fraction, seed)) for s, seed in enumerate(seeds)]
        position += 1
    return [run for _, run in sorted(runs, key=lambda pair: pair[0])]


def pretrain_config(cfg: ExperimentConfig, cell: PretrainCell, out: Path):
    """The pretraining job's config for ``cell``: base YAML, experiment overrides, cell
    overrides, then the places the experiment decides (data, output, registry name)."""
    from pretrain.config import PretrainConfig

    raw = to_dict(load_config(PretrainConfig, cfg.pretrain_config or None))
    raw = apply_overrides(raw, {**flatten(cfg.pretrain_overrides), **flatten(cell.overrides)})
    raw = apply_overrides(
        raw,
        {
            "data.dir": str(Path(cfg.data_dir).resolve()),
            "output_dir": str(out / "pretrain" / cell.name),
            "mlflow.tracking_uri": cfg.mlflow.tracking_uri,
            "mlflow.experiment": cfg.mlflow.experiment,
            "mlflow.registered_model": f"unisrec-backbone-{cfg.name}-{cell.name}",
            "distributed.ray_address": cfg.ray_address,
        },
    )
    return from_dict(PretrainConfig, raw)


def finetune_config(
    cfg: ExperimentConfig, cell: FinetuneCell, fraction: float, seed: int, backbone: str, out: Path
):
    """The fine-tuning job's config for one run of ``cell``."""
    from adaptors.config import FinetuneConfig

    raw = to_dict(load_config(FinetuneConfig, cfg.finetune_config or None))
    raw = apply_overrides(raw, {**flatten(cfg.finetune_overrides), **flatten(cell.overrides)})
    tenant = f"{cfg.name}-{cell.name}-f{round(fraction * 100)}-s{seed}".lower()
    raw = apply_overrides(
        raw,
        {
            "tenant": tenant,
            "tenants": [],
            "data.dir": str(Path(cfg.data_dir).resolve()),
            "data.domain": cfg.target,
            "data.train_fraction": fraction,
            "seed": seed,
            "backbone": backbone,
            "output_dir": str(out / "finetune" / cell.name / f"f{fraction:g}-s{seed}"),
            "mlflow.tracking_uri": cfg.mlflow.tracking_uri,
            "mlflow.experiment": cfg.mlflow.experiment,
            "mlflow.registered_model": "",
        },
    )
    return from_dict(FinetuneConfig, raw)


def pretrain_task(raw_cfg: dict, resume: bool) -> dict:
    """Body of a pretraining cell's Ray task (the job starts its own Ray Train workers)."""
    from pretrain.config import PretrainConfig
    from pretrain.job import run_pretrain

    logging.basicConfig(level=logging.INFO)
    summary = run_pretrain(from_dict(PretrainConfig, raw_cfg), resume=resume)
    return {k: v for k, v in summary.items() if k != "heldout_history"} | {
        "heldout_history": summary.get("heldout_history", []),
        "heldout_epochs": _heldout_epochs(summary),
    }


def _heldout_epochs(summary: dict) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    return sorted(
        (m.step, m.value) for m in client.get_metric_history(summary["run_id"], "heldout_epoch")
    )


class Results:
    """``results.json``: finished runs by key, rewritten atomically after every run."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def add(self, key: str, value: dict) -> None:
        self.data[key] = value
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def run_experiment(
    cfg: ExperimentConfig,
    only: list[str] | None = None,
    report_only: bool = False,
    only_fractions: list[float] | None = None,
) -> dict:
    """Run every unfinished cell (of ``only``, if given, by cell name; fine-tunes at
    ``only_fractions`` of the training users, if given), then write the reports; returns ``{"parent_run_id", "results", "report_dir", "ran", "skipped"}``."""
    import mlflow
    import ray

    from adaptors.tenants import finetune_task
    from unisrec.runtime import ensure_ray
    from unisrec.tracking import configure_mlflow, git_commit

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.mlflow.tracking_uri = configure_mlflow(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    results = Results(out / RESULTS_FILE)
    wanted = set(only or [])
    unknown = wanted - {c.name for c in cfg.pretrain} - {c.name for c in cfg.finetune}
    if unknown:
        from unisrec.errors import ConfigError

        raise ConfigError(f"--only: unknown cells {sorted(unknown)}")

    # 1. The parent run.
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    with mlflow.start_run(run_id=state.get("parent_run_id"), run_name=cfg.name) as parent:
        if not state:
            mlflow.set_tags({"git_commit": git_commit(), "unisrec.kind": "experiment"})
            mlflow.log_dict(to_dict(cfg), "experiment_config.json")
    parent_id = parent.info.run_id
    state_path.write_text(json.dumps({"parent_run_id": parent_id}))
    client = mlflow.tracking.MlflowClient()
    ran, skipped = [], []

    if not report_only:
        ensure_ray(cfg.ray_address)
        # 2. Pretraining cells that some wanted fine-tuning cell (or --only) needs.
        needed = {c.backbone for c in cfg.finetune if not wanted or c.name in wanted}
        for cell in cfg.pretrain:
            key = pretrain_key(cell)
            if key in results:
                skipped.append(key)
                continue
            if wanted and cell.name not in wanted and cell.name not in needed:
                continue
            if not wanted and cell.name not in needed and cell.name not in _heldout_cells(cfg):
                continue
            started = time.perf_counter()
            try:  # a failed cell is reported, not recorded: the next invocation retries it
                pcfg = pretrain_config(cfg, cell, out)
                resume = (Path(pcfg.output_dir) / "run.json").exists()
                log.info("experiment %s: pretraining %s (resume=%s)", cfg.name, cell.name, resume)
                task = ray.remote(num_cpus=0)(pretrain_task)
                summary = ray.get(task.remote(to_dict(pcfg), resume))
            except Exception as err:
                log.error("%s failed: %s", key, err)
                continue
            client.set_tag(summary["run_id"], PARENT_TAG, parent_id)
            client.set_tag(summary["run_id"], "unisrec.cell", key)
            summary["cell_wall_seconds"] = time.perf_counter() - started
            results.add(key, summary)
            ran.append(key)

        # 3. Fine-tuning runs, `parallel` at a time.
        pending: dict[Any, str] = {}
        queue = []
        for cell, fraction, seed in finetune_runs(cfg, only_fractions):
            key = finetune_key(cell, fraction, seed)
            if wanted and cell.name not in wanted:
                continue
            if key in results:
                skipped.append(key)
                continue
            backbone = "none"
            if cell.backbone != "none":
                made = results.data.get(f"pretrain/{cell.backbone}")
                if made is None:
                    log.warning("%s: backbone cell %s has not run; skipped", key, cell.backbone)
                    continue
                backbone = f"models:/{made['registered_model']}/{made['model_version']}"
            try:
                queue.append((key, finetune_config(cfg, cell, fraction, seed, backbone, out)))
            except Exception as err:
                log.error("%s: %s", key, err)
        task = ray.remote(num_cpus=1)(finetune_task)
        starts: dict[str, float] = {}
        while queue or pending:
            while queue and len(pending) < cfg.parallel:
                key, fcfg = queue.pop(0)
                log.info("experiment %s: fine-tuning %s", cfg.name, key)
                starts[key] = time.perf_counter()
                pending[task.remote(to_dict(fcfg), False)] = key
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            try:
                summary = ray.get(done[0])
            except Exception as err:  # reported, not recorded: the next invocation retries
                log.error("%s failed: %s", key, err)
                continue
            client.set_tag(summary["run_id"], PARENT_TAG, parent_id)
            client.set_tag(summary["run_id"], "unisrec.cell", key)
            summary["wall_seconds"] = time.perf_counter() - starts[key]
            results.add(key, summary)
            ran.append(key)
            log.info("%s: test %s (best epoch %s)", key, summary["test"], summary["best_epoch"])

    # 5. Reports.
    from experiments.report import write_reports

    report_dir = out / "report"
    written = write_reports(cfg, results.data, report_dir)
    with mlflow.start_run(run_id=parent_id):
        for path in written:
            mlflow.log_artifact(str(path), artifact_path="report")
    return {
        "parent_run_id": parent_id,
        "results": str(results.path),
        "report_dir": str(report_dir),
        "ran": ran,
        "skipped": skipped,
    }


def _heldout_cells(cfg: ExperimentConfig) -> set[str]:
    return {c for r in cfg.reports if r.kind == "heldout" for c in r.cells}
