"""The pretraining-mix row: length-bucketed batches against plain shuffled ones on the
games + office + movielens mix, and (optionally) an experiment cell's held-out loss curve.

    python benchmarks/bench_pretrain_mix.py --data runs/shared-data [--steps 32]
    python benchmarks/bench_pretrain_mix.py --data D --experiment runs/experiment-cpu --cell all

``--data``: one process trains ``--steps`` steps of ``--batch-size`` windows from the stream,
first as plain shuffled batches (padded to their longest row), then with ``--bucket-batches``
length buckets, same model and seed, in the same run; next-item targets (queries) per
second, non-padding tokens per second and the padding share of the encoded positions.
``--experiment``: adds the cell's own throughput (the pretraining job's mean over its logged
windows) and held-out loss history from ``<experiment>/results.json``, and copies the
held-out curve to ``docs/heldout_loss.png``.

Writes ``benchmarks/results/pretrain_mix.json`` (or ``--out``), with the load average
before and after.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch
from bench_pretrain import formulation_throughput
from machine_load import LoadAverage

from pretrain.losses import pretrain_loss

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pretrain_mix.json"


def bucketing(data: Path, steps: int, batch_size: int, bucket_batches: int) -> dict:
    """Plain vs length-bucketed batches, the same number of steps each."""
    runs = {
        name: formulation_throughput(
            data,
            pretrain_loss,
            steps,
            batch_size,
            hidden_size=300,
            bucket_batches=buckets,
            roofline=False,
        )  # fmt: skip
        for name, buckets in (("plain", 0), ("length_buckets", bucket_batches))
    }
    plain, bucketed = runs["plain"], runs["length_buckets"]
    return {
        **runs,
        "speedup_targets_per_second": bucketed["targets_per_second"] / plain["targets_per_second"],
        "speedup_tokens_per_second": bucketed["tokens_per_second"] / plain["tokens_per_second"],
    }


def experiment_cell(experiment: Path, cell: str) -> dict:
    """A pretraining cell's throughput and held-out curve from an experiment's results."""
    summary = json.loads((experiment / "results.json").read_text())[f"pretrain/{cell}"]
    png = experiment / "report" / "heldout.png"
    if png.exists():
        shutil.copy(png, ROOT / "docs" / "heldout_loss.png")
    keys = (
        "run_id", "steps", "samples_seen", "num_workers", "zero_stage", "wall_seconds",
        "sequences_per_second", "tokens_per_second", "targets_per_second",
        "heldout_history", "heldout_epochs", "best_heldout", "registered_step",
        "stopped_on_plateau",
    )  # fmt: skip
    return {"cell": cell, **{key: summary.get(key) for key in keys}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="dataset dir with pretraining shards")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bucket-batches", type=int, default=16)
    parser.add_argument("--experiment", type=Path, help="an experiment's output_dir")
    parser.add_argument("--cell", default="all", help="its pretraining cell")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.data or args.experiment):
        parser.error("give --data, --experiment or both")

    load = LoadAverage()
    torch.set_num_threads(2)
    row: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if args.data:
        row["data"] = str(args.data)
        row["bucketing"] = bucketing(args.data, args.steps, args.batch_size, args.bucket_batches)
    if args.experiment:
        row["experiment_cell"] = experiment_cell(args.experiment, args.cell)
    row["load"] = load.record()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    shown = {k: v for k, v in row.items() if k != "experiment_cell"}
    print(json.dumps(shown, indent=2))
    return row


if __name__ == "__main__":
    main()
