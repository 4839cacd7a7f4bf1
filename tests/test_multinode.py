"""A multi-node drill on one host: ``ray.cluster_utils.Cluster`` starts a head (with the
dashboard, i.e. the Ray Jobs server) and two 1-CPU worker nodes, every one on 127.0.0.1.

1. pretraining with 2 workers lands one worker on each node (1 CPU each); shards,
   checkpoints and the MLflow store lie on a path all nodes share; the loss gathers
   negatives across the two nodes;
2. the node of rank 1 is lost mid-run (its worker stalls, the test removes the node) and a
   fresh node joins: the run resumes from its last checkpoint on the new node and ends with
   the sample count and final loss of the uninterrupted run;
3. ``unisrec submit`` runs a fine-tune of the registered backbone as a Ray job on the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers_data import write_small_dataset

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local Ray
        ray.shutdown()
    saved_path = os.environ["PATH"]
    # `python` in a job's entrypoint is this venv's; every node inherits this environment.
    os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{saved_path}"
    dashboard = _free_port()
    # A short temp dir: Ray's socket paths under it must stay below the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,  # no training on the head, as in ray_cluster.yaml
            "node_ip_address": "127.0.0.1",
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard,
            "dashboard_agent_listen_port": _free_port(),
            "temp_dir": temp_dir,
        },
    )
    os.environ["RAY_ADDRESS"] = head.address  # never another Ray on this machine
    for _ in range(2):
        head.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=head.address)
    try:
        yield head, f"http://127.0.0.1:{dashboard}"
    finally:
        ray.shutdown()
        head.shutdown()
        os.environ["PATH"] = saved_path
        del os.environ["RAY_ADDRESS"]
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """What every node reads and writes: dataset, checkpoints, MLflow store."""
    root = tmp_path_factory.mktemp("shared")
    write_small_dataset(
        root / "data", domains=("books", "games"), pretrain_domains=("books", "games")
    )
    return root


def _config(shared: Path, address: str, name: str, *extra: str):
    from pretrain.config import PretrainConfig
    from unisrec.config import load_config

    return load_config(
        PretrainConfig,
        None,
        [
            f"data.dir={shared / 'data'}",
            "data.batch_size=8",
            "data.loader_workers=0",
            "model.hidden_size=16",
            "model.inner_size=16",
            "model.num_experts=2",
            "model.max_seq_len=10",
            "optim.epochs=2",  # 10 steps: room for a node loss mid-run
            "distributed.num_workers=2",
            "distributed.zero_stage=2",
            "distributed.checkpoint_every=3",
            f"distributed.ray_address={address}",
            "log_every=1",
            f"output_dir={shared / name}",
            f"mlflow.tracking_uri=sqlite:///{shared / 'mlflow.db'}",
            *extra,
        ],
    )


def _train_workers() -> dict[str, str]:
    """Actor id -> node id of every Ray Train worker so far, alive or not."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
    return {a.actor_id: a.node_id for a in actors}


@pytest.fixture(scope="module")
def uninterrupted(cluster, shared):
    from pretrain.job import run_pretrain

    head, _ = cluster
    before = _train_workers()
    summary = run_pretrain(_config(shared, head.address, "plain"))
    nodes = [node for actor, node in _train_workers().items() if actor not in before]
    return summary, nodes


def test_two_workers_on_two_nodes_train_and_register(cluster, uninterrupted):
    head, _ = cluster
    summary, nodes = uninterrupted
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # two workers, two nodes
    assert set(nodes) <= {n.node_id for n in head.worker_nodes}
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["model_version"] == "1"


def test_a_lost_node_is_replaced_and_the_run_resumes_from_its_checkpoint(
    cluster, shared, uninterrupted
):
    from pretrain.job import run_pretrain

    head, _ = cluster
    expected, _ = uninterrupted
    cfg = _config(shared, head.address, "lost-node", "fault.kill_rank=1", "fault.stall_at_step=5")
    marker = shared / "lost-node" / ".stalled-rank1-step5"
    outcome: dict = {}

    def train() -> None:  # in a thread: Ray starts nodes only from the main thread
        try:
            outcome["summary"] = run_pretrain(cfg)
        except BaseException as err:
            outcome["error"] = err

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    while not marker.exists() and trainer.is_alive():
        time.sleep(0.2)
    replaced: dict[str, str] = {}
    if marker.exists():
        node_id = marker.read_text()
        (node,) = [n for n in head.worker_nodes if n.node_id == node_id]
        head.remove_node(node)
        replaced["old"] = node_id
        replaced["new"] = head.add_node(num_cpus=1, node_ip_address="127.0.0.1").node_id
    trainer.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]

    assert replaced, "the rank never stalled"
    assert replaced["old"] not in {n.node_id for n in head.worker_nodes}
    assert replaced["new"] in set(_train_workers().values()), "nothing ran on the fresh node"
    checkpoints = sorted(p.name for p in (shared / "lost-node" / "ray").glob("*/step_*"))
    assert checkpoints, "no checkpoints on the shared path"
    assert summary["steps"] == expected["steps"]
    assert summary["samples_seen"] == expected["samples_seen"]
    assert summary["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-5)


def test_submit_runs_a_finetune_of_the_backbone_as_a_cluster_job(
    cluster, shared, uninterrupted, capsys
):
    import yaml

    from cluster.commands import register_commands

    _, dashboard = cluster
    project = shared / "project"
    project.mkdir()
    (project / "finetune.yaml").write_text(
        yaml.safe_dump(
            {
                "tenant": "acme",
                "data": {"dir": str(shared / "data"), "domain": "books"},
                "backbone": "models:/unisrec-backbone@current",
                "optim": {"max_epochs": 1, "batch_size": 32},
                "output_root": str(shared / "finetune"),
            }
        )
    )
    parser = argparse.ArgumentParser(prog="unisrec")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            str(project),
            "--tracking-uri",
            f"sqlite:///{shared / 'mlflow.db'}",
            "--wait",
            "finetune",
            str(project / "finetune.yaml"),
            "--quiet",
        ]
    )
    code = args.func(args)
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert printed.rstrip().endswith("SUCCEEDED")
    metrics = json.loads((shared / "finetune" / "acme" / "metrics.json").read_text())
    assert metrics["backbone"].startswith("models:/unisrec-backbone/")
