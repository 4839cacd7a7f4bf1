"""Drills: `unisrec serve` with two tenants under closed-loop load while things go wrong.

Each drill runs real HTTP clients against the Ray Serve endpoint on 127.0.0.1 (the store of
tests/test_endpoint.py: crafts and gifts, 30 items each) and checks what every client saw:

* steady load: no failed request, the replicas' memory flat;
* a promotion and a rollback under load: no failed request, the new version served soon
  after the alias moves;
* a version whose files are truncated: that tenant gets a 503 naming the version, the other
  tenant is untouched, promoting the previous version back restores it;
* health, readiness and a body over the limit;
* a model replica killed mid-load: Ray Serve replaces it, requests in the gap get a 503 with
  a JSON body within the request timeout (never a 500, never a hang), serving recovers;
* the ingress replica killed mid-load (direct ingress: it holds the port): connections in the
  gap drop, its replacement takes the port back, serving recovers.

Figures (requests sent, failed, seconds to recover, latency, memory) are printed, and
appended as JSON lines to ``$UNISREC_DRILL_REPORT`` when it is set. The steady drill runs
``$UNISREC_DRILL_SECONDS`` (default 15) seconds; docs/operations.md quotes a 60 s run:

    UNISREC_DRILL_SECONDS=60 UNISREC_DRILL_REPORT=/tmp/drills.jsonl \\
        .venv/bin/python -m pytest -q tests/test_endpoint_drills.py
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow.tracking import MlflowClient
from test_endpoint import get, listening_ports, make_store

from recipes.cli import main as cli
from serving.lifecycle import add_catalogue_version, promote
from unisrec import tags as T
from unisrec.runtime import free_port

pytestmark = pytest.mark.slow

TENANTS = ("crafts", "gifts")
REQUEST_TIMEOUT_S = 5.0  # the endpoint's; short, so the replica drill sees 503s
ALIAS_REFRESH_S = 1.0
SLACK_S = 5.0  # on top of the timeout: a shared, loaded machine schedules late
STEADY_SECONDS = float(os.environ.get("UNISREC_DRILL_SECONDS", "15"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    out = make_store(tmp_path_factory.mktemp("drills"))
    for tenant in TENANTS:
        promote(tenant, by="drill")
    yield out
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def endpoint(store):
    import ray
    from ray import serve

    from serving.endpoint import EndpointConfig, start

    url = start(
        EndpointConfig(
            tenants=list(TENANTS),
            port=free_port(),
            alias_refresh_s=ALIAS_REFRESH_S,
            request_timeout_s=REQUEST_TIMEOUT_S,
            tracking_uri=store["uri"],
        )
    )
    for tenant in TENANTS:  # both loaded before any drill starts its clock
        status, _ = request(url, "POST", f"/recommend/{tenant}", {"history": [f"{tenant}-i0001"]})
        assert status == 200
    yield url
    serve.shutdown()
    ray.shutdown()


# --- clients ------------------------------------------------------------------------------


@dataclass
class Answer:
    tenant: str
    started: float  # time.monotonic()
    seconds: float
    status: int  # 0: no HTTP answer (connection error, client timeout)
    body: dict | str  # parsed JSON, else the raw text

    @property
    def finished(self) -> float:
        return self.started + self.seconds


def request(url: str, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """``(status, JSON body or raw text)`` of one request on a fresh connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, _parse(response.read())
    finally:
        conn.close()


def _parse(raw: bytes) -> dict | str:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode(errors="replace")


class ClosedLoop:
    """``clients`` threads, each sending its next request (alternating tenants, 1-8 random
    items, k=5) as soon as the last one is answered, on a keep-alive connection."""

    def __init__(self, url: str, clients: int):
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def __enter__(self) -> ClosedLoop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 3 * SLACK_S)

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def _client(self, index: int) -> None:
        rng = np.random.default_rng(index)
        conn = None
        n = 0
        while not self.stopping.is_set():
            tenant = TENANTS[(index + n) % len(TENANTS)]
            n += 1
            items = rng.choice(np.arange(1, 31), size=int(rng.integers(1, 9)), replace=False)
            body = json.dumps({"history": [f"{tenant}-i{i:04d}" for i in items], "k": 5})
            started = time.monotonic()
            try:
                # A client gives up well after the endpoint's own timeout: a hang shows as 0.
                conn = conn or http.client.HTTPConnection(
                    *self.address, timeout=REQUEST_TIMEOUT_S + 2 * SLACK_S
                )
                conn.request(
                    "POST", f"/recommend/{tenant}", body, {"Content-Type": "application/json"}
                )
                response = conn.getresponse()
                answer = Answer(
                    tenant,
                    started,
                    time.monotonic() - started,
                    response.status,
                    _parse(response.read()),
                )
            except (OSError, http.client.HTTPException) as err:
                answer = Answer(tenant, started, time.monotonic() - started, 0, repr(err))
                conn.close()
                conn = None
            with self.lock:
                self.answers.append(answer)
        if conn is not None:
            conn.close()


