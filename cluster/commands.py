"""The cluster's ``unisrec`` sub-commands: ``submit``, ``mlflow-server``, ``tenants``,
``deepspeed-preset``.

``recipes/cli.py`` adds them with ``register_commands(sub)``. Like the other commands, they
import Ray and MLflow only when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from cluster.jobs import CONFIG_JOBS, DEFAULT_ADDRESS, SUBMITTABLE_JOBS
from pretrain.deepspeed_presets import PRESETS, preset, preset_overrides
from unisrec.errors import ConfigError


def register_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``mlflow-server``, ``tenants`` and ``deepspeed-preset`` to the unisrec
    sub-parsers."""
    presets = ", ".join(PRESETS)
    p = sub.add_parser(
        "submit",
        help="run a shard, pretrain, finetune or recommend-batch job on a running Ray cluster (Ray Jobs)",
        description="Uploads the working directory and runs `unisrec JOB CONFIG ARGS...` (or "
        "`unisrec recommend-batch ARGS...`) on the cluster's head node. CONFIG must lie inside "
        "the working directory; paths inside it, and recommend-batch's --users, --data-dir and "
        "--out, are read and written on the cluster, so point them at shared storage. Options of "
        "`submit` go before JOB; everything after JOB (and CONFIG) is passed to the job.",
        epilog=f"DeepSpeed presets for --deepspeed: {presets} "
        "(`unisrec deepspeed-preset NAME` prints one). "
        "Equivalent: ray job submit --address ADDR --working-dir . -- python -m recipes.cli JOB CONFIG ARGS...",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help="the head node's dashboard (default: $RAY_ADDRESS or %(default)s)",
    )
    p.add_argument(
        "--working-dir", default=".", help="directory uploaded with the job (default: .)"
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLFLOW_TRACKING_URI for the job (default: the nodes' own)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job",
    )
    p.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQUIREMENT",
        help="extra package for the job",
    )
    p.add_argument(
        "--deepspeed",
        choices=list(PRESETS),
        metavar="PRESET",
        help="pretrain only: ZeRO stage and precision",
    )
    p.add_argument("--submission-id", help="job id to use (default: Ray makes one)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="stream the job's logs until it ends; exit 0 only if it succeeded",
    )
    p.add_argument(
        "job",
        choices=SUBMITTABLE_JOBS,
        metavar="JOB",
        help="shard, pretrain, finetune or recommend-batch",
    )
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="[CONFIG] ARGS",
        help="shard, pretrain, finetune: the job's YAML config (inside the working directory), "
        "then overrides and options, e.g. optim.lr=3e-4 --num-workers 4; recommend-batch: its "
        "options, e.g. --tenant T --users /mnt/shared/users.parquet --out /mnt/shared/recs.parquet",
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "mlflow-server",
        help="run the MLflow tracking server the jobs log to (foreground; Ctrl-C stops it)",
        description="Starts `mlflow server` with a sqlite store under ROOT (or --backend-store-uri) and "
        "proxied artifacts under ROOT/artifacts (or --artifacts-destination), and prints the "
        "MLFLOW_TRACKING_URI to export. With --auth every call needs a user "
        "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and nobody may do anything the "
        "admin did not grant (`unisrec tenants`); the admin's password is read from "
        "$UNISREC_ADMIN_PASSWORD.",
    )
    p.add_argument(
        "--root", default="runs/mlflow", help="directory for the store, artifacts and server.log"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind: 127.0.0.1 serves this machine only; a cluster head binds its private IP "
        "so that the workers reach it",
    )
    p.add_argument(
        "--port", type=int, default=5000, help="0 = any free port (default: %(default)s)"
    )
    p.add_argument(
        "--backend-store-uri", default="", help="e.g. postgresql://user:pass@host/mlflow"
    )
    p.add_argument("--artifacts-destination", default="", help="e.g. s3://bucket/mlflow")
    p.add_argument(
        "--auth",
        action="store_true",
        help="users and permissions (MLflow's basic-auth app); needs $UNISREC_ADMIN_PASSWORD",
    )
    p.add_argument("--admin-user", default="admin", help="with --auth: the admin's user name")
    p.add_argument(
        "--auth-db-uri",
        default="",
        help="with --auth: the user store (default sqlite under ROOT/auth)",
    )
    p.set_defaults(func=cmd_mlflow_server)

    p = sub.add_parser(
        "tenants",
        help="tenants' users and permissions on a tracking server started with --auth (admin)",
        description="Run with the admin's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
        "against MLFLOW_TRACKING_URI (or --tracking-uri). A tenant T gets EDIT on its registered "
        "model unisrec-adaptor-T and its experiment unisrec-finetune-T (both created here) and "
        "READ on the backbones; a reader gets READ on every tenant's adaptors and runs and on "
        "the backbones (what `unisrec serve` needs). Nobody else gets anything.",
    )
    tenants_sub = p.add_subparsers(dest="tenants_command", required=True, metavar="SUBCOMMAND")
    s = tenants_sub.add_parser(
        "add",
        help="a tenant's user, registered model and experiment, and its permissions",
        description="Creates user NAME with the password in FILE (or sets it, if the user "
        "exists), registered model unisrec-adaptor-NAME and experiment unisrec-finetune-NAME "
        "(tagged unisrec.tenant=NAME) with EDIT for NAME, revokes other users' own grants on "
        "them, and gives NAME READ on every backbone (role unisrec-tenants).",
    )
    s.add_argument("name", metavar="NAME", help="the tenant (a-z, 0-9, '_', '-')")
    s.set_defaults(func=cmd_tenants_add)
    s = tenants_sub.add_parser(
        "add-variant",
        help="a tenant's second adaptor model, unisrec-adaptor-NAME.VARIANT",
        description="Creates registered model unisrec-adaptor-NAME.VARIANT (tagged "
        "unisrec.tenant=NAME) with EDIT for tenant NAME, revokes other users' own grants on it "
        "and syncs the roles; a fine-tune with mlflow.registered_model=unisrec-adaptor-NAME."
        "VARIANT then registers there. Tenants cannot create models on a server with users.",
    )
    s.add_argument("name", metavar="NAME", help="the tenant (added before)")
    s.add_argument("variant", metavar="VARIANT", help="a-z, 0-9, '_', '-'")
    s.set_defaults(func=cmd_tenants_add_variant)
    s = tenants_sub.add_parser(
        "add-reader",
        help="a read-only user for serving: READ on every tenant's adaptors and the backbones",
        description="Creates user NAME with the password in FILE (or sets it) and gives it READ "
        "on every adaptor model, fine-tune experiment and backbone (role unisrec-readers).",
    )
    s.add_argument("name", metavar="NAME")
    s.set_defaults(func=cmd_tenants_add_reader)
    for s in (tenants_sub.choices["add"], tenants_sub.choices["add-reader"]):
        s.add_argument(
            "--password-file",
            required=True,
            metavar="FILE",
            help="the user's password (12 characters or more; one trailing newline is dropped)",
        )
    s = tenants_sub.add_parser(
        "sync",
        help="grant the roles READ on backbones and adaptors registered since the last add",
        description="Gives role unisrec-tenants READ on every backbone (and the experiments of "
        "its runs) and role unisrec-readers READ on those and on every adaptor model and "
        "fine-tune experiment. `tenants add` and `add-reader` do this too. A backbone counts "
        "only if an admin or a pretraining user (role unisrec-pretrainers) holds MANAGE on it "
        "(as its creator does) and nobody else holds a grant of its own; the others are "
        "listed under refused_backbones and granted to nobody.",
    )
    s.add_argument(
        "--pretrain-users",
        default="",
        metavar="A,B",
        help="users that register backbones (pretraining jobs); added to the role "
        "unisrec-pretrainers, which is kept for later syncs",
    )
    s.set_defaults(func=cmd_tenants_sync)
    s = tenants_sub.add_parser(
        "list",
        help="every user, what kind it is, and its permissions",
        description="One line per user and permission: user, kind (admin, tenant, reader, "
        "user), permission, resource, and whether the grant is the user's own or a role's.",
    )
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.set_defaults(func=cmd_tenants_list)
    for s in tenants_sub.choices.values():
        s.add_argument(
            "--tracking-uri", default="", help="the tracking server (default $MLFLOW_TRACKING_URI)"
        )

    p = sub.add_parser(
        "deepspeed-preset",
        help="print a named DeepSpeed config (no NAME: list the presets)",
        description="Prints the DeepSpeed config JSON that pretraining uses for the preset.",
    )
    p.add_argument("name", nargs="?", choices=list(PRESETS), metavar="NAME")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=256,
        help="sequences per worker per step (data.batch_size)",
    )
    p.add_argument(
        "--grad-clip", type=float, default=1.0, help="gradient norm clip (optim.grad_clip; 0 = off)"
    )
    p.set_defaults(func=cmd_deepspeed_preset)


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.jobs import follow, follow_hint, job_spec, submit
    from unisrec.access import Credentials, credentials_package

    job_args, config = list(args.args), None
    if args.job in CONFIG_JOBS:
        if not job_args or job_args[0].startswith("-"):
            raise ConfigError(f"submit {args.job}: name the job's CONFIG (a YAML file) after JOB")
        config, job_args = job_args[0], job_args[1:]
    if args.deepspeed:
        if args.job != "pretrain":
            raise ConfigError(f"--deepspeed: only pretrain jobs use DeepSpeed, not {args.job}")
        job_args += preset_overrides(args.deepspeed)
    if config is None:
        _check_options(args.job, job_args)
    else:
        _check_config(args.job, config, job_args)
    # The job calls the tracking server as the submitting user, read from a private file
    # uploaded with it (never its environment, which Ray shows to anyone on the dashboard).
    with credentials_package(Credentials.current()) as credentials:
        spec = job_spec(
            args.job,
            config,
            job_args,
            working_dir=args.working_dir,
            tracking_uri=args.tracking_uri,
            env=_parse_env(args.env),
            pip=args.pip,
            credentials=credentials,
        )
        job_id = submit(args.address, spec, submission_id=args.submission_id)
    print(f"submitted {args.job} job {job_id} to {args.address}: {spec.entrypoint}")
    if not args.wait:
        print(follow_hint(args.address, job_id))
        return 0
    status = follow(args.address, job_id)
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_mlflow_server(args: argparse.Namespace) -> int:
    from cluster.mlflow_server import AuthSettings, start_server, stop_server

    auth = AuthSettings.from_env(args.admin_user, args.auth_db_uri) if args.auth else None
    server = start_server(
        args.root,
        host=args.host,
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        auth=auth,
    )
    print(f"MLflow tracking server at {server.url} (log: {server.log_path}); Ctrl-C stops it.")
    print(f"  export MLFLOW_TRACKING_URI={server.url}", flush=True)
    if auth is not None:
        print(
            f"  users on: every call needs MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
            f"(admin: {auth.admin_username}); `unisrec tenants add NAME --password-file F`",
            flush=True,
        )
    # `kill PID` (as a process supervisor stops it) must also stop the server's children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(server)


