"""Pretraining throughput: 1 vs 2 Ray Train workers, and the all-prefix causal formulation
against the naive one (every prefix its own padded sample, adaptor on every position).

    python benchmarks/bench_pretrain.py --data runs/shared-data [--steps 30] [--skip-ray]
    python benchmarks/bench_pretrain.py --data D --ray-workers 1 --work /tmp/w --out F.json

Rates are sequences/s, non-padding tokens/s and next-item targets/s (the seq-item loss's
queries: every prefix with a next item; the official code's "training pairs"). For the
in-process formulations also the roofline: the matrix products of the timed steps, recorded
with their shapes on an untimed replay of the same batches, over the time plain fp32
products of the same shapes take here in the same run (benchmarks/roofline.py).

Writes benchmarks/results/pretrain.json (or --out). Numbers compared with each other come
from the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from machine_load import LoadAverage
from roofline import gemm_seconds

from pretrain.flops import Gemm
from unisrec.runtime import use_loopback

use_loopback()

from pretrain.config import LossConfig, PretrainConfig  # noqa: E402
from pretrain.gather import Gather  # noqa: E402
from pretrain.losses import pretrain_loss  # noqa: E402
from pretrain.model import UniSRec  # noqa: E402
from pretrain.naive import naive_pretrain_loss  # noqa: E402
from sharding.dataset import Dataset  # noqa: E402
from sharding.stream import ShardStream  # noqa: E402
from unisrec.config import load_config  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pretrain.json"


def formulation_throughput(
    data: Path,
    loss_fn,
    steps: int,
    batch_size: int,
    hidden_size: int,
    warmup: int = 2,
    bucket_batches: int = 0,
    roofline: bool = True,
) -> dict:
    """Train ``steps`` steps in one process; sequences, non-padding tokens and next-item
    targets per second, padded positions, and (``roofline``) the roofline of the timed
    steps. ``bucket_batches``: the stream's length buckets (0 = plain shuffled batches)."""
    cfg = PretrainConfig()
    cfg.model.hidden_size = hidden_size
    ds = Dataset(data)
    table = torch.from_numpy(ds.global_embeddings())
    worddrop = torch.from_numpy(ds.global_embeddings(worddrop=True))
    torch.manual_seed(0)
    model = UniSRec(cfg.model, text_dim=ds.encoder_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = ShardStream(
        ds.shard_specs(), batch_size=batch_size, seed=0, bucket_batches=bucket_batches
    )
    sequences = tokens = targets = padded = 0
    elapsed = 0.0
    timed = []

    def step(index, batch):
        out = loss_fn(
            model, batch, table, worddrop, LossConfig(), step=index, seed=0, gather=Gather.single()
        )
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        return out

    for index, batch in enumerate(stream.epoch(0)):
        if index == warmup + steps:
            break
        start = time.perf_counter()
        step(index, batch)
        if index >= warmup:
            elapsed += time.perf_counter() - start
            sequences += int((batch["lengths"] > 0).sum())
            tokens += int(batch["lengths"].sum())
            # The queries: positions past a window's history-only part with a next item.
            queries = batch["lengths"] - 1 - batch["first_query"]
            targets += int(queries.clamp(min=0).sum())
            padded += int(batch["items"].shape[1] * (batch["lengths"] > 0).sum())
            timed.append((index, batch))
    rates = {
        "steps": steps,
        "batch_size": batch_size,
        "bucket_batches": bucket_batches,
        "seconds": elapsed,
        "sequences_per_second": sequences / elapsed,
        "tokens_per_second": tokens / elapsed,
        "targets_per_second": targets / elapsed,
        "padding_fraction": 1 - tokens / max(padded, 1),  # of the positions the encoder ran
    }
    if not roofline:
        return rates
    gemms = replay_gemms(step, timed)
    flops = sum(g.flops for g in gemms)
    peak_seconds = gemm_seconds(gemms)
    return {
        **rates,
        "gflop": flops / 1e9,
        "achieved_gflops": flops / elapsed / 1e9,
        "matmul_peak_gflops": flops / peak_seconds / 1e9,
        "roofline_fraction": peak_seconds / elapsed,
    }


def replay_gemms(step, timed: list) -> list[Gemm]:
    """The matrix products (mm, addmm, bmm, baddbmm) of the timed steps, recorded with their
    shapes while replaying them (parameters change on the way; shapes do not)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gemms: list[Gemm] = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm"):
                a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
                gemms.append(Gemm(a.shape[0], a.shape[1], b.shape[1]))
            elif name in ("bmm", "baddbmm"):
                a, b = (args[1], args[2]) if name == "baddbmm" else (args[0], args[1])
                gemms.append(Gemm(a.shape[1], a.shape[2], b.shape[2], a.shape[0]))
            return out

    with Products():
        for index, batch in timed:
            step(index, batch)
    return gemms


def ray_throughput(
    data: Path, workers: int, steps: int, batch_size: int, hidden_size: int, out: Path
) -> dict:
    from pretrain.job import run_pretrain

    cfg = load_config(
        PretrainConfig,
        None,
        [
            f"data.dir={data}",
            f"data.batch_size={batch_size}",
            f"model.hidden_size={hidden_size}",
            f"distributed.num_workers={workers}",
            f"distributed.cpus_per_worker={2 // workers}",
            "distributed.zero_stage=2",
            f"distributed.checkpoint_every={steps}",
            f"optim.max_steps={steps}",
            "log_every=5",
            f"output_dir={out / f'workers-{workers}'}",
            f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            f"mlflow.registered_model=bench-backbone-{workers}",
        ],
    )
    summary = run_pretrain(cfg)
    return {
        "workers": workers,
        "cpus_per_worker": 2 // workers,
        "batch_per_worker": batch_size,
        "steps": steps,
        "sequences_per_second": summary["sequences_per_second"],
        "tokens_per_second": summary["tokens_per_second"],
        "targets_per_second": summary.get("targets_per_second"),
        "wall_seconds_including_startup": summary["wall_seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/shared-data"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=300)
    parser.add_argument("--skip-ray", action="store_true", help="only the formulation comparison")
    parser.add_argument(
        "--ray-workers", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="Ray Train runs"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench-pretrain"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load = LoadAverage()
    torch.set_num_threads(2)
    efficient = formulation_throughput(
        args.data, pretrain_loss, args.steps, args.batch_size, args.hidden_size
    )
    naive = formulation_throughput(
        args.data, naive_pretrain_loss, max(args.steps // 4, 3), args.batch_size, args.hidden_size
    )
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "data": str(args.data),
        "formulation": {
            "all_prefix_causal": efficient,
            "naive_every_prefix": naive,
            "speedup_sequences_per_second": efficient["sequences_per_second"]
            / naive["sequences_per_second"],
        },
    }
    if not args.skip_ray:
        runs = {
            workers: ray_throughput(
                args.data, workers, args.steps, args.batch_size, args.hidden_size, args.work
            )
            for workers in args.ray_workers
        }
        results["ray_train"] = {
            ("1_worker" if workers == 1 else f"{workers}_workers"): run
            for workers, run in runs.items()
        }
        if 1 in runs and 2 in runs:
            results["ray_train"]["ratio_2_over_1"] = (
                runs[2]["sequences_per_second"] / runs[1]["sequences_per_second"]
            )
    results["load"] = load.record()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