def wait_until(loop: ClosedLoop, condition, timeout: float, what: str) -> Answer:
    """The first answer (in finishing order) that satisfies ``condition``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted((a for a in loop.snapshot() if condition(a)), key=lambda a: a.finished)
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no answer {what} within {timeout} s")


def figures(answers: list[Answer]) -> dict:
    ok = [a.seconds * 1000 for a in answers if a.status == 200]
    return {
        "sent": len(answers),
        "failed": sum(a.status != 200 for a in answers),
        "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok else None,
        "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None,
        "max_ms": round(max(a.seconds for a in answers) * 1000, 1) if answers else None,
    }


def report(drill: str, **values) -> None:
    load = [round(x, 1) for x in os.getloadavg()]  # the machine is shared: say how busy
    line = json.dumps({"drill": drill, **values, "load": load})
    print(line)
    if os.environ.get("UNISREC_DRILL_REPORT"):
        with open(os.environ["UNISREC_DRILL_REPORT"], "a") as out:
            out.write(line + "\n")


def assert_answered_in_time(answers: list[Answer]) -> None:
    """Every request got an HTTP answer, none later than the endpoint's timeout (+ slack),
    and every failure is JSON with an error message (no 500, no traceback)."""
    for a in answers:
        assert a.status != 0, f"no HTTP answer after {a.seconds:.1f} s: {a.body}"
        assert a.seconds <= REQUEST_TIMEOUT_S + SLACK_S, f"answered after {a.seconds:.1f} s"
        if a.status != 200:
            assert isinstance(a.body, dict) and "error" in a.body, (a.status, a.body)
            assert "Traceback" not in a.body["error"]


def replica_pid(deployment: str) -> int:
    """The process of this test's (only) replica of ``deployment``: a child of this process's
    local Ray, found by its title (``ray::ServeReplica:unisrec:TenantModels``)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[0].startswith(f"ray::ServeReplica:unisrec:{deployment}"):
                found.append(process.pid)
        except (psutil.Error, IndexError):
            continue
    assert len(found) == 1, (deployment, found)
    return found[0]


def new_items_csv(path: Path, keys: list[str]) -> Path:
    path.write_text("item,text\n" + "".join(f"{k},a new item {k}\n" for k in keys))
    return path


def twin_vectors(store: dict):
    """An encoder for `catalogue add` that needs no text model: copies of item 1's vector."""
    from adaptors.catalogue import Catalogue

    vector = Catalogue.load(Path(store["crafts"]["output_dir"]) / "catalogue").vectors[1]
    return lambda texts, encoder: np.stack([vector] * len(texts))


# --- drills -------------------------------------------------------------------------------


def test_health_readiness_and_a_body_over_the_limit(endpoint):
    status, body = request(endpoint, "GET", "/-/healthz")
    assert status == 200  # the ingress replica's HTTP server is alive (direct ingress)
    status, body = request(endpoint, "GET", "/-/ready")
    assert status == 200, body
    assert body == {
        "ready": True,
        "tenants": {t: {"version": "1", "ready": True} for t in TENANTS},
    }

    huge = json.dumps({"history": ["crafts-i0001"] * 20000}).encode()  # ~300 KB
    status, body = request(endpoint, "POST", "/recommend/crafts", huge)
    assert status == 413 and "over 65536 bytes" in body["error"], (status, body)

    host, port = endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(  # no Content-Length: the endpoint counts as it reads
        "POST", "/recommend/crafts", iter([huge[:40000], huge[40000:]]), encode_chunked=True
    )
    response = conn.getresponse()
    assert response.status == 413 and "error" in json.loads(response.read())
    conn.close()

    status, body = request(endpoint, "POST", "/recommend/crafts", {"history": ["crafts-i0002"]})
    assert status == 200, body


