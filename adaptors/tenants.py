"""Many tenants at once: each tenant's fine-tune runs as its own Ray task (one CPU each).

    unisrec finetune CONFIG.yaml --tenants office,scientific
    # or in CONFIG.yaml:
    tenants:
      - name: office
        overrides: {data.domain: office, mode: transductive}
      - name: scientific
        overrides: {data.domain: scientific}

Tenants are isolated: each gets its own config (the shared one plus its overrides), MLflow
run, registered model (``unisrec-adaptor-<tenant>``) and output directory
(``<output_root>/<tenant>``). One tenant failing does not stop the others.
"""

from __future__ import annotations

import logging

from adaptors.config import FinetuneConfig, TenantSpec
from unisrec.config import apply_overrides, from_dict, to_dict
from unisrec.errors import ConfigError

log = logging.getLogger(__name__)


def tenant_configs(cfg: FinetuneConfig, names: list[str] | None = None) -> list[FinetuneConfig]:
    """One resolved config per tenant.

    ``names`` (from ``--tenants``) picks tenants; an entry of ``cfg.tenants`` with the same
    name contributes its overrides. Without ``names``, ``cfg.tenants`` is the list.
    """
    from adaptors.finetune import resolve_paths

    specs = {t.name: t for t in cfg.tenants}
    chosen = [specs.get(n, TenantSpec(name=n)) for n in names] if names else list(cfg.tenants)
    if not chosen:
        raise ConfigError("tenants: no tenants given (config tenants: list or --tenants a,b)")
    for spec in chosen:
        spec.validate()
    if cfg.mlflow.registered_model and len(chosen) > 1:
        raise ConfigError(
            "mlflow.registered_model: must be empty with several tenants (one model each)"
        )
    base = to_dict(cfg)
    base.update(tenants=[], output_dir="")
    configs = []
    for spec in chosen:
        try:
            raw = apply_overrides({**base, "tenant": spec.name}, spec.overrides)
            configs.append(resolve_paths(from_dict(FinetuneConfig, raw)))
        except ConfigError as err:
            raise ConfigError(
                f"tenants[{spec.name}].overrides: {err} (fix the tenant's entry under tenants:)"
            ) from err
    return configs


def finetune_task(raw_cfg: dict, restart: bool) -> dict:
    """Body of one tenant's Ray task: one torch thread, so tasks do not fight over cores."""
    import torch

    from adaptors.finetune import run_finetune

    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_finetune(from_dict(FinetuneConfig, raw_cfg), restart=restart, progress=False)


def run_tenants(
    cfg: FinetuneConfig,
    names: list[str] | None = None,
    restart: bool = False,
    ray_address: str = "",
) -> dict[str, dict]:
    """Fine-tune every tenant in parallel; returns ``{tenant: summary}``, where a failed
    tenant's summary is ``{"error": message}``."""
    import ray

    from unisrec.runtime import ensure_ray
    from unisrec.tracking import configure_mlflow, set_experiment

    configs = tenant_configs(cfg, names)
    # Create the store and experiments here: parallel tasks racing to create the same sqlite
    # tables or experiment would fail.
    for tenant_cfg in configs:
        configure_mlflow(tenant_cfg.mlflow.tracking_uri)
        set_experiment(tenant_cfg.experiment_name, tenant_cfg.mlflow.tracking_uri)

    ensure_ray(ray_address)
    task = ray.remote(num_cpus=1)(finetune_task)
    pending = {task.remote(to_dict(c), restart): c.tenant for c in configs}
    results: dict[str, dict] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        tenant = pending.pop(done[0])
        try:
            results[tenant] = ray.get(done[0])
            log.info("%s: done, test %s", tenant, results[tenant]["test"])
        except Exception as err:  # a failed tenant is reported, the others go on
            results[tenant] = {"error": f"{type(err).__name__}: {err}"}
            log.error("%s: failed: %s", tenant, err)
    return {c.tenant: results[c.tenant] for c in configs}
