"""The MLflow store under fault drills (issue 10).

* two processes that set up the same fresh sqlite store at once used to race in its alembic
  migration and leave it broken for good; now it is created under a lock beside the db;
* artifacts used to land in ``$PWD/mlruns`` whatever ``--out`` said; now every experiment
  the project creates on a local store keeps its artifacts beside the store.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_data import write_small_dataset

REPO = Path(__file__).resolve().parents[1]


def _set_up_and_use(uri: str, barrier, results) -> None:
    try:
        import mlflow  # imported before the barrier: both processes start the store together
        from mlflow.tracking import MlflowClient

        from unisrec.tracking import configure_mlflow, set_experiment

        barrier.wait(timeout=120)
        configure_mlflow(uri)
        set_experiment("race", uri)
        with mlflow.start_run():
            mlflow.log_metric("x", 1.0)
        MlflowClient().search_registered_models()
        results.put("ok")
    except Exception as err:  # sent back whole: the test prints it
        results.put(f"{type(err).__name__}: {err}"[:500])


@pytest.mark.slow
def test_two_processes_setting_up_one_fresh_sqlite_store_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_set_up_and_use, args=(uri, barrier, results)) for _ in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(180)
    assert [results.get(timeout=5) for _ in workers] == ["ok", "ok"]

    check = (
        "from mlflow.tracking import MlflowClient\n"
        f"c = MlflowClient({uri!r}, registry_uri={uri!r})\n"
        "e = c.get_experiment_by_name('race')\n"
        "print(len(c.search_runs([e.experiment_id])), len(c.search_registered_models()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    later = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, env=env
    )
    assert later.returncode == 0, later.stderr[-2000:]
    assert later.stdout.split() == ["2", "0"]


@pytest.mark.slow
def test_finetune_artifacts_stay_beside_the_store_not_in_the_working_directory(
    tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from adaptors.config import FinetuneConfig
    from adaptors.finetune import run_finetune
    from unisrec.config import load_config

    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = write_small_dataset(out / "data")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    cfg = load_config(
        FinetuneConfig,
        None,
        [
            "tenant=acme",
            f"data.dir={data}",
            "data.domain=office",
            "backbone=none",
            "model.hidden_size=16",
            "model.inner_size=16",
            "model.num_experts=2",
            "model.max_seq_len=10",
            "optim.max_epochs=1",
            f"output_root={out / 'finetune'}",
            f"mlflow.tracking_uri={uri}",
        ],
    )
    summary = run_finetune(cfg, progress=False)

    assert sorted(p.name for p in cwd.iterdir()) == []  # no mlruns/, mlartifacts/ or mlflow.db
    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(out), run.info.artifact_uri
    assert (artifacts / "metrics.json").is_file()
    model_files = client.get_model_version_download_uri(
        summary["model_name"], summary["model_version"]
    )
    assert out.as_posix() in model_files, model_files
    experiment = client.get_experiment(run.info.experiment_id)
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(out)
