"""A short pretrain and fine-tune against a real local `mlflow server` (not the sqlite file):
metrics from the Ray workers, the backbone, and the adaptor with lineage all land there."""

from __future__ import annotations

import pytest
from helpers_data import write_small_dataset
from mlflow.tracking import MlflowClient

from adaptors.config import FinetuneConfig
from cluster.mlflow_server import tracking_server
from pretrain.config import PretrainConfig
from unisrec.config import load_config

pytestmark = pytest.mark.slow


def test_pretrain_then_finetune_log_and_register_through_the_server(tmp_path):
    from adaptors.finetune import run_finetune
    from pretrain.job import run_pretrain

    data = write_small_dataset(
        tmp_path / "data", domains=("books", "games"), pretrain_domains=("books",)
    )
    with tracking_server(tmp_path / "mlflow") as url:
        pretrain = run_pretrain(
            load_config(
                PretrainConfig,
                None,
                [
                    f"data.dir={data}",
                    "data.batch_size=8",
                    "data.loader_workers=0",
                    "model.hidden_size=16",
                    "model.inner_size=16",
                    "model.max_seq_len=10",
                    "optim.max_steps=3",
                    "distributed.num_workers=2",
                    "log_every=1",
                    f"output_dir={tmp_path / 'pretrain'}",
                    f"mlflow.tracking_uri={url}",
                ],
            )
        )
        finetune = run_finetune(
            load_config(
                FinetuneConfig,
                None,
                [
                    "tenant=games",
                    f"data.dir={data}",
                    "data.domain=games",
                    "backbone=models:/unisrec-backbone@current",
                    "optim.max_epochs=1",
                    f"output_root={tmp_path / 'finetune'}",
                    f"mlflow.tracking_uri={url}",
                ],
            ),
            progress=False,
        )
        client = MlflowClient(url)
        run = client.get_run(pretrain["run_id"])
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
        backbone = client.get_model_version_by_alias("unisrec-backbone", "current")
        adaptor = max(
            client.search_model_versions("name='unisrec-adaptor-games'"),
            key=lambda v: int(v.version),
        )
        assert adaptor.tags["unisrec.backbone_version"] == str(backbone.version)
        assert adaptor.tags["unisrec.backbone_run_id"] == pretrain["run_id"]
        assert adaptor.tags["unisrec.data_digest"] == backbone.tags["unisrec.data_digest"]
        assert set(finetune["test"]) >= {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
