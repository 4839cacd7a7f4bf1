"""``unisrec finetune | evaluate``: the adaptor sub-commands.

``recipes/cli.py`` calls :func:`register_commands` with its sub-parsers. Heavy libraries are
imported inside the command functions so ``unisrec --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_finetune(args: argparse.Namespace) -> int:
    from adaptors.config import FinetuneConfig
    from unisrec.config import load_config

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    names = [n.strip() for n in args.tenants.split(",") if n.strip()] if args.tenants else None
    if names or cfg.tenants:
        from adaptors.tenants import run_tenants

        results = run_tenants(cfg, names, restart=args.restart)
        print(json.dumps(results, indent=2))
        return 1 if any("error" in r for r in results.values()) else 0

    from adaptors.finetune import run_finetune

    print(json.dumps(run_finetune(cfg, restart=args.restart, progress=not args.quiet), indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adaptors.rescore import evaluate_registered
    from unisrec.tags import LATEST, adaptor_model_name
    from unisrec.tracking import configure_mlflow

    configure_mlflow(args.tracking_uri)
    uri = args.model or f"models:/{adaptor_model_name(tenant_option(args.tenant))}@{LATEST}"
    out = args.out or str(Path("runs/evaluate") / (args.tenant or uri.split("/")[-1].split("@")[0]))
    metrics = evaluate_registered(
        uri,
        args.data_dir,
        args.domain,
        out,
        ks=args.ks,
        exclude_history=args.exclude_history,
        batch_size=args.batch_size,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def tenant_option(name: str | None) -> str:
    """``--tenant``: required, and a valid tenant name (unisrec/tags.py)."""
    from unisrec.tags import validate_tenant_name

    if not name:
        from unisrec.errors import ConfigError

        raise ConfigError("--tenant is required")
    return validate_tenant_name(name)


def register_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune`` and ``evaluate`` to ``unisrec``."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a tenant's adaptor (or several tenants in parallel on Ray); register it in MLflow",
        description="Reads the dataset directory data.dir (text vectors, splits of data.domain) and, "
        "unless backbone is none, the registered backbone. Writes output_dir (default "
        "runs/finetune/<tenant>): last.pt, best.pt, metrics.json, adaptor/ and catalogue/; an MLflow "
        "run (params, per-epoch metrics) and a registered model unisrec-adaptor-<tenant> with lineage "
        "tags. A stopped run continues from last.pt unless --restart.",
    )
    p.add_argument("config", help="finetune YAML (see benchmarks/configs/finetune-scientific.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mode=transductive")
    p.add_argument(
        "--tenants", help="comma-separated tenants to run in parallel (each as a Ray task)"
    )
    p.add_argument("--restart", action="store_true", help="ignore last.pt and start from scratch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "evaluate",
        help="re-score a registered adaptor on a dataset domain (full ranking, leave-one-out)",
        description="Reads the registered adaptor (and its backbone) from MLflow and the dataset "
        "directory's splits and text vectors. Writes OUT/metrics.json (valid, test, test by popularity).",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="evaluates models:/unisrec-adaptor-<tenant>@latest")
    who.add_argument("--model", help="a registry URI, models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--data-dir", required=True, help="dataset directory written by `unisrec shard`")
    p.add_argument("--domain", default="", help="domain to score (default: the adaptor's own)")
    p.add_argument("--out", help="directory for metrics.json (default runs/evaluate/<tenant>)")
    p.add_argument(
        "--ks", type=int, nargs="+", default=[10, 50], help="cut-offs K of Recall@K, NDCG@K"
    )
    p.add_argument(
        "--exclude-history", action="store_true", help="drop history items from the ranking"
    )
    p.add_argument("--batch-size", type=int, default=1024, help="users scored at once")
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    p.set_defaults(func=cmd_evaluate)
