"""``unisrec recommend | recommend-batch | catalogue add | promote | models list | serve``:
the serving sub-commands, everything that happens to a tenant's adaptor after fine-tuning.

``recipes/cli.py`` calls :func:`register_commands` with its sub-parsers. Heavy libraries are
imported inside the command functions so ``unisrec --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json

from adaptors.commands import tenant_option
from serving.gate import DEFAULT_METRIC, DEFAULT_TOLERANCE


def cmd_recommend(args: argparse.Namespace) -> int:
    from adaptors.publish import load_adaptor
    from adaptors.topk import parse_history, top_k
    from serving.batch import resolve_version
    from serving.lifecycle import tenant_versions
    from unisrec.errors import ConfigError
    from unisrec.tags import PRODUCTION
    from unisrec.tracking import configure_mlflow

    configure_mlflow(args.tracking_uri, create=False)
    history = parse_history(args.history)
    tenant_versions(tenant_option(args.tenant))  # none at all: say which store was read
    model = resolve_version(
        tenant_option(args.tenant), args.version or "", args.alias or PRODUCTION
    )
    recommender = load_adaptor(model.uri)  # as the endpoint and the batch job load a version
    catalogue = recommender.catalogue
    try:
        recs = top_k(
            recommender.model,
            recommender.spec,
            catalogue,
            [history],
            k=args.k,
            exclude_history=not args.keep_history,
            item_vectors=recommender.item_vectors,
        )
    except KeyError as err:
        raise ConfigError(f"--history: {err.args[0]}") from err
    texts = dict(zip(catalogue.keys, catalogue.texts, strict=True))
    for rank, (key, score) in enumerate(recs[0], start=1):
        print(f"{rank:3d}  {score:9.4f}  {key}  {texts[key]}")
    return 0


def cmd_recommend_batch(args: argparse.Namespace) -> int:
    from serving.batch import BatchConfig, recommend_batch, summary
    from unisrec.tags import PRODUCTION

    cfg = BatchConfig(
        tenant=tenant_option(args.tenant),
        out=args.out,
        users=args.users or "",
        all_users=args.all_users,
        data_dir=args.data_dir or "",
        version=args.version or "",
        alias=args.alias or PRODUCTION,
        k=args.k,
        exclude_history=not args.keep_history,
        batch_size=args.batch_size,
        actors=args.actors,
        torch_threads=args.torch_threads,
        tracking_uri=args.tracking_uri,
        progress=not args.quiet,
    )
    record = recommend_batch(cfg)
    print(summary(record))
    print(f"wrote {cfg.out} and {cfg.out}.json")
    return 0


def cmd_catalogue_add(args: argparse.Namespace) -> int:
    from serving.lifecycle import add_catalogue_version
    from unisrec.tracking import configure_mlflow

    configure_mlflow(args.tracking_uri)
    result = add_catalogue_version(tenant_option(args.tenant), args.file, version=args.version)
    print(
        f"{args.tenant}: added {result['added']} items to version {result['extends']}: "
        f"{result['model']} version {result['version']} ({result['items']} items) is now "
        f"{result['alias']}"
    )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from serving.lifecycle import promote
    from unisrec.tracking import configure_mlflow

    configure_mlflow(args.tracking_uri)
    result = promote(
        tenant_option(args.tenant),
        args.version,
        metric=args.metric,
        tolerance=args.tolerance,
        force=args.force,
    )
    print(
        f"{result['model']}: production -> version {result['version']} (was {result['previous']})"
    )
    print(f"  gate: {result['gate']}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from serving.lifecycle import format_rows, model_rows
    from unisrec.tracking import configure_mlflow

    configure_mlflow(args.tracking_uri)
    rows = model_rows(tenant_option(args.tenant) if args.tenant else None)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import sys
    import time

    from serving.endpoint import EndpointConfig, start

    cfg = EndpointConfig(
        tenants=[t.strip() for t in args.tenants.split(",") if t.strip()],
        port=args.port,
        replicas=args.replicas,
        max_tenants_per_replica=args.max_tenants_per_replica,
        alias_refresh_s=args.alias_refresh,
        request_timeout_s=args.request_timeout,
        max_batch_size=args.max_batch_size,
        torch_threads=args.torch_threads,
        colocate=args.colocate,
        ingress=args.ingress,
        tracking_uri=args.tracking_uri,
    )
    url = start(cfg)
    # `kill PID` (as a process supervisor stops it) also shuts the application down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(
        f"serving {', '.join(cfg.tenants)} ({cfg.alias}) at {url}/recommend/<tenant> "
        f"(ingress: {cfg.ingress}); Ctrl-C stops it.",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        from ray import serve

        serve.shutdown()


def register_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``recommend``, ``recommend-batch``, ``catalogue``, ``promote``, ``models`` and ``serve``
    to ``unisrec``."""
    p = sub.add_parser(
        "recommend",
        help="print a tenant's top-k items for a history of item keys",
        description="Reads the tenant's registered adaptor from the MLflow registry (--version, "
        "or the version --alias points at, default production), as `unisrec serve` and "
        "`unisrec recommend-batch` do. Writes nothing; prints rank, score, item key and text.",
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("--history", required=True, help="item keys, oldest first: ITEM,ITEM,...")
    p.add_argument("-k", type=int, default=10, help="how many items")
    p.add_argument("--keep-history", action="store_true", help="allow items already in the history")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="the adaptor version to rank with")
    which.add_argument(
        "--alias", help="rank with the version this alias points at (default production)"
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser(
        "recommend-batch",
        help="top-k for many users at once (Ray Data actor pool) into one Parquet file",
        description="Reads USERS.parquet (columns user and history, a list of item keys oldest "
        "first), or with --all-users every user of the dataset domain the tenant was fine-tuned "
        "on with their whole sequence (from --data-dir, else from the directory the version's "
        "fine-tune run read), and the tenant's registered adaptor "
        "(--version, or the version --alias points at, default production). Writes RECS.parquet "
        "(user, rank, item, score; the run's record in the schema metadata) and "
        "RECS.parquet.json (tenant, version, MLflow run id, counts). Unknown items are left out of a history and counted; "
        "a user with no known item gets no rows. On a Ray cluster: unisrec submit "
        "recommend-batch ...",
    )
    p.add_argument("--tenant", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="the adaptor version to rank with")
    which.add_argument(
        "--alias", help="rank with the version this alias points at (default production)"
    )
    users = p.add_mutually_exclusive_group(required=True)
    users.add_argument(
        "--users", metavar="USERS.parquet", help="Parquet file or directory: user, history"
    )
    users.add_argument(
        "--all-users", action="store_true", help="every user of the tenant's dataset domain"
    )
    p.add_argument(
        "--data-dir",
        help="with --all-users: the dataset directory the tenant was fine-tuned on (default: "
        "the one its fine-tune run read)",
    )
    p.add_argument("--out", required=True, metavar="RECS.parquet", help="the Parquet file to write")
    p.add_argument("-k", type=int, default=50, help="items per user")
    p.add_argument("--keep-history", action="store_true", help="allow items already in the history")
    p.add_argument("--batch-size", type=int, default=256, help="users an actor ranks at once")
    p.add_argument(
        "--actors",
        type=int,
        default=2,
        help="at most this many model copies (Ray Data actors; one to start)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="threads (and CPUs) per actor")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    p.set_defaults(func=cmd_recommend_batch)

    p = sub.add_parser("catalogue", help="manage a tenant's item catalogue")
    cat_sub = p.add_subparsers(dest="catalogue_command", required=True, metavar="SUBCOMMAND")
    s = cat_sub.add_parser(
        "add",
        help="add items by text: registers a new adaptor version with the longer catalogue",
        description="Reads FILE.csv (columns item,text), encodes the texts with the catalogue's text "
        "encoder, and registers a new version of unisrec-adaptor-<tenant>: the weights of --version "
        "(default: the production version) with the items appended, tagged unisrec.extends_version. "
        "Extending production moves production to it, so `unisrec serve` picks it up without a "
        "restart. A text-only (inductive) adaptor recommends the new items at once; a transductive "
        "one gives them a zero ID embedding; SASRec cannot recommend them.",
    )
    s.add_argument("file", help="CSV with columns item,text")
    s.add_argument("--tenant", required=True)
    s.add_argument("--version", help="the version to extend (default: production)")
    s.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    s.set_defaults(func=cmd_catalogue_add)

    p = sub.add_parser(
        "promote",
        help="point a tenant's production alias at a version (default: its candidate)",
        description="Moves the alias production of unisrec-adaptor-<tenant> (what `unisrec serve` "
        "serves) if the promotion gate lets the version through: its validation --metric (its "
        "fine-tune run's best_valid_*) may be at most --tolerance (an absolute drop) below the "
        "production version's. A first promotion, and a version that was in production before "
        "(a rollback), pass. Tags the version with unisrec.promoted_by, unisrec.promoted_at, "
        "unisrec.promoted_from and the gate's numbers (unisrec.gate_*), and with --force past a "
        "refusal unisrec.forced_by. Roll back by promoting the previous version.",
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("--version", help="version to promote (default: the candidate)")
    p.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help=f"validation metric the gate compares, recall@K or ndcg@K (default {DEFAULT_METRIC})",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="how far (absolute) the version's metric may fall below production's "
        f"(default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="promote although the gate refuses; tags who forced it (unisrec.forced_by)",
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("models", help="the registered adaptors")
    models_sub = p.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    s = models_sub.add_parser(
        "list",
        help="tenants, versions, aliases and lineage (backbone, data digest, metrics)",
        description="Reads the MLflow registry; prints one line per adaptor version, newest first.",
    )
    s.add_argument("--tenant", help="only this tenant")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    s.set_defaults(func=cmd_models_list)

    p = sub.add_parser(
        "serve",
        help="one HTTP endpoint (Ray Serve, 127.0.0.1) for many tenants' production adaptors",
        description="Starts a Ray Serve application on 127.0.0.1:PORT: POST /recommend/<tenant> with "
        '{"history": [item keys], "k": 10} answers {"items": [{"key", "text", "score"}, ...]}. '
        "Adaptors load on first use by the alias production (re-read every --alias-refresh "
        "seconds) and share one copy of their backbone.",
    )
    p.add_argument("--tenants", required=True, help="comma-separated tenants to serve")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas")
    p.add_argument(
        "--max-tenants-per-replica", type=int, default=8, help="tenants loaded per replica (LRU)"
    )
    p.add_argument(
        "--alias-refresh", type=float, default=5.0, help="seconds a resolved alias is trusted"
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="seconds before a request not yet answered gets a 503",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="concurrent requests of a tenant ranked in one pass",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per model replica")
    p.add_argument(
        "--colocate",
        action="store_true",
        help="ingress and models in one deployment (--replicas of it): no hop between them, "
        "but a replica lost mid-request gets no JSON 503 (its connection drops, or through "
        "the proxy a plain 500)",
    )
    p.add_argument(
        "--ingress",
        choices=["auto", "direct", "proxy"],
        default="auto",
        help="who takes the HTTP connections: direct = the ingress replica itself (no proxy "
        "hop; one ingress replica), proxy = Ray Serve's HTTP proxy; auto (default): direct on "
        "a one-node Ray unless --colocate with --replicas > 1",
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    p.set_defaults(func=cmd_serve)
