"""Several tenants: per-tenant configs, and two real Ray tasks fine-tuning side by side."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from helpers_data import write_small_dataset
from mlflow.tracking import MlflowClient

from adaptors.config import FinetuneConfig
from adaptors.tenants import run_tenants, tenant_configs
from unisrec.config import from_dict
from unisrec.errors import ConfigError

TINY = {"hidden_size": 16, "inner_size": 32, "num_experts": 2, "max_seq_len": 10, "dropout": 0.1}


def shared_config(tmp_path: Path, **extra) -> FinetuneConfig:
    return from_dict(
        FinetuneConfig,
        {
            "data": {"dir": str(tmp_path / "data"), "domain": "office"},
            "model": TINY,
            "optim": {"max_epochs": 2, "batch_size": 16, "lr": 1e-2},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "output_root": str(tmp_path / "runs"),
            **extra,
        },
    )


def test_each_tenant_gets_its_overrides_output_dir_and_model_name(tmp_path):
    cfg = shared_config(
        tmp_path,
        tenants=[
            {"name": "alpha", "overrides": {"data.domain": "garden", "mode": "transductive"}},
            {"name": "beta"},
        ],
    )
    alpha, beta = tenant_configs(cfg)
    assert (alpha.tenant, alpha.data.domain, alpha.mode) == ("alpha", "garden", "transductive")
    assert (beta.tenant, beta.data.domain, beta.mode) == ("beta", "office", "inductive")
    assert alpha.output_dir == str((tmp_path / "runs" / "alpha").resolve())
    assert beta.output_dir == str((tmp_path / "runs" / "beta").resolve())
    assert (alpha.model_name, beta.model_name) == ("unisrec-adaptor-alpha", "unisrec-adaptor-beta")
    assert not alpha.tenants and not beta.tenants


def test_tenants_flag_picks_names_and_keeps_matching_overrides(tmp_path):
    cfg = shared_config(
        tmp_path, tenants=[{"name": "alpha", "overrides": {"mode": "transductive"}}]
    )
    (gamma, alpha) = tenant_configs(cfg, ["gamma", "alpha"])
    assert (gamma.tenant, gamma.mode) == ("gamma", "inductive")
    assert (alpha.tenant, alpha.mode) == ("alpha", "transductive")


@pytest.mark.parametrize(
    ("extra", "names", "message"),
    [
        ({}, ["ok", "../evil"], "not a valid tenant name"),
        ({"mlflow": {"registered_model": "shared"}}, ["a", "b"], "one model each"),
        (
            {"tenants": [{"name": "a", "overrides": {"data.domian": "x"}}]},
            None,
            "did you mean 'data.domain'",
        ),
        (
            {"tenants": [{"name": "a", "overrides": {"output_dir": "/tmp/x"}}]},
            None,
            "set per tenant",
        ),
        ({}, None, "no tenants"),
    ],
)
def test_bad_tenant_lists_are_refused(tmp_path, extra, names, message):
    with pytest.raises(ConfigError, match=message):
        tenant_configs(shared_config(tmp_path, **extra), names)


@pytest.mark.slow
def test_two_tenants_fine_tune_in_parallel_ray_tasks_without_interfering(tmp_path):
    import ray

    write_small_dataset(tmp_path / "data", domains=("office", "garden"))
    cfg = shared_config(
        tmp_path,
        tenants=[
            {"name": "alpha", "overrides": {"data.domain": "office"}},
            {"name": "beta", "overrides": {"data.domain": "garden", "mode": "transductive"}},
        ],
    )
    try:
        results = run_tenants(cfg)
    finally:
        ray.shutdown()

    assert set(results) == {"alpha", "beta"}
    assert all("error" not in r for r in results.values()), results
    assert results["alpha"]["run_id"] != results["beta"]["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    for tenant, domain, mode in (
        ("alpha", "office", "inductive"),
        ("beta", "garden", "transductive"),
    ):
        out = tmp_path / "runs" / tenant
        metrics = json.loads((out / "metrics.json").read_text())
        assert (metrics["tenant"], metrics["mode"]) == (tenant, mode)
        version = client.get_model_version_by_alias(f"unisrec-adaptor-{tenant}", "latest")
        assert (version.tags["unisrec.tenant"], version.tags["unisrec.domain"]) == (tenant, domain)
        assert version.run_id == results[tenant]["run_id"]
        assert client.get_run(version.run_id).data.tags["unisrec.tenant"] == tenant
