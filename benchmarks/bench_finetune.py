"""Fine-tuning epoch time and full-ranking evaluation throughput on one dataset domain.

Times ``--epochs`` training epochs of the fine-tuning recipe (no MLflow, no checkpoints) and
one full-ranking pass over the valid users (every user against every item), and reports
seconds per epoch, training windows/s, next-item targets/s, evaluated users/s, peak RSS, and
the roofline: the matrix products the epoch (and the evaluation) did, counted from the shapes
they ran on (benchmarks/roofline.py), the time plain fp32 products of the same shapes take
here in the same run, and ``roofline_fraction`` = that time / the measured time = achieved
FLOP/s over the matmul peak. The evaluation's ``eval_roofline_fraction`` compares its
achieved FLOP/s with the large square product's (``square_gemm_gflops``, same run): a
same-shape peak is no roof for it (see benchmarks/roofline.py). ``--epochs 0`` times the
evaluation alone (of an untrained model). ``--profile-steps K`` adds a torch.profiler table
of K steps::

    .venv/bin/python benchmarks/bench_finetune.py                       # runs/shared-data, scientific
    .venv/bin/python benchmarks/bench_finetune.py --mode transductive --epochs 1
    .venv/bin/python benchmarks/bench_finetune.py --epochs 0 --threads 2       # evaluation only
    .venv/bin/python benchmarks/bench_finetune.py --data-dir /tmp/small --domain office --hidden-size 32
    .venv/bin/python benchmarks/bench_finetune.py --data-dir D --epochs 1 --profile-steps 5 --out F.json

``--backbone none`` (default) trains the whole UniSRec from scratch, the heaviest case; with
``--backbone models:/NAME@ALIAS`` (and $MLFLOW_TRACKING_URI) only the adaptor trains.
Writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch
from machine_load import LoadAverage
from roofline import ShapeRecorder, gemm_seconds, square_gemm_gflops

from adaptors.config import FinetuneConfig
from adaptors.evaluate import load_eval_data, rank_split
from adaptors.finetune import (
    TrainingWindows,
    load_windows,
    make_optimizer,
    prepare_model,
    train_epoch,
)
from pretrain.flops import total_flops
from sharding.dataset import Dataset
from unisrec.config import from_dict
from unisrec.tracking import git_commit

REPO = Path(__file__).resolve().parents[1]


def significant(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits: a tiny fraction stays above 0."""
    return float(f"{x:.{digits}g}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="runs/shared-data", help="dataset directory")
    parser.add_argument("--domain", default="scientific")
    parser.add_argument("--mode", choices=["inductive", "transductive"], default="inductive")
    parser.add_argument("--baseline", choices=["unisrec", "sasrec"], default="unisrec")
    parser.add_argument("--backbone", default="none", help="none or a models:/ URI")
    parser.add_argument("--hidden-size", type=int, default=300)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=FinetuneConfig().optim.batch_size,
        help="optim.batch_size: next-item targets a step (default: the config's)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=1024, help="users per scoring block")
    parser.add_argument("--item-block", type=int, default=16384, help="items per scoring block")
    parser.add_argument("--epochs", type=int, default=2, help="0: time the evaluation only")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = torch's default)"
    )
    parser.add_argument(
        "--profile-steps", type=int, default=0, help="torch.profiler table of this many steps"
    )
    parser.add_argument(
        "--square-size", type=int, default=2048, help="side of the square product timed alone"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/finetune.json")
    args = parser.parse_args(argv)
    load = LoadAverage()

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
            "eval": {"batch_size": args.eval_batch_size, "item_block": args.item_block},
        },
    )
    dataset = Dataset(cfg.data.dir)
    model, spec, trainable = prepare_model(cfg, dataset, cfg.backbone)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    max_len = model.max_seq_len
    data = load_eval_data(dataset, cfg.data.domain, max_len, device)
    windows = load_windows(dataset, cfg.data.domain, max_len)
    optimizer = make_optimizer(trainable, cfg)
    recorder = ShapeRecorder(model)

    epoch_seconds = []
    for epoch in range(args.epochs):
        recorder.clear()
        started = time.perf_counter()
        loss = train_epoch(model, windows, data.text_table, optimizer, cfg, epoch)
        epoch_seconds.append(time.perf_counter() - started)
        print(f"epoch {epoch + 1}: loss {loss:.4f}, {epoch_seconds[-1]:.1f} s")
    train_gemms = recorder.gemms(training=True, backward=True, text_dim=dataset.encoder_dim)

    recorder.clear()
    started = time.perf_counter()
    ranks = rank_split(
        model,
        data.valid,
        data.text_table,
        temperature=cfg.temperature,
        batch_size=args.eval_batch_size,
        item_block=args.item_block,
    )
    eval_seconds = time.perf_counter() - started
    eval_gemms = recorder.gemms(training=False, backward=False, text_dim=dataset.encoder_dim)
    recorder.detach()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else None

    # The matmul peak, measured now: the same products as plain fp32 torch.mm calls.
    train_peak_seconds = gemm_seconds(train_gemms, device=str(device))
    eval_peak_seconds = gemm_seconds(eval_gemms, device=str(device))
    square_gflops = square_gemm_gflops(args.square_size, device=str(device))
    profile = profile_steps(model, windows, data, optimizer, cfg, args.profile_steps)
    mean_epoch = sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else 0.0
    last_epoch = epoch_seconds[-1] if epoch_seconds else 0.0
    train_flops, eval_flops = total_flops(train_gemms), total_flops(eval_gemms)
    targets = int((windows.targets > 0).sum())
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
        "commit": git_commit(),
        "batch_size": args.batch_size,
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "mean_epoch_seconds": round(mean_epoch, 3),
        "train_windows_per_s": round(len(windows) / mean_epoch, 1) if mean_epoch else None,
        "train_targets": targets,
        "train_targets_per_s": round(targets / mean_epoch, 1) if mean_epoch else None,
        "eval_seconds": round(eval_seconds, 3),
        "eval_users_per_s": round(len(ranks) / eval_seconds, 1),
        "peak_rss_gib": round(peak_rss / 2**30, 3),
        "peak_gpu_memory_gib": round(peak_gpu / 2**30, 3) if peak_gpu is not None else None,
        # roofline of the last epoch and of the evaluation (see benchmarks/roofline.py)
        "train_gflop": round(train_flops / 1e9, 1),
        "train_achieved_gflops": round(train_flops / last_epoch / 1e9, 2) if last_epoch else None,
        "train_matmul_peak_gflops": (
            round(train_flops / train_peak_seconds / 1e9, 2) if train_peak_seconds else None
        ),
        "roofline_fraction": significant(train_peak_seconds / last_epoch) if last_epoch else None,
        "eval_gflop": round(eval_flops / 1e9, 1),
        "eval_achieved_gflops": round(eval_flops / eval_seconds / 1e9, 2),
        "eval_matmul_peak_gflops": round(eval_flops / eval_peak_seconds / 1e9, 2),
        "eval_roofline_fraction": significant(eval_flops / eval_seconds / 1e9 / square_gflops),
        "square_size": args.square_size,
        "square_gemm_gflops": round(square_gflops, 2),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load": load.record(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    if profile:
        table = args.out.with_suffix(".profile.txt")
        table.write_text(profile, encoding="utf-8")
        print(profile)


def profile_steps(
    model, windows: TrainingWindows, data, optimizer, cfg: FinetuneConfig, steps: int
) -> str:
    """torch.profiler's top ops (by own CPU time) over about ``steps`` training steps of
    ``optim.batch_size`` next-item targets (random windows); "" if 0."""
    if steps <= 0:
        return ""
    from torch.profiler import ProfilerActivity, profile

    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    counts = (windows.targets[order] > 0).sum(dim=1)
    before = counts.cumsum(0) - counts  # targets ahead of each window in this order
    short = order[before < steps * cfg.optim.batch_size]
    subset = TrainingWindows(windows.inputs[short], windows.targets[short])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_epoch(model, subset, data.text_table, optimizer, cfg, epoch=0)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


if __name__ == "__main__":
    main()
