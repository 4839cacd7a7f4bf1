"""A real MLflow tracking server on 127.0.0.1: runs, artifacts and the registry through it."""

from __future__ import annotations

import socket
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest

from cluster.mlflow_server import TrackingServer, session_processes, start_server, stop_server

pytestmark = pytest.mark.slow


class Offset(mlflow.pyfunc.PythonModel):
    """The tiny model registered here: adds 0.5 to every value."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input + 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> TrackingServer:
    server = start_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop_server(server)


@pytest.fixture
def mlflow_at(server):
    """MLflow's fluent API pointed at the server for one test, then pointed back."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(server.url)
    mlflow.set_registry_uri(server.url)
    yield mlflow
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def test_run_metrics_and_artifacts_go_through_the_server(server, mlflow_at, tmp_path):
    mlflow = mlflow_at
    mlflow.set_experiment("server-test")
    report = tmp_path / "report.txt"
    report.write_text("recall@10 0.25\n")
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.001)
        for step, loss in enumerate([3.0, 2.5, 2.25]):
            mlflow.log_metric("loss", loss, step=step)
        mlflow.log_artifact(str(report), artifact_path="eval")

    client = mlflow.MlflowClient(server.url)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.5), (2, 2.25)]
    assert client.get_run(run.info.run_id).data.params == {"lr": "0.001"}
    # Proxied artifacts: written by the server under its root, read back over HTTP.
    assert list(Path(server.log_path.parent, "artifacts").rglob("report.txt"))
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="eval/report.txt", dst_path=str(tmp_path / "down")
    )
    assert Path(local).read_text() == "recall@10 0.25\n"


def test_registered_model_version_is_found_by_alias_and_loads(server, mlflow_at):
    mlflow = mlflow_at
    mlflow.set_experiment("server-test")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=Offset(),
            registered_model_name="tiny-offset",
            pip_requirements=[],
        )
    client = mlflow.MlflowClient(server.url, registry_uri=server.url)
    version = info.registered_model_version
    client.set_registered_model_alias("tiny-offset", "champion", version)

    found = client.get_model_version_by_alias("tiny-offset", "champion")
    assert found.version == str(version)
    model = mlflow.pyfunc.load_model("models:/tiny-offset@champion")
    out = model.predict(pd.DataFrame({"x": [1.0, 2.0]}))
    assert out["x"].tolist() == [1.5, 2.5]


def test_stopping_ends_every_server_process_and_frees_the_port(server):
    port = int(server.url.rsplit(":", 1)[1])
    session = server.process.pid
    assert len(session_processes(session)) >= 2  # mlflow's launcher and its uvicorn worker

    stop_server(server)

    assert session_processes(session) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    stop_server(server)  # a second stop is harmless


def test_a_server_that_cannot_start_reports_its_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match=r"(?s)mlflow server exited.*address already in use"):
            start_server(tmp_path, port=taken.getsockname()[1], timeout_s=120)
