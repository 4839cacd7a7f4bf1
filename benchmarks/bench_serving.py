"""Requests/s and latency of the multi-tenant endpoint (``unisrec serve``) for 1 and 2 replicas.

    python benchmarks/bench_serving.py --seconds 20 --clients 8

Builds a throw-away MLflow store under --work: a backbone of the paper's shape (hidden 300,
8 experts, 384-d text vectors), registered and pulled like a pretrained one, and two tenants
(inductive adaptors, --items items each, fine-tuned for 0 epochs: serving cost does not
depend on training). Then for each replica count it starts the Ray Serve application on
127.0.0.1, warms both tenants up, and runs --clients closed-loop HTTP clients (keep-alive,
alternating tenants, histories of 5-20 random items, k=10) for --seconds. Writes
benchmarks/results/serving.json (or --out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
from machine_load import LoadAverage

from unisrec.runtime import free_port, use_loopback

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
TENANTS = ("shop-a", "shop-b")


def build_store(work: Path, items: int, users: int) -> str:
    """Dataset, backbone and two promoted tenants; returns the tracking URI."""
    import mlflow
    import torch

    from adaptors.config import FinetuneConfig
    from adaptors.finetune import run_finetune
    from pretrain.model import BackboneConfig, UniSRec
    from pretrain.registry import register_backbone
    from serving.lifecycle import promote
    from sharding.config import ProcessingConfig, ShardJobConfig, ShardOutputConfig
    from sharding.dataset_writer import EncodedDomain, write_dataset
    from sharding.types import DomainSequences
    from unisrec.config import from_dict
    from unisrec.tracking import configure_mlflow

    rng = np.random.default_rng(0)
    dim = 384
    domains = []
    for name in TENANTS:
        sequences = [
            rng.integers(1, items + 1, size=int(rng.integers(5, 21))).astype(np.int64)
            for _ in range(users)
        ]
        domains.append(
            EncodedDomain(
                sequences=DomainSequences(
                    name=name,
                    item_keys=[f"{name}-{i}" for i in range(1, items + 1)],
                    item_texts=[f"{name} item {i}" for i in range(1, items + 1)],
                    user_keys=[f"u{u}" for u in range(users)],
                    sequences=sequences,
                ),
                pretrain=False,
                vectors=rng.standard_normal((items, dim)).astype(np.float32),
                worddrop_vectors=None,
            )
        )
    data = work / "data"
    encoder = {"name": "bench-encoder", "dim": dim, "pooling": "cls", "max_length": 32}
    cfg = ShardJobConfig(
        domains=[],
        processing=ProcessingConfig(max_seq_len=50),
        shards=ShardOutputConfig(num_shards=1),
    )
    write_dataset(data, domains, encoder, cfg)

    uri = configure_mlflow(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("bench-pretrain")
    with mlflow.start_run() as run:
        pass
    torch.manual_seed(0)
    register_backbone(
        UniSRec(BackboneConfig(), text_dim=dim),
        run_id=run.info.run_id,
        name="bench-backbone",
        alias="current",
        data_digest="bench",
        encoder="bench-encoder",
        encoder_dim=dim,
        config_hash="0" * 16,
    )
    for tenant in TENANTS:
        ft = from_dict(
            FinetuneConfig,
            {
                "tenant": tenant,
                "data": {"dir": str(data), "domain": tenant},
                "backbone": "models:/bench-backbone@current",
                "optim": {"max_epochs": 0},
                "mlflow": {"tracking_uri": uri},
                "output_root": str(work / "finetune"),
            },
        )
        run_finetune(ft, progress=False)
        promote(tenant, by="bench")
    return uri


def load_test(port: int, items: int, seconds: float, clients: int) -> dict:
    """Closed-loop clients for ``seconds``; returns requests/s and latency percentiles."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = 0
        while time.monotonic() < stop:
            tenant = TENANTS[(index + n) % len(TENANTS)]
            history = [
                f"{tenant}-{i}" for i in rng.integers(1, items + 1, int(rng.integers(5, 21)))
            ]
            body = json.dumps({"history": history, "k": 10})
            started = time.perf_counter()
            conn.request("POST", f"/recommend/{tenant}", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                if response.status == 200:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
            n += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "seconds": round(wall, 2),
        "requests_per_second": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/unisrec-bench-serving")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    use_loopback()
    import ray
    from ray import serve

    from serving.endpoint import EndpointConfig, start

    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    uri = build_store(work, args.items, args.users)
    results = []
    load = LoadAverage()
    for replicas in args.replicas:
        port = free_port()
        cfg = EndpointConfig(tenants=list(TENANTS), port=port, replicas=replicas, tracking_uri=uri)
        for attempt in range(3):  # on a loaded machine a raylet may miss Ray's 30 s start window
            try:
                start(cfg)
                break
            except Exception as err:  # noqa: BLE001
                print(f"start failed ({err}); retrying", flush=True)
                ray.shutdown()
                if attempt == 2:
                    raise
        load_test(port, args.items, 3, 2 * replicas)  # warm-up: every replica loads both tenants
        row = {"replicas": replicas, **load_test(port, args.items, args.seconds, args.clients)}
        print(json.dumps(row), flush=True)
        results.append(row)
        serve.shutdown()
        ray.shutdown()
    report = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, CPU only",
        # The development machine is shared: the load average around the load tests.
        "load": load.record(),
        "setup": {
            "tenants": len(TENANTS),
            "items_per_tenant": args.items,
            "backbone": "hidden 300, 2 layers, 8 experts, 384-d text",
            "clients": args.clients,
            "seconds": args.seconds,
            "k": 10,
            "history": "5-20 items",
            "torch_threads_per_replica": 1,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
