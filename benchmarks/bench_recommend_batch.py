"""Users/s and peak memory of batch recommendations (``unisrec recommend-batch``).

    python benchmarks/bench_recommend_batch.py --users 200000 --actors 2

Builds a throw-away MLflow store under --work: a backbone of the paper's shape (hidden 300,
8 experts, 384-d text vectors; ``--model tiny`` for a small one), registered and pulled like a
pretrained one, and one promoted inductive tenant with --items items (fine-tuned for 0
epochs: ranking cost does not depend on training). Then it writes --users synthetic users
(histories of 5-20 random catalogue items) and times one ``recommend_batch`` over them: the
Ray start, the actors loading the model and the catalogue's item vectors, and the ranking.

Peak RSS is sampled every 0.2 s, of this process (the driver, which writes the output) and of
this process with all its descendants (with a local Ray: its daemons and the actors). Run it
with two --users sizes: the driver's peak should not grow with the users. Writes
benchmarks/results/recommend_batch.json (or --out), with the load average before and after
(benchmarks/machine_load.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
from machine_load import LoadAverage
from synthetic_tenants import build_tenants, item_key

RESULTS = Path(__file__).resolve().parent / "results" / "recommend_batch.json"
TENANT = "batch-shop"
MODELS = {
    "paper": ({}, 384),  # BackboneConfig defaults: hidden 300, 2 layers, 8 experts
    "tiny": ({"hidden_size": 16, "inner_size": 32, "num_experts": 2, "max_seq_len": 10}, 8),
}


def write_users(path: Path, users: int, items: int, chunk: int = 50_000) -> None:
    """``users`` rows of user, history (5-20 random item keys), written ``chunk`` at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serving.batch import USERS_SCHEMA

    rng = np.random.default_rng(1)
    with pq.ParquetWriter(path, USERS_SCHEMA) as writer:
        for start in range(0, users, chunk):
            rows = range(start, min(start + chunk, users))
            histories = [
                [item_key(TENANT, i) for i in rng.integers(1, items + 1, int(rng.integers(5, 21)))]
                for _ in rows
            ]
            writer.write_table(
                pa.table([[f"user-{u}" for u in rows], histories], schema=USERS_SCHEMA)
            )


class PeakRSS:
    """Peak resident memory (MB) of this process and of it with its descendants, sampled
    every ``interval`` seconds on a thread while in the ``with`` block."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.driver = 0.0
        self.total = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            rss = me.memory_info().rss
            total = rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # ended between the listing and the reading
                    pass
            self.driver = max(self.driver, rss / 2**20)
            self.total = max(self.total, total / 2**20)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/unisrec-bench-recommend-batch")
    parser.add_argument("--users", type=int, default=100_000, help="users to rank")
    parser.add_argument("--items", type=int, default=2000, help="catalogue size")
    parser.add_argument("--model", choices=sorted(MODELS), default="paper")
    parser.add_argument("-k", type=int, default=50)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from serving.batch import BatchConfig, recommend_batch
    from unisrec.runtime import use_loopback

    use_loopback()
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    shape, dim = MODELS[args.model]
    # 50 users: the fine-tune (0 epochs) needs data, not much of it
    uri = build_tenants(work, {TENANT: args.items}, 50, backbone=shape, text_dim=dim)
    users = work / "users.parquet"
    write_users(users, args.users, args.items)

    cfg = BatchConfig(
        tenant=TENANT,
        out=str(work / "recs.parquet"),
        users=str(users),
        k=args.k,
        batch_size=args.batch_size,
        actors=args.actors,
        tracking_uri=uri,
        progress=False,
    )
    load = LoadAverage()
    with PeakRSS() as peak:
        started = time.perf_counter()
        record = recommend_batch(cfg)
        seconds = time.perf_counter() - started
    report = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, CPU only",
        # The development machine is shared: the load average around the run.
        "load": load.record(),
        "setup": {
            "users": args.users,
            "items": args.items,
            "model": args.model,
            "k": args.k,
            "actors": args.actors,
            "batch_size": args.batch_size,
            "torch_threads_per_actor": cfg.torch_threads,
            "history": "5-20 items",
        },
        "seconds": round(seconds, 2),
        "users_per_second": round(record["users"]["read"] / seconds, 1),
        "rows": record["rows"],
        "peak_rss_mb": {"driver": round(peak.driver, 1), "with_ray": round(peak.total, 1)},
    }
    print(json.dumps(report, indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
