"""``unisrec experiment`` on the smoke grid: real Ray tasks, DeepSpeed pretraining, MLflow.

One backbone and three fine-tuning runs on a tiny synthetic dataset, then the same command
again, which must run nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_data import write_small_dataset

from experiments.config import ExperimentConfig
from unisrec.config import load_config
from unisrec.errors import ConfigError

pytestmark = pytest.mark.slow
SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "experiment-smoke.yaml"


def _config(root: Path) -> ExperimentConfig:
    return load_config(
        ExperimentConfig,
        SMOKE,
        [
            f"data_dir={root / 'data'}",
            f"output_dir={root / 'exp'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        ],
    )


def _write_data(root: Path) -> None:
    """Two pretraining domains with held-out users and a target domain, under root/data."""
    write_small_dataset(
        root / "data",
        domains=("office", "games", "target"),
        num_users=40,
        pretrain_domains=("office", "games"),
        heldout_fraction=0.2,
    )


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    import ray

    from experiments.runner import run_experiment

    root = tmp_path_factory.mktemp("experiment")
    _write_data(root)
    try:
        first = run_experiment(_config(root))
        second = run_experiment(_config(root))
    finally:
        ray.shutdown()
    return root, first, second


RUNS = [
    "pretrain/all",
    "finetune/scratch/f1/s0",
    "finetune/pretrained/f0.5/s0",
    "finetune/pretrained/f1/s0",
]


def test_the_grid_runs_every_cell_once_and_records_it(twice):
    root, first, _ = twice
    assert sorted(first["ran"]) == sorted(RUNS)
    results = json.loads((root / "exp" / "results.json").read_text())
    assert sorted(results) == sorted(RUNS)
    pretrained = results["finetune/pretrained/f1/s0"]
    assert (
        pretrained["backbone"]
        == f"models:/unisrec-backbone-smoke-all/{results['pretrain/all']['model_version']}"
    )
    assert results["finetune/scratch/f1/s0"]["backbone"] == "none"
    assert results["pretrain/all"]["best_heldout"]["heldout_loss"] > 0


def test_child_runs_sit_under_one_parent_run(twice):
    from mlflow.tracking import MlflowClient

    root, first, second = twice
    assert second["parent_run_id"] == first["parent_run_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    results = json.loads((root / "exp" / "results.json").read_text())
    for key, summary in results.items():
        tags = client.get_run(summary["run_id"]).data.tags
        assert tags["mlflow.parentRunId"] == first["parent_run_id"], key
        assert tags["unisrec.cell"] == key
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.run_name == "smoke"


def test_a_second_invocation_skips_finished_cells(twice):
    root, first, second = twice
    assert second["ran"] == []
    assert sorted(second["skipped"]) == sorted(RUNS)


def test_tables_and_figures_are_written(twice):
    root, *_ = twice
    report = root / "exp" / "report"
    for name in ("bars", "popularity", "scarce", "heldout"):
        assert (report / f"{name}.png").stat().st_size > 1000
    table = (report / "table.md").read_text()
    assert "| pretrained | " in table and "± 0.0000 (n=1)" in table
    scarce = json.loads((report / "scarce.json").read_text())["rows"]
    assert sorted(scarce["pretrained"]) == ["0.5", "1.0"]
    assert "## heldout" in (report / "report.md").read_text()


def test_a_pretraining_cell_cut_off_midway_continues_from_its_checkpoint(tmp_path):
    """The first invocation's pretraining dies at step 3 with no restarts left (as when a
    session ends); the next invocation of the same grid resumes that cell from its last
    checkpoint, not from step 0, and ends with a whole epoch's samples. The checkpoints
    before the cut have no held-out loss yet (held-out shards are read at the epoch's end):
    the resumed run must still rank them."""
    import ray

    from experiments.runner import run_experiment

    _write_data(tmp_path)
    cfg = _config(tmp_path)
    cfg.pretrain_overrides.update(
        {"fault.kill_at_step": 3, "distributed.max_failures": 0, "distributed.checkpoint_every": 1}
    )
    try:
        cut = run_experiment(cfg, only=["all"])
        resumed = run_experiment(cfg, only=["all"])
    finally:
        ray.shutdown()
    assert cut["ran"] == [] and resumed["ran"] == ["pretrain/all"]
    from sharding.dataset import Dataset

    summary = json.loads((tmp_path / "exp" / "results.json").read_text())["pretrain/all"]
    assert summary["resumed_from_step"] >= 2
    windows = sum(spec.num_samples for spec in Dataset(tmp_path / "data").shard_specs())
    assert summary["samples_seen"] == windows  # one epoch, each window once


def test_unknown_backbone_cell_is_a_config_error():
    with pytest.raises(ConfigError, match="not a pretrain cell"):
        load_config(ExperimentConfig, None, ["finetune=[{name: a, backbone: nope}]"])


def test_fine_tunes_can_be_limited_to_some_training_fractions_keeping_seed_order():
    from experiments.runner import finetune_runs

    cfg = load_config(
        ExperimentConfig,
        None,
        [
            "seeds=[0, 1]",
            "finetune=[{name: a, train_fractions: [0.1, 0.5, 1.0]}, {name: b, train_fractions: [0.1]}]",
        ],
    )
    picked = [(c.name, f, s) for c, f, s in finetune_runs(cfg, only_fractions=[0.1])]
    assert picked == [("a", 0.1, 0), ("b", 0.1, 0), ("a", 0.1, 1), ("b", 0.1, 1)]
    assert len(finetune_runs(cfg)) == 8
