"""``unisrec``: the platform's command line. Each job reads a YAML config (any key can be
overridden as ``key=value``, dotted for nesting) and writes to an output directory.

Heavy libraries (torch, Ray, DeepSpeed, MLflow) are imported inside the commands, so
``unisrec --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from unisrec.access import load_credentials_package
from unisrec.jobs import JOB_CONFIGS, config_class
from unisrec.runtime import VERBOSE_ENV, quiet_libraries, use_loopback


def _guess_job(path: str) -> str:
    from unisrec.errors import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path} (`unisrec config init JOB` writes one)")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if "domains" in raw:
        return "shard"
    if "tenant" in raw or "tenants" in raw or "mode" in raw:
        return "finetune"
    return "pretrain"


def _load(job: str, path: str | None, overrides: list[str]):
    from unisrec.config import load_config

    return load_config(config_class(job), path, overrides)


def cmd_shard(args: argparse.Namespace) -> int:
    from sharding.job import run_shard_job

    cfg = _load("shard", args.config, args.overrides)
    manifest = run_shard_job(cfg, args.out, progress=not args.quiet)
    from sharding.stats import format_stats

    print(format_stats(manifest))
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from sharding.dataset import Dataset
    from sharding.stats import format_stats

    ds = Dataset(args.dir)
    if args.verify:
        ds.verify()
    print(json.dumps(ds.manifest["domains"], indent=2) if args.json else format_stats(ds.manifest))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from unisrec.config import dump_yaml

    job = args.job or _guess_job(args.config)
    print(f"# {job} config", file=sys.stderr)
    print(dump_yaml(_load(job, args.config, args.overrides)), end="")
    return 0


STARTER_JOBS = ("shard", "pretrain", "finetune")


def cmd_config_init(args: argparse.Namespace) -> int:
    from importlib.resources import files

    print(files("unisrec").joinpath("starters", f"{args.job}.yaml").read_text("utf-8"), end="")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain.job import run_pretrain

    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"distributed.num_workers={args.num_workers}")
    summary = run_pretrain(_load("pretrain", args.config, overrides), resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from experiments.runner import run_experiment

    cfg = _load("experiment", args.config, args.overrides)
    only = [c for c in (args.only or "").split(",") if c]
    fractions = [float(f) for f in (args.fractions or "").split(",") if f]
    summary = run_experiment(cfg, only=only, report_only=args.report_only, only_fractions=fractions)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recipes.demo import SMOKE, run_demo

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # `unisrec demo key=value`
        config, overrides = None, [config, *overrides]
    overrides = (SMOKE if args.smoke else []) + overrides
    if args.out:
        overrides.append(f"out={args.out}")
    run_demo(_load("demo", config, overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unisrec",
        description="UniSRec platform: shard text-rich interaction data, pretrain a universal "
        "sequence encoder with Ray Train + DeepSpeed, fine-tune per-tenant adaptors from the "
        "MLflow registry.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, Ray's own progress messages and known library warnings",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "shard",
        help="raw domain files -> dataset directory (splits, text vectors, webdataset shards)",
        description="Reads the raw files of every domain in CONFIG (formats: unisrec-atomic, "
        "recbole-atomic, csv, amazon-2018, online-retail), encodes item text, and writes "
        "OUT/manifest.json, OUT/domains/<name>/ (items, users, train/valid/test, embeddings) "
        "and OUT/shards/pretrain-*.tar.",
    )
    p.add_argument("config", help="shard job YAML (see benchmarks/configs/shared-data.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. processing.kcore=10")
    p.add_argument("--out", required=True, help="dataset directory to write (replaced atomically)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("data", help="inspect a dataset directory")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    s = data_sub.add_parser(
        "stats",
        help="per-domain users, items, interactions, tie groups, shards",
        description="Reads DIR/manifest.json.",
    )
    s.add_argument("dir")
    s.add_argument(
        "--json", action="store_true", help="print the manifest's domain records as JSON"
    )
    s.add_argument(
        "--verify", action="store_true", help="check every file against its sha256 digest"
    )
    s.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("config", help="starter configs and resolved configurations")
    cfg_sub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    s = cfg_sub.add_parser(
        "show",
        help="print CONFIG with defaults filled in and overrides applied",
        description="Reads CONFIG only.",
    )
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.add_argument(
        "--job", choices=sorted(JOB_CONFIGS), help="config type (guessed from the keys if omitted)"
    )
    s.set_defaults(func=cmd_config_show)
    s = cfg_sub.add_parser(
        "init",
        help="print a commented starter config for JOB (unisrec config init pretrain > my.yaml)",
        description="Prints a starter config shipped with the package; every key it leaves out "
        "has its default (`unisrec config show FILE` shows them all).",
    )
    s.add_argument("job", choices=STARTER_JOBS)
    s.set_defaults(func=cmd_config_init)

    p = sub.add_parser(
        "pretrain",
        help="pretrain the UniSRec backbone on the shards with Ray Train + DeepSpeed; register it in MLflow",
        description="Reads the dataset directory data.dir (manifest, text vectors, shards). Writes "
        "checkpoints under output_dir/ray, output_dir/summary.json and pretrain_loss.png, an MLflow run "
        "(params, per-step metrics, dataset input) and a registered backbone version with alias.",
    )
    p.add_argument("config", help="pretrain YAML (see benchmarks/configs/pretrain-shared.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. data.dir=runs/data optim.lr=3e-4"
    )
    p.add_argument("--num-workers", type=int, help="Ray Train workers (= distributed.num_workers)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped run in output_dir from its last checkpoint",
    )
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "experiment",
        help="a grid of pretraining and fine-tuning cells as Ray tasks; tables and figures",
        description="Reads CONFIG (see benchmarks/configs/experiment-scientific.yaml) and the "
        "dataset directory data_dir. Runs every pretraining and fine-tuning cell not yet in "
        "output_dir/results.json (one MLflow parent run, a child run per cell) and writes "
        "output_dir/report/ (markdown, JSON and PNG tables and figures).",
    )
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1]")
    p.add_argument("--only", help="run only these cells (comma-separated names)")
    p.add_argument(
        "--fractions", help="fine-tune only at these shares of the training users, e.g. 0.1"
    )
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite the reports")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "demo",
        help="the whole platform end to end: synthetic data -> shards -> pretrain -> tenant adaptors -> report",
        description="Without CONFIG: makes a seeded synthetic multi-domain data set, shards it, pretrains "
        "with 2 Ray workers (DeepSpeed ZeRO-2) into OUT/mlflow.db, fine-tunes tenants from the registry "
        "and from scratch, and prints metrics and example recommendations. Writes everything under OUT "
        "(default runs/demo): raw/, data/, pretrain/, finetune/<tenant>/, metrics.png, demo_summary.json. "
        "A CONFIG with data.shard_config runs it on real data.",
    )
    p.add_argument("config", nargs="?", help="demo YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.synthetic.scale=2")
    p.add_argument("--out", help="output directory (= out)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny and fast (CI): fewer users, 1 pretraining epoch"
    )
    p.set_defaults(func=cmd_demo)

    from adaptors.commands import register_commands as register_adaptor_commands
    from cluster.commands import register_commands as register_cluster_commands
    from serving.commands import register_commands as register_serving_commands

    register_adaptor_commands(sub)
    register_serving_commands(sub)
    register_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_loopback()  # before any command imports ray
    load_credentials_package()  # a submitted job's tracking user (unisrec/access.py)
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by Ray workers too (unisrec.runtime.ensure_ray)
    quiet_libraries()  # unless -v: library chatter off here and in the processes it starts
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from unisrec.errors import ConfigError, DataError, StorageError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # The tracking server refused a call that no job named a permission for (see
        # unisrec/access.py): still one line, not a traceback.
        from unisrec.access import refusal_message

        message = refusal_message(err) if "mlflow" in sys.modules else None
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