def cmd_tenants_add(args: argparse.Namespace) -> int:
    from cluster.accounts import add_tenant, connect, read_password_file

    password = read_password_file(args.password_file)
    print(json.dumps(add_tenant(connect(args.tracking_uri), args.name, password), indent=2))
    return 0


def cmd_tenants_add_variant(args: argparse.Namespace) -> int:
    from cluster.accounts import add_variant, connect

    print(json.dumps(add_variant(connect(args.tracking_uri), args.name, args.variant), indent=2))
    return 0


def cmd_tenants_add_reader(args: argparse.Namespace) -> int:
    from cluster.accounts import add_reader, connect, read_password_file

    password = read_password_file(args.password_file)
    print(json.dumps(add_reader(connect(args.tracking_uri), args.name, password), indent=2))
    return 0


def cmd_tenants_sync(args: argparse.Namespace) -> int:
    from cluster.accounts import connect, sync

    users = [u.strip() for u in args.pretrain_users.split(",") if u.strip()]
    print(json.dumps(sync(connect(args.tracking_uri), users), indent=2))
    return 0


def cmd_tenants_list(args: argparse.Namespace) -> int:
    from cluster.accounts import connect, format_user_rows, user_rows

    rows = user_rows(connect(args.tracking_uri))
    print(json.dumps(rows, indent=2) if args.json else format_user_rows(rows))
    return 0


def cmd_deepspeed_preset(args: argparse.Namespace) -> int:
    if args.name is None:
        for name, (stage, precision) in PRESETS.items():
            print(f"{name:12s} ZeRO stage {stage}, {precision}")
        return 0
    print(f"# pretrain overrides: {' '.join(preset_overrides(args.name))}", file=sys.stderr)
    print(json.dumps(preset(args.name, args.micro_batch, args.grad_clip), indent=2))
    return 0


def _check_config(job: str, config: str, job_args: list[str]) -> None:
    """Load CONFIG with the job's ``key=value`` overrides here, before anything is uploaded:
    a typo fails in a second rather than after the cluster has started the job."""
    from unisrec.config import load_config
    from unisrec.jobs import config_class

    overrides = [a for a in job_args if "=" in a and not a.startswith("-")]
    load_config(config_class(job), config, overrides)


def _check_options(job: str, job_args: list[str]) -> None:
    """Parse a job's options here, before anything is uploaded: a missing or misspelt option
    fails at once (argparse says which and exits) rather than on the cluster."""
    from serving.commands import register_commands

    parser = argparse.ArgumentParser(prog="unisrec submit")
    register_commands(parser.add_subparsers(dest="command", required=True))
    parser.parse_args([job, *job_args])


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env
