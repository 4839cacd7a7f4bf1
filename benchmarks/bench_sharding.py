"""Shard writing (sequences/s) and streaming read (batches/s) on a real dataset directory.

    python benchmarks/bench_sharding.py --data runs/shared-data

Re-writes the pretraining shards of ``--data`` into a scratch directory (same samples, same
shard count), then streams them back as padded batches with 0 and 2 loader workers.
Writes benchmarks/results/sharding.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine_load import LoadAverage

from sharding.dataset import Dataset
from sharding.pretrain_shards import pretraining_samples, write_shards
from sharding.stream import ShardSpec, ShardStream

RESULTS = Path(__file__).parent / "results" / "sharding.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/shared-data"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load = LoadAverage()

    ds = Dataset(args.data)
    domains = [
        (d.name, d.domain_id, d.offset, [list(s) for s in ds.split(d.name, "train")["items"]])
        for d in ds.domains.values()
        if d.pretrain
    ]
    max_seq_len = ds.manifest["shards"]["max_seq_len"]
    num_shards = len(ds.manifest["shards"]["files"])
    results: dict = {"data": str(args.data), "num_shards": num_shards}

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        samples = pretraining_samples(domains, max_seq_len)
        windows_s = time.perf_counter() - started
        write_times = []
        for r in range(args.repeats):
            started = time.perf_counter()
            records = write_shards(samples, Path(tmp) / f"w{r}", num_shards, seed=0)
            write_times.append(time.perf_counter() - started)
        best = min(write_times)
        results["write"] = {
            "sequences": len(samples),
            "windowing_seconds": windows_s,
            "write_seconds_best_of": best,
            "sequences_per_second": len(samples) / best,
            "bytes": sum(r["bytes"] for r in records),
        }

        specs = [ShardSpec(str(Path(tmp) / "w0" / r["name"]), r["num_samples"]) for r in records]
        for workers in (0, 2):
            stream = ShardStream(specs, args.batch_size, num_workers=workers, seed=0)
            started = time.perf_counter()
            batches = sum(1 for _ in stream.epoch(0))
            elapsed = time.perf_counter() - started
            results[f"read_{workers}_workers"] = {
                "batches": batches,
                "batch_size": args.batch_size,
                "seconds": elapsed,
                "batches_per_second": batches / elapsed,
                "sequences_per_second": len(samples) / elapsed,
            }

    results["load"] = load.record()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
