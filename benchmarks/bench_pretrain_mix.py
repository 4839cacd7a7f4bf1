"""The pretraining-mix row: throughput and held-out loss of an experiment's pretraining cell.

    python benchmarks/bench_pretrain_mix.py --experiment runs/experiment-cpu [--cell all]

Reads the cell's pretraining summary from ``<experiment>/results.json`` (written by
``unisrec experiment``), writes ``benchmarks/results/pretrain_mix.json`` and copies the
held-out loss curve to ``docs/heldout_loss.png``. Throughput is the job's own mean over its
logged windows (Ray and DeepSpeed start-up excluded); next-item targets per second are
non-padding tokens per second minus sequences per second (a window of n items has n - 1
targets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pretrain_mix.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="an experiment's output_dir")
    parser.add_argument("--cell", default="all", help="pretraining cell name")
    args = parser.parse_args()
    exp = Path(args.experiment)
    summary = json.loads((exp / "results.json").read_text())[f"pretrain/{args.cell}"]
    row = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "cell": args.cell,
        "run_id": summary["run_id"],
        "steps": summary["steps"],
        "samples_seen": summary["samples_seen"],
        "num_workers": summary["num_workers"],
        "zero_stage": summary["zero_stage"],
        "wall_seconds": summary["wall_seconds"],
        "sequences_per_second": summary["sequences_per_second"],
        "tokens_per_second": summary["tokens_per_second"],
        "targets_per_second": summary["tokens_per_second"] - summary["sequences_per_second"],
        "heldout_history": summary["heldout_history"],
        "heldout_epochs": summary.get("heldout_epochs"),
        "best_heldout": summary["best_heldout"],
        "registered_step": summary["registered_step"],
    }
    RESULTS.write_text(json.dumps(row, indent=2))
    png = exp / "report" / "heldout.png"
    if png.exists():
        shutil.copy(png, ROOT / "docs" / "heldout_loss.png")
    print(json.dumps({k: v for k, v in row.items() if "history" not in k}, indent=2))


if __name__ == "__main__":
    main()
