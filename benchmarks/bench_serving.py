"""Requests/s and latency of the multi-tenant endpoint (``unisrec serve``), and where the time goes.

    python benchmarks/bench_serving.py       # every layout, 1 and 2 replicas, 20 s a phase
    python benchmarks/bench_serving.py --layouts split --replicas 1 --large-items 0 --seconds 10

Builds a throw-away MLflow store under --work: a backbone of the paper's shape (hidden 300,
8 experts, 384-d text vectors), registered and pulled like a pretrained one, two tenants of
--items items (shop-a, shop-b) and one of --large-items items (shop-large; 0 leaves it out),
inductive adaptors fine-tuned for 0 epochs (serving cost does not depend on training) and
promoted. Then for each layout (``split``: the ingress and --replicas model replicas, as
``unisrec serve`` runs by default; ``colocated``: --replicas replicas of one deployment, ``unisrec
serve --colocate``; both through Ray Serve's HTTP proxy, ``--ingress proxy``, and as
``split-direct`` / ``colocated-direct`` with the ingress replica taking the connections itself,
``--ingress direct``, the default on one machine; ``colocated-direct`` with 1 replica only) and
--replicas count it starts the Ray Serve application on 127.0.0.1,
loads every tenant, and runs closed-loop HTTP clients (keep-alive, histories of 5-20 random
items, k=10) for --seconds in each phase:

    small  --clients clients, alternating shop-a and shop-b
    small  1 client
    large  --clients clients on shop-large
    large  1 client

Each phase reports requests/s, client latency (p50/p90/p99), errors, and where the time
goes: the client's mean latency beside the ingress's mean time per request (arrival to
answer), the model call's mean round trip per batch and the ranking's own time per batch
(from ``/-/stats``), requests per batch, and CPU milliseconds per request of each process of
the local Ray (the HTTP proxy, the ingress, the model replicas, Serve's controller, Ray's
daemons, and this process's clients). ``targets`` says whether the issue's targets were met
(on these 2 cores: small, 8 clients: >= 300 requests/s and p99 <= 60 ms; small, 1 client:
p50 <= 8 ms; large, 8 clients: p99 <= 100 ms). Writes benchmarks/results/serving.json (or
--out) with the load average before and after (benchmarks/machine_load.py): a number taken on
a busy machine is the machine's, not the endpoint's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from machine_load import LoadAverage
from synthetic_tenants import build_tenants, item_key

from unisrec.runtime import free_port, use_loopback

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
SMALL = ("shop-a", "shop-b")
LARGE = "shop-large"
K = 10
LAYOUTS = ["split", "colocated", "split-direct", "colocated-direct"]
TARGETS = {  # (catalogue, clients) -> what the issue asks of these 2 cores
    ("small", "many"): {"requests_per_second": (">=", 300), "p99_ms": ("<=", 60)},
    ("small", 1): {"p50_ms": ("<=", 8)},
    ("large", "many"): {"p99_ms": ("<=", 100)},
}


def load_test(
    port: int, catalogues: dict[str, int], tenants: tuple[str, ...], seconds: float, clients: int
) -> dict:
    """Closed-loop clients for ``seconds``, alternating ``tenants``; requests/s and latency."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = 0
        while time.monotonic() < stop:
            tenant = tenants[(index + n) % len(tenants)]
            items = catalogues[tenant]
            history = [
                item_key(tenant, i) for i in rng.integers(1, items + 1, int(rng.integers(5, 21)))
            ]
            body = json.dumps({"history": history, "k": K})
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
        "mean_ms": round(float(ms.mean()), 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


# --- where the time goes --------------------------------------------------------------------


def ray_processes() -> dict[str, list]:
    """This process and its descendants (a local Ray's daemons and actors), by role."""
    import psutil

    roles: dict[str, list] = {"clients": [psutil.Process()]}
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::ProxyActor"):
            role = "proxy"
        elif title.startswith("ray::ServeReplica:") and ":Endpoint" in title:
            role = "ingress"
        elif title.startswith("ray::ServeReplica:") and ":TenantModels" in title:
            role = "models"
        elif title.startswith("ray::ServeController"):
            role = "controller"
        else:
            role = "ray_daemons"  # gcs, raylet, dashboard, idle workers
        roles.setdefault(role, []).append(process)
    return roles


def cpu_seconds(roles: dict[str, list]) -> dict[str, float]:
    import psutil

    totals = {}
    for role, processes in roles.items():
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        totals[role] = total
    return totals


def endpoint_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/stats", timeout=60) as response:
        return json.loads(response.read())


def stages(before: dict, after: dict, cpu_before: dict, cpu_after: dict, result: dict) -> dict:
    """Per request and per batch means between two ``/-/stats`` and CPU readings. The model
    replica's figures are one replica's (the one that answered ``/-/stats``)."""
    ing0, ing1 = before["ingress"], after["ingress"]
    answered = max(ing1["answered"] - ing0["answered"], 1)
    batches = max(ing1["batches"] - ing0["batches"], 1)
    calls = max(after.get("calls", 0) - before.get("calls", 0), 1)
    requests = result["requests"] + result["errors"]
    return {
        "client_mean_ms": result["mean_ms"],
        "ingress_mean_ms": round(
            (ing1["handle_seconds"] - ing0["handle_seconds"]) * 1000 / answered, 2
        ),
        "requests_per_batch": round((ing1["requests"] - ing0["requests"]) / batches, 2),
        "model_call_ms_per_batch": round(
            (ing1["call_seconds"] - ing0["call_seconds"]) * 1000 / batches, 2
        ),
        "rank_ms_per_batch": round(
            (after["rank_seconds"] - before["rank_seconds"]) * 1000 / calls, 2
        ),
        "rank_wait_ms_per_batch": round(
            (after["wait_seconds"] - before["wait_seconds"]) * 1000 / calls, 2
        ),
        "retries": ing1["retries"] - ing0["retries"],
        "cpu_ms_per_request": {
            role: round((cpu_after[role] - cpu_before.get(role, 0.0)) * 1000 / max(requests, 1), 2)
            for role in sorted(cpu_after)
        },
    }


def phase(port: int, catalogues: dict, tenants: tuple, seconds: float, clients: int) -> dict:
    roles = ray_processes()
    stats0, cpu0 = endpoint_stats(port), cpu_seconds(roles)
    result = load_test(port, catalogues, tenants, seconds, clients)
    cpu1, stats1 = cpu_seconds(roles), endpoint_stats(port)
    return {**result, "stages": stages(stats0, stats1, cpu0, cpu1, result)}


def targets(results: list[dict], clients: int) -> list[dict]:
    """Each target of TARGETS against the matching rows: value, bound, met."""
    checks = []
    for (catalogue, who), bounds in TARGETS.items():
        want = clients if who == "many" else who
        for row in results:
            if row["catalogue"] != catalogue or row["clients"] != want:
                continue
            for key, (op, bound) in bounds.items():
                value = row[key]
                met = value >= bound if op == ">=" else value <= bound
                checks.append(
                    {"layout": row["layout"], "replicas": row["replicas"], "catalogue": catalogue,
                     "clients": want, "metric": key, "target": f"{op} {bound}", "value": value,
                     "met": met}
                )  # fmt: skip
    return checks


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/unisrec-bench-serving")
    parser.add_argument("--items", type=int, default=2000, help="items of shop-a and shop-b")
    parser.add_argument(
        "--large-items", type=int, default=100_000, help="items of shop-large (0: leave it out)"
    )
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20, help="per phase")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients (besides 1)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=LAYOUTS,
        default=LAYOUTS,
        help="split: ingress + model replicas; colocated: one deployment (--colocate); "
        "without -direct through Ray Serve's proxy (--ingress proxy), with it the ingress "
        "replica serves HTTP itself (--ingress direct, the default of `unisrec serve` on one "
        "machine; colocated-direct runs with 1 replica only)",
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="per model replica")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="requests of a tenant ranked together; 1 = one model call per request",
    )
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
    catalogues = {name: args.items for name in SMALL}
    if args.large_items:
        catalogues[LARGE] = args.large_items
    uri = build_tenants(work, catalogues, args.users)
    load = LoadAverage()
    results = []
    plan = [(lay, r) for lay in args.layouts for r in args.replicas]
    for layout, replicas in [(lay, r) for lay, r in plan if lay != "colocated-direct" or r == 1]:
        port = free_port()
        cfg = EndpointConfig(
            tenants=list(catalogues),
            port=port,
            replicas=replicas,
            torch_threads=args.torch_threads,
            max_batch_size=args.max_batch_size,
            colocate=layout.startswith("colocated"),
            ingress="direct" if layout.endswith("-direct") else "proxy",
            tracking_uri=uri,
        )
        if args.max_batch_size == 1:
            cfg.calls_per_replica = 1000  # every request its own call, at once
        for attempt in range(3):  # on a loaded machine a raylet may miss Ray's 30 s start window
            try:
                start(cfg)
                break
            except Exception as err:  # noqa: BLE001
                print(f"start failed ({err}); retrying", flush=True)
                ray.shutdown()
                if attempt == 2:
                    raise
        # Warm-up: every replica loads every tenant (a version's calls prefer replicas that
        # hold it; a busy one sends the next call elsewhere).
        load_test(port, catalogues, tuple(catalogues), 3 * replicas, 4 * replicas)
        runs = [("small", SMALL, args.clients), ("small", SMALL, 1)]
        if args.large_items:
            runs += [("large", (LARGE,), args.clients), ("large", (LARGE,), 1)]
        for catalogue, tenants, clients in runs:
            row = {
                "layout": layout,
                "replicas": replicas,
                "catalogue": catalogue,
                "items": catalogues[tenants[0]],
                "clients": clients,
                **phase(port, catalogues, tenants, args.seconds, clients),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
        serve.shutdown()
        ray.shutdown()
    report = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, CPU only",
        "commit": git_commit(),
        # The development machine is shared: the load average around the load tests.
        "load": load.record(),
        "setup": {
            "tenants": {"small": list(SMALL), "large": [LARGE] if args.large_items else []},
            "items_per_tenant": args.items,
            "large_items": args.large_items,
            "backbone": "hidden 300, 2 layers, 8 experts, 384-d text",
            "clients": args.clients,
            "seconds": args.seconds,
            "k": K,
            "history": "5-20 items",
            "torch_threads_per_replica": args.torch_threads,
            "max_batch_size": args.max_batch_size,
            "layouts": args.layouts,
        },
        "results": results,
        "targets": targets(results, args.clients),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