def test_sixteen_clients_fail_nothing_and_the_replicas_memory_stays_flat(endpoint):
    processes = {
        "models": psutil.Process(replica_pid("TenantModels")),
        "ingress": psutil.Process(replica_pid("Endpoint")),
    }
    samples: dict[str, list[float]] = {name: [] for name in processes}
    with ClosedLoop(endpoint, 16) as load:
        time.sleep(3)  # warm: the first requests of a process allocate what it keeps
        warm = len(load.snapshot())
        end = time.monotonic() + STEADY_SECONDS
        while time.monotonic() < end:
            for name, process in processes.items():
                samples[name].append(process.memory_info().rss / 2**20)
            time.sleep(0.5)
    answers = load.snapshot()[warm:]
    assert_answered_in_time(answers)
    assert all(a.status == 200 for a in answers), figures(answers)
    growth = {}
    for name, rss in samples.items():
        fifth = max(1, len(rss) // 5)
        first, last = float(np.mean(rss[:fifth])), float(np.mean(rss[-fifth:]))
        growth[name] = {
            "first_mib": round(first, 1),
            "last_mib": round(last, 1),
            "max_mib": round(max(rss), 1),
            # ten points across the run: flat, or still climbing?
            "series_mib": [round(float(x), 1) for x in rss[:: max(1, len(rss) // 10)]],
        }
        assert last - first < 16, (name, growth[name])  # no growth with the requests served
    report("steady", clients=16, seconds=STEADY_SECONDS, **figures(answers), rss=growth)


def test_a_promotion_and_a_rollback_under_load_fail_nothing(store, endpoint, tmp_path):
    with ClosedLoop(endpoint, 8) as load:
        time.sleep(2)
        result = add_catalogue_version(
            "crafts",
            new_items_csv(tmp_path / "new.csv", ["crafts-new-1"]),
            encode=twin_vectors(store),
        )
        assert result["version"] == "2" and result["alias"] == T.PRODUCTION
        promoted = time.monotonic()
        first_v2 = wait_until(
            load,
            lambda a: a.tenant == "crafts" and a.status == 200 and a.body["version"] == "2",
            60,
            "from crafts version 2",
        )
        assert cli(["promote", "--tenant", "crafts", "--version", "1"]) == 0
        rolled_back = time.monotonic()
        first_v1 = wait_until(
            load,
            lambda a: (
                a.started > rolled_back
                and a.status == 200
                and a.body["version"] == "1"
                and a.tenant == "crafts"
            ),
            60,
            "from crafts version 1 after the rollback",
        )
        time.sleep(1)
    answers = load.snapshot()
    assert_answered_in_time(answers)
    assert all(a.status == 200 for a in answers), [a.body for a in answers if a.status != 200][:3]
    to_v2, to_v1 = first_v2.finished - promoted, first_v1.finished - rolled_back
    # The alias is re-read every ALIAS_REFRESH_S; a new version is loaded before traffic
    # moves to it (the rollback's version is still loaded).
    assert to_v1 <= ALIAS_REFRESH_S + SLACK_S, to_v1
    assert to_v2 <= ALIAS_REFRESH_S + 6 * SLACK_S, to_v2
    crafts = [a for a in answers if a.tenant == "crafts"]
    assert not [
        a
        for a in crafts
        if a.started > first_v2.finished + 0.5
        and a.finished < rolled_back
        and a.body["version"] != "2"
    ]  # no flapping back to version 1
    report(
        "promotion",
        alias_refresh_s=ALIAS_REFRESH_S,
        **figures(answers),
        seconds_to_serve_promoted=round(to_v2, 2),
        seconds_to_serve_rollback=round(to_v1, 2),
    )


def test_an_unreadable_version_gets_a_503_naming_it_and_the_other_tenant_goes_on(
    store, endpoint, tmp_path
):
    # Version 3 extends version 2 while version 1 serves: a candidate, not served yet.
    result = add_catalogue_version(
        "crafts",
        new_items_csv(tmp_path / "more.csv", ["crafts-new-2"]),
        version="2",
        encode=twin_vectors(store),
    )
    assert result["version"] == "3" and result["alias"] == T.CANDIDATE
    name = T.adaptor_model_name("crafts")
    files = Path(MlflowClient().get_model_version_download_uri(name, "3").removeprefix("file://"))
    vectors = files / "artifacts" / "catalogue" / "vectors.npy"
    os.truncate(vectors, vectors.stat().st_size // 2)

    with ClosedLoop(endpoint, 8) as load:
        time.sleep(1)
        promote("crafts", "3", by="drill")
        promoted = time.monotonic()
        broken = wait_until(
            load, lambda a: a.tenant == "crafts" and a.status == 503, 30, "503 for crafts"
        )
        status, ready = request(endpoint, "GET", "/-/ready")
        assert status == 503 and not ready["ready"], ready
        assert ready["tenants"]["gifts"] == {"version": "1", "ready": True}
        assert ready["tenants"]["crafts"]["version"] == "3"
        assert "version 3" in ready["tenants"]["crafts"]["error"]
        time.sleep(2)
        promote("crafts", "1", by="drill")
        restored_at = time.monotonic()
        restored = wait_until(
            load,
            lambda a: a.tenant == "crafts" and a.started > restored_at and a.status == 200,
            30,
            "200 for crafts after promoting version 1 back",
        )
        time.sleep(2)
    answers = load.snapshot()
    assert_answered_in_time(answers)
    assert "version 3" in broken.body["error"] and "cannot be loaded" in broken.body["error"]
    assert all(a.status == 200 for a in answers if a.tenant == "gifts")
    for a in answers:
        if a.tenant == "crafts" and a.status != 200:
            assert a.status == 503 and "version 3" in a.body["error"], a.body
    after = [a for a in answers if a.tenant == "crafts" and a.started > restored.finished]
    assert after and all(a.status == 200 and a.body["version"] == "1" for a in after)
    assert request(endpoint, "GET", "/-/ready")[0] == 200
    report(
        "unreadable version",
        **figures(answers),
        failed_other_tenant=sum(a.status != 200 for a in answers if a.tenant == "gifts"),
        seconds_to_503=round(broken.finished - promoted, 2),
        seconds_to_restore=round(restored.finished - restored_at, 2),
    )


def test_a_killed_model_replica_is_replaced_and_the_gap_gets_json_503s(endpoint):
    pid = replica_pid("TenantModels")
    retries_before = get(f"{endpoint}/-/stats").get("ingress", {}).get("retries", 0)
    with ClosedLoop(endpoint, 8) as load:
        time.sleep(3)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovered = wait_until(
            load,
            lambda a: a.started > killed and a.status == 200,
            120,
            "200 from a request sent after the kill",
        )
        time.sleep(3)
    answers = load.snapshot()
    assert_answered_in_time(answers)
    assert {a.status for a in answers} <= {200, 503}
    late = [a for a in answers if a.started > recovered.finished + 1]
    assert late and all(a.status == 200 for a in late)  # recovered, without a restart
    assert replica_pid("TenantModels") != pid  # Ray Serve started a new replica
    gap = [a for a in answers if a.finished > killed]
    report(
        "model replica killed",
        **figures(gap),
        seconds_to_recover=round(recovered.finished - killed, 2),
        retried_calls=get(f"{endpoint}/-/stats").get("ingress", {}).get("retries", 0)
        - retries_before,
    )


def test_a_killed_ingress_replica_takes_the_port_back(endpoint):
    """Direct ingress (the default here): the ingress replica itself listens on the port. Killed
    mid-load, its clients' connections drop (no JSON answer: nothing else holds the port); its
    replacement binds the same port while the old connections linger in the kernel, and
    serving goes on."""
    pid = replica_pid("Endpoint")
    port = int(endpoint.rsplit(":", 1)[1])
    assert port in listening_ports(pid)  # no proxy in the path
    with ClosedLoop(endpoint, 8) as load:
        time.sleep(3)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovered = wait_until(
            load,
            lambda a: a.started > killed and a.status == 200,
            120,
            "200 from a request sent after the kill",
        )
        time.sleep(3)
    answers = load.snapshot()
    assert {a.status for a in answers} <= {0, 200}  # a dropped connection, never a 5xx
    late = [a for a in answers if a.started > recovered.finished + 1]
    assert late and all(a.status == 200 for a in late)
    new_pid = replica_pid("Endpoint")
    assert new_pid != pid and port in listening_ports(new_pid)
    # Clients retry a refused connection at once: count answers only.
    answered = [a for a in answers if a.finished > killed and a.status == 200]
    report(
        "ingress replica killed",
        answered_after_kill=len(answered),
        seconds_to_recover=round(recovered.finished - killed, 2),
    )
