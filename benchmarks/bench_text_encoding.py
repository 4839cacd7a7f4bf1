"""Text-encoding throughput with and without length bucketing, on real item texts.

Encodes the first N item texts of Amazon "Scientific" with the packaged all-MiniLM-L6-v2
(no cache), once in file order and once sorted by token length, and reports items/s::

    .venv/bin/python benchmarks/bench_text_encoding.py            # N = 1000
    .venv/bin/python benchmarks/bench_text_encoding.py --n 300

Data root: $UNISREC_DATA_ROOT, default ../shared/data next to the repository.
Writes benchmarks/results/text_encoding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from machine_load import LoadAverage

from sharding.text_encoder import TextEncoder

REPO = Path(__file__).resolve().parents[1]


def read_item_texts(path: Path, n: int) -> list[str]:
    """The first ``n`` texts of a UniSRec ``.text`` file (``item_id<TAB>text`` after a header)."""
    texts = []
    with open(path, encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            if len(texts) == n:
                break
            texts.append(line.rstrip("\n").split("\t", 1)[1])
    return texts


def timed_encode(encoder: TextEncoder, texts: list[str]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    vectors = encoder.encode(texts, progress=False)
    return vectors, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="item texts to encode")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/text_encoding.json")
    args = parser.parse_args(argv)

    load = LoadAverage()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_root = Path(os.environ.get("UNISREC_DATA_ROOT", REPO.parent / "shared/data"))
    texts = read_item_texts(data_root / "amazon-scientific/Scientific.text", args.n)

    encoder = TextEncoder("packaged", max_length=args.max_length, batch_size=args.batch_size)
    encoder.encode(texts[: args.batch_size], progress=False)  # warm-up: first-call costs
    runs = {}
    vectors = {}
    for bucketed in (False, True):
        encoder.bucket_by_length = bucketed
        label = "bucketed" if bucketed else "unbucketed"
        vectors[label], seconds = timed_encode(encoder, texts)
        runs[label] = {"seconds": round(seconds, 3), "items_per_s": round(len(texts) / seconds, 1)}

    result = {
        "encoder": encoder.name,
        "device": str(encoder.device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "n": len(texts),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        **runs,
        "speedup": round(runs["bucketed"]["items_per_s"] / runs["unbucketed"]["items_per_s"], 2),
        # Bucketing must only reorder work, never change a vector.
        "max_abs_diff": float(np.abs(vectors["bucketed"] - vectors["unbucketed"]).max()),
        "load": load.record(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"text encoding, {result['n']} items on {result['device']}: "
        f"unbucketed {runs['unbucketed']['items_per_s']} items/s, "
        f"bucketed {runs['bucketed']['items_per_s']} items/s, "
        f"x{result['speedup']} (max |diff| {result['max_abs_diff']:.1e}) -> {args.out}"
    )


if __name__ == "__main__":
    main()
