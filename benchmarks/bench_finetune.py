"""Fine-tuning epoch time and full-ranking evaluation throughput on one dataset domain.

Times ``--epochs`` training epochs of the fine-tuning recipe (no MLflow, no checkpoints) and
one full-ranking pass over the valid users (every user against every item), and reports
seconds per epoch, training windows/s and evaluated users/s::

    .venv/bin/python benchmarks/bench_finetune.py                       # runs/shared-data, scientific
    .venv/bin/python benchmarks/bench_finetune.py --mode transductive --epochs 1
    .venv/bin/python benchmarks/bench_finetune.py --data-dir /tmp/small --domain office --hidden-size 32

``--backbone none`` (default) trains the whole UniSRec from scratch, the heaviest case; with
``--backbone models:/NAME@ALIAS`` (and $MLFLOW_TRACKING_URI) only the adaptor trains.
Writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from adaptors.config import FinetuneConfig
from adaptors.evaluate import load_eval_data, rank_split
from adaptors.finetune import load_windows, prepare_model, train_epoch
from sharding.dataset import Dataset
from unisrec.config import from_dict

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="runs/shared-data", help="dataset directory")
    parser.add_argument("--domain", default="scientific")
    parser.add_argument("--mode", choices=["inductive", "transductive"], default="inductive")
    parser.add_argument("--baseline", choices=["unisrec", "sasrec"], default="unisrec")
    parser.add_argument("--backbone", default="none", help="none or a models:/ URI")
    parser.add_argument("--hidden-size", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256, help="training windows per step")
    parser.add_argument("--eval-batch-size", type=int, default=1024, help="users per scoring batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = torch's default)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/finetune.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backbone != "none":
        from unisrec.tracking import configure_mlflow

        configure_mlflow()
    cfg = from_dict(
        FinetuneConfig,
        {
            "tenant": "bench",
            "data": {"dir": args.data_dir, "domain": args.domain},
            "backbone": args.backbone,
            "mode": args.mode,
            "baseline": args.baseline,
            "model": {"hidden_size": args.hidden_size},
            "optim": {"batch_size": args.batch_size},
            "eval": {"batch_size": args.eval_batch_size},
        },
    )
    dataset = Dataset(cfg.data.dir)
    model, spec, trainable = prepare_model(cfg, dataset, cfg.backbone)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    max_len = model.max_seq_len
    data = load_eval_data(dataset, cfg.data.domain, max_len, device)
    windows = load_windows(dataset, cfg.data.domain, max_len)
    optimizer = torch.optim.Adam(trainable, lr=cfg.optim.lr)

    epoch_seconds = []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        loss = train_epoch(model, windows, data.text_table, optimizer, cfg, epoch)
        epoch_seconds.append(time.perf_counter() - started)
        print(f"epoch {epoch + 1}: loss {loss:.4f}, {epoch_seconds[-1]:.1f} s")

    started = time.perf_counter()
    ranks = rank_split(
        model,
        data.valid,
        data.text_table,
        temperature=cfg.temperature,
        batch_size=args.eval_batch_size,
    )
    eval_seconds = time.perf_counter() - started
    mean_epoch = sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else 0.0
    result = {
        "data_dir": str(Path(args.data_dir).resolve()),
        "domain": args.domain,
        "users": len(data.valid),
        "items": data.num_items,
        "training_windows": len(windows),
        "mode": args.mode,
        "baseline": args.baseline,
        "backbone": args.backbone,
        "hidden_size": spec.backbone_config["hidden_size"],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "batch_size": args.batch_size,
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "mean_epoch_seconds": round(mean_epoch, 3),
        "train_windows_per_s": round(len(windows) / mean_epoch, 1) if mean_epoch else None,
        "eval_seconds": round(eval_seconds, 3),
        "eval_users_per_s": round(len(ranks) / eval_seconds, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
