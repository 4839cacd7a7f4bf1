"""Full-ranking evaluation as the catalogue grows: time and peak memory at 4k, 100k and 1M
synthetic items, users and items scored in blocks (adaptors/evaluate.py).

    python benchmarks/bench_eval_scaling.py                      # 4,385 / 100k / 1M items
    python benchmarks/bench_eval_scaling.py --items 4385 100000 --users 512

Each size runs in its own process on random 384-d text vectors, a 300-d UniSRec in eval
mode and ``--users`` users with random 10-item histories. It times the steps of
``rank_split`` one by one (the adaptor over the catalogue, finding items of equal text, and
the ranking: encode users, score, count), and reports memory as ``peak RSS - RSS once the
inputs exist``: the working memory of evaluation. That includes the ``(N+1, H)`` item
vectors (``item_vectors_gib``; any method holds them); what evaluation needs beyond them
(``beyond_item_vectors_gib``) is what must stay flat as N grows. ``--unblocked`` adds, for
sizes up to 100k, the same ranking with one item block as large as the catalogue (how
evaluation worked before: memory grows with users x items).

The peak is the process's own high-water mark (``VmHWM``), reset once the inputs exist
(Linux ``/proc/self/clear_refs``), not ``ru_maxrss``: a child's ``ru_maxrss`` starts at its
parent's peak (it survives fork and exec), so it shows a large parent's memory, not the
evaluation's. Without ``/proc`` it falls back to ``ru_maxrss`` (``peak_source`` says which).
Writes benchmarks/results/eval_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine_load import LoadAverage

REPO = Path(__file__).resolve().parents[1]
STATUS = Path("/proc/self/status")


def reset_peak_rss() -> str:
    """Start a new high-water mark at the current RSS; returns how the peak will be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_rss(source: str) -> int:
    """Peak resident bytes: since :func:`reset_peak_rss` (VmHWM), or of the process."""
    if source == "VmHWM":
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def one_size(items: int, users: int, batch_size: int, item_block: int, threads: int) -> dict:
    import psutil
    import torch

    from adaptors.evaluate import (
        ADAPTOR_BLOCK,
        Ranks,
        TwinItems,
        catalogue_vectors_in_blocks,
        count_ranks_in_blocks,
        metrics_from_ranks,
    )
    from pretrain.model import BackboneConfig, UniSRec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UniSRec(BackboneConfig(), text_dim=384).eval()
    table = torch.randn(items + 1, 384)
    table[0] = 0
    histories = torch.randint(1, items + 1, (users, 10))
    lengths = torch.full((users,), 10)
    targets = torch.randint(1, items + 1, (users,))
    inputs_rss = psutil.Process().memory_info().rss
    source = reset_peak_rss()

    # The steps of adaptors.evaluate.rank_split, timed one by one.
    with torch.no_grad():
        started = time.perf_counter()
        vectors = catalogue_vectors_in_blocks(model, table, min(item_block, ADAPTOR_BLOCK))
        adaptor_seconds = time.perf_counter() - started
        started = time.perf_counter()
        twins = TwinItems.of(model, table)
        twin_seconds = time.perf_counter() - started
        started = time.perf_counter()
        greater, ties = [], []
        for batch in torch.arange(users).split(batch_size):
            last = model.last(model.encode(histories[batch], vectors), lengths[batch])
            ranks = count_ranks_in_blocks(
                model, last, vectors, targets[batch], 0.07, item_block=item_block, twins=twins
            )
            greater.append(ranks.greater)
            ties.append(ranks.ties)
        ranking_seconds = time.perf_counter() - started
    peak = max(peak_rss(source), inputs_rss)
    ranks = Ranks(torch.cat(greater), torch.cat(ties))
    return {
        "items": items,
        "users": users,
        "batch_size": batch_size,
        "item_block": item_block,
        "adaptor_seconds": round(adaptor_seconds, 2),
        "twin_seconds": round(twin_seconds, 2),
        "ranking_seconds": round(ranking_seconds, 2),  # encode users, score, count
        "total_seconds": round(adaptor_seconds + twin_seconds + ranking_seconds, 2),
        "item_user_pairs_per_s": round(items * users / ranking_seconds),
        "inputs_rss_gib": round(inputs_rss / 2**30, 3),
        "item_vectors_gib": round(vectors.numel() * 4 / 2**30, 3),
        "peak_rss_gib": round(peak / 2**30, 3),
        "working_memory_gib": round((peak - inputs_rss) / 2**30, 3),
        "beyond_item_vectors_gib": round((peak - inputs_rss - vectors.numel() * 4) / 2**30, 3),
        "peak_source": source,
        "recall@10": metrics_from_ranks(ranks, [10])["recall@10"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[4385, 100_000, 1_000_000])
    parser.add_argument("--users", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1024, help="users per block")
    parser.add_argument("--item-block", type=int, default=16384, help="items per block")
    parser.add_argument("--unblocked", action="store_true", help="also one block, 1,024 users")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/eval_scaling.json")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(**args.one)))
        return

    def run(items: int, batch_size: int, item_block: int) -> dict:
        spec = dict(items=items, users=args.users, batch_size=batch_size)
        spec.update(item_block=item_block, threads=args.threads)
        child = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(row))
        return row

    load = LoadAverage()
    rows = []
    for items in args.items:
        rows.append({"method": "blocked", **run(items, args.batch_size, args.item_block)})
        if args.unblocked and items <= 100_000:
            rows.append({"method": "one block", **run(items, 1024, items)})
    result = {
        "rows": rows,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load": load.record(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
