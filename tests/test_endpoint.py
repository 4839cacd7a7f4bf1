"""Serving and the tenant lifecycle against a real MLflow store, real processes and real HTTP
on 127.0.0.1: self-contained registered adaptors, ``mlflow models serve``, the multi-tenant
Ray Serve endpoint, promotion, catalogue versions and the registry listing.

One module-scoped store: a tiny randomly initialised backbone registered as a pretrained one
would be, and two tenants fine-tuned from it (crafts: inductive, gifts: transductive) whose
item keys look like the demo's (``crafts-i0001``), so the README's example runs against them.
Tests run in file order: the catalogue test at the end moves crafts' production version.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers_data import write_small_dataset
from mlflow.tracking import MlflowClient

from adaptors.bundle import load_bundle
from adaptors.catalogue import Catalogue
from adaptors.config import FinetuneConfig
from adaptors.finetune import run_finetune
from adaptors.topk import top_k
from pretrain.model import BackboneConfig, UniSRec
from pretrain.registry import register_backbone
from recipes.cli import main as cli
from serving.lifecycle import add_catalogue_version, alias_version, promote
from unisrec import tags as T
from unisrec.config import from_dict
from unisrec.errors import ConfigError
from unisrec.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = json.loads((ROOT / "docs" / "serving-example.json").read_text())
VENV_BIN = str(Path(sys.executable).parent)
TINY = {"hidden_size": 16, "inner_size": 32, "num_experts": 2, "max_seq_len": 10}
BACKBONE = "test-backbone"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    out = make_store(tmp_path_factory.mktemp("endpoint"))
    yield out
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def make_store(root: Path) -> dict:
    """The MLflow store under ``root``: the backbone and both tenants fine-tuned (candidates,
    nothing promoted). Also used by tests/test_endpoint_drills.py."""
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # for the CLI commands and Ray Serve replicas
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    data = write_small_dataset(
        root / "data", domains=("crafts", "gifts"), item_key="{domain}-i{i:04d}"
    )
    torch.manual_seed(0)
    mlflow.set_experiment("pretrain")
    with mlflow.start_run() as run:
        pass
    register_backbone(
        UniSRec(from_dict(BackboneConfig, TINY), text_dim=8),
        run_id=run.info.run_id,
        name=BACKBONE,
        alias="current",
        data_digest="pretrain-digest",
        encoder="test-encoder",
        encoder_dim=8,
        config_hash="0" * 16,
    )
    out = {"root": root, "uri": uri, "data": data, "backbone_run": run.info.run_id}
    for tenant, mode in (("crafts", "inductive"), ("gifts", "transductive")):
        out[tenant] = run_finetune(finetune_config(root, uri, data, tenant, mode), progress=False)
    return out


def finetune_config(root: Path, uri: str, data: Path, tenant: str, mode: str) -> FinetuneConfig:
    return from_dict(
        FinetuneConfig,
        {
            "tenant": tenant,
            "data": {"dir": str(data), "domain": tenant},
            "backbone": f"models:/{BACKBONE}@current",
            "mode": mode,
            "optim": {"max_epochs": 2, "batch_size": 16, "lr": 1e-2},
            "mlflow": {"tracking_uri": uri},
            "output_root": str(root / "runs"),
        },
    )


def local_top_k(summary: dict, history: list[str], k: int) -> list[tuple[str, float]]:
    """The tenant's top-k computed in this process from its fine-tune output."""
    out = Path(summary["output_dir"])
    model, spec = load_bundle(out / "adaptor")
    return top_k(model, spec, Catalogue.load(out / "catalogue"), [history], k=k)[0]


def post(url: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_for(url: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


# --- lifecycle: candidate, promotion, lineage ---------------------------------------------


def test_finetune_registers_a_candidate_and_promotion_records_who_when_and_from(store):
    name = T.adaptor_model_name("crafts")
    assert alias_version(name, T.CANDIDATE) == store["crafts"]["model_version"] == "1"
    assert alias_version(name, T.PRODUCTION) is None  # nothing is served before a promotion

    assert cli(["promote", "--tenant", "crafts"]) == 0
    assert promote("gifts", by="ci")["previous"] == "none"
    assert alias_version(name, T.PRODUCTION) == "1"
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags[T.PROMOTED_FROM] == "none" and tags[T.PROMOTED_BY] and "T" in tags[T.PROMOTED_AT]
    with pytest.raises(ConfigError, match="no version 7"):
        promote("crafts", "7")


def test_finetune_run_logs_its_data_and_the_backbone_as_inputs(store):
    run = MlflowClient().get_run(store["crafts"]["run_id"])
    (data,) = run.inputs.dataset_inputs
    digest = json.loads((store["data"] / "manifest.json").read_text())["digest"]
    assert data.dataset.digest == digest[:32]
    assert {t.key: t.value for t in data.tags}["unisrec.domain"] == "crafts"
    assert json.loads(data.dataset.profile or "{}") or data.dataset.schema  # rows were logged
    backbone = MlflowClient().get_model_version(BACKBONE, "1")
    assert [m.model_id for m in run.inputs.model_inputs] == [backbone.source.split("/")[-1]]
    assert run.data.tags[T.BACKBONE_RUN_ID] == store["backbone_run"]


# --- self-contained models -----------------------------------------------------------------


def test_registered_adaptor_carries_backbone_code_and_pinned_requirements(store, tmp_path):
    from importlib.metadata import version

    local = Path(
        mlflow.artifacts.download_artifacts(
            "models:/unisrec-adaptor-crafts/1", dst_path=str(tmp_path)
        )
    )
    assert (local / "artifacts" / "backbone" / "backbone.pt").is_file()
    assert {p.name for p in (local / "code").iterdir()} >= {"unisrec", "pretrain", "adaptors"}
    requirements = (local / "requirements.txt").read_text().split()
    pins = dict(r.split("==") for r in requirements if not r.startswith("-"))
    assert "unisrec" not in pins and {"torch", "mlflow", "pandas"} <= set(pins)
    for name, pinned in pins.items():  # pinned to what this environment installed
        assert version(name).split("+")[0] == pinned, name


def test_registered_adaptor_predicts_in_a_fresh_process_without_a_tracking_server(store, tmp_path):
    local = mlflow.artifacts.download_artifacts(
        "models:/unisrec-adaptor-crafts/1", dst_path=str(tmp_path)
    )
    history = ["crafts-i0004", "crafts-i0005"]
    script = (
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
        f"out = m.predict(pd.DataFrame({{'history': [{history!r}]}}), params={{'k': 5}})\n"
        "import adaptors.publish\n"
        "print(json.dumps({'items': list(out['items'][0]), 'code': adaptors.publish.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["code"].startswith(str(local))  # the model's own copy of the code ran
    assert answer["items"] == [key for key, _ in local_top_k(store["crafts"], history, 5)]


# --- mlflow models serve, as the README documents it ---------------------------------------


def test_readme_shows_the_tested_example_bodies():
    readme = (ROOT / "README.md").read_text()
    assert f"-d '{json.dumps(EXAMPLE['invocations'])}'" in readme
    assert f"-d '{json.dumps(EXAMPLE['recommend'])}'" in readme
    assert f"/recommend/{EXAMPLE['tenant']}" in readme


def test_example_items_exist_in_the_demo_data(tmp_path):
    """The README's item keys are items of the demo's synthetic data, full size and smoke."""
    from recipes.demo import SMOKE, DemoConfig
    from sharding.synthetic import write_synthetic

    keys = set(EXAMPLE["recommend"]["history"])
    smoke_scale = float(
        next(o for o in SMOKE if o.startswith("data.synthetic.scale=")).split("=")[1]
    )
    for scale in (DemoConfig().data.synthetic.scale, smoke_scale):
        write_synthetic(tmp_path / str(scale), scale=scale, num_sources=1)
        log = (tmp_path / str(scale) / EXAMPLE["tenant"] / "interactions.csv").read_text()
        counts = {k: log.count(f",{k},") for k in keys}
        assert min(counts.values()) >= 10, counts  # far above the demo's 5-core


def test_mlflow_models_serve_answers_the_readme_example(store):
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": store["uri"],
    }
    server = subprocess.Popen(
        [f"{VENV_BIN}/mlflow", "models", "serve", "-m", "models:/unisrec-adaptor-crafts@production",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        status, answer = post(f"http://127.0.0.1:{port}/invocations", EXAMPLE["invocations"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert status == 200, answer
    (row,) = answer["predictions"]
    history, k = EXAMPLE["recommend"]["history"], EXAMPLE["invocations"]["params"]["k"]
    assert row["items"] == [key for key, _ in local_top_k(store["crafts"], history, k)]


# --- batching at the ingress (no Ray) -------------------------------------------------------


def test_batch_queue_sends_a_lone_request_at_once_and_waiting_ones_together():
    from serving.endpoint import BatchQueue

    async def scenario():
        sent: list[list[int]] = []
        release = asyncio.Event()

        async def send(items, deadline):
            sent.append(list(items))
            if len(sent) == 1:
                await release.wait()  # the first call is slow: the others queue behind it
            return [item * 10 for item in items]

        queue = BatchQueue(send, max_batch_size=3, max_in_flight=1)
        first = asyncio.create_task(queue.submit(1, time.monotonic() + 5))
        for _ in range(3):  # submit, then the call's own task
            await asyncio.sleep(0)
        assert sent == [[1]]  # no waiting for company
        rest = [asyncio.create_task(queue.submit(n, time.monotonic() + 5)) for n in range(2, 7)]
        for _ in range(3):
            await asyncio.sleep(0)
        assert sent == [[1]]  # the others wait for the call in flight
        release.set()
        results = await asyncio.gather(first, *rest)
        return sent, results

    sent, results = asyncio.run(scenario())
    assert sent == [[1], [2, 3, 4], [5, 6]]
    assert results == [10, 20, 30, 40, 50, 60]  # each caller its own result


def test_batch_queue_gives_a_failed_call_to_every_request_of_its_batch_only():
    from serving.endpoint import BatchQueue, RequestError

    async def scenario():
        async def send(items, deadline):
            await asyncio.sleep(0.01)
            if 2 in items:
                raise RequestError(503, "no answer")
            return items

        queue = BatchQueue(send, max_batch_size=8, max_in_flight=1)
        tasks = [asyncio.create_task(queue.submit(n, time.monotonic() + 5)) for n in (1, 2, 3)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    one, two, three = asyncio.run(scenario())
    assert one == 1  # sent alone, before the others arrived
    assert isinstance(two, RequestError) and isinstance(three, RequestError)


# --- one Ray Serve endpoint for many tenants -----------------------------------------------


@pytest.fixture(scope="module")
def endpoint(store):
    import ray
    from ray import serve

    from serving.endpoint import EndpointConfig, start

    url = start(
        EndpointConfig(
            tenants=["crafts", "gifts"],
            port=free_port(),
            alias_refresh_s=0.5,
            tracking_uri=store["uri"],
        )
    )
    yield url
    serve.shutdown()
    ray.shutdown()


def test_two_tenants_are_served_over_http_sharing_one_backbone(store, endpoint):
    body = EXAMPLE["recommend"]
    status, answer = post(f"{endpoint}/recommend/crafts", body)
    assert status == 200, answer
    assert [i["key"] for i in answer["items"]] == [
        key for key, _ in local_top_k(store["crafts"], body["history"], body["k"])
    ]
    assert answer["items"][0]["text"].startswith("crafts item number")
    scores = [i["score"] for i in answer["items"]]
    assert scores == sorted(scores, reverse=True) and answer["version"] == "1"

    history = ["gifts-i0007", "gifts-i0008"]
    status, answer = post(f"{endpoint}/recommend/gifts", {"history": history, "k": 3})
    assert status == 200, answer
    assert [i["key"] for i in answer["items"]] == [
        key for key, _ in local_top_k(store["gifts"], history, 3)
    ]
    stats = get(f"{endpoint}/-/stats")
    assert len(stats["loaded"]) == 2 and stats["backbones"] == 1


def test_concurrent_requests_batched_together_each_get_their_own_answer(store, endpoint):
    """Requests arriving together for one tenant version are ranked in one call; each still
    gets top_k's answer for its own history and k."""
    assert_concurrent_answers_are_top_k(store, endpoint)


def assert_concurrent_answers_are_top_k(store: dict, url: str, versions=("1", "1")) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    requests = []
    for n in range(32):
        tenant = ("crafts", "gifts")[n % 2]
        items = rng.choice(np.arange(1, 31), size=int(rng.integers(1, 9)), replace=False)
        requests.append((tenant, [f"{tenant}-i{i:04d}" for i in items], int(rng.integers(1, 8))))
    before = get(f"{url}/-/stats")["ingress"]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(
            pool.map(
                lambda r: post(f"{url}/recommend/{r[0]}", {"history": r[1], "k": r[2]}),
                requests,
            )
        )
    after = get(f"{url}/-/stats")["ingress"]
    for (tenant, history, k), (status, answer) in zip(requests, answers, strict=True):
        assert status == 200, answer
        assert answer["version"] == dict(zip(("crafts", "gifts"), versions))[tenant]
        alone = local_top_k(store[tenant], history, k)
        assert [i["key"] for i in answer["items"]] == [key for key, _ in alone]
        assert [i["score"] for i in answer["items"]] == pytest.approx(
            [score for _, score in alone], abs=1e-4
        )
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)  # some went together


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/recommend/nobody", {"history": ["crafts-i0001"]}, 404, "not served here"),
        ("/recommend/crafts", {"history": ["no-such-item"]}, 400, "unknown item"),
        ("/recommend/crafts", {"history": []}, 400, "empty"),
        ("/recommend/crafts", {"history": ["crafts-i0001"], "k": 0}, 400, "k:"),
        ("/recommend/crafts", {"history": ["crafts-i0001"], "k": 31}, 400, "exceeds"),
        ("/recommend/crafts", b'{"history": [', 400, "not valid JSON"),
        ("/recommend/crafts", {"history": "crafts-i0001"}, 400, "list of item keys"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message_and_serving_goes_on(
    endpoint, path, body, status, message
):
    got, answer = post(endpoint + path, body)
    assert got == status and message in answer["error"], answer
    assert post(f"{endpoint}/recommend/crafts", {"history": ["crafts-i0001"], "k": 2})[0] == 200


# --- new items reach the served model ------------------------------------------------------


def test_catalogue_add_registers_a_version_the_endpoint_serves_without_retraining(
    store, endpoint, tmp_path
):
    history = ["crafts-i0003", "crafts-i0004", "crafts-i0005"]
    before = local_top_k(store["crafts"], history, 1)[0][0]
    out = Path(store["crafts"]["output_dir"])
    twin = Catalogue.load(out / "catalogue").vectors[int(before.split("-i")[1])]
    new_items = tmp_path / "new.csv"
    new_items.write_text("item,text\ncrafts-new-1,a twin of the favourite\n")

    result = add_catalogue_version(
        "crafts", new_items, encode=lambda texts, enc: np.stack([twin] * len(texts))
    )
    name = T.adaptor_model_name("crafts")
    assert result == {"model": name, "version": "2", "extends": "1", "alias": T.PRODUCTION,
                      "added": 1, "items": 31}  # fmt: skip
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags[T.EXTENDS_VERSION] == "1" and tags[T.PROMOTED_FROM] == "1"
    old, new = (
        mlflow.pyfunc.load_model(f"models:/{name}/{v}").unwrap_python_model() for v in ("1", "2")
    )
    for key, value in old.model.state_dict().items():  # same weights
        assert torch.equal(value, new.model.state_dict()[key]), key

    deadline = time.monotonic() + 60
    while (answer := post(f"{endpoint}/recommend/crafts", {"history": history, "k": 2})[1])[
        "version"
    ] != "2":
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    keys = {i["key"]: i["score"] for i in answer["items"]}
    assert set(keys) == {before, "crafts-new-1"}
    assert keys["crafts-new-1"] == pytest.approx(keys[before], abs=1e-4)


def test_rollback_and_models_list(store, capsys):
    assert cli(["promote", "--tenant", "crafts", "--version", "1"]) == 0
    name = T.adaptor_model_name("crafts")
    assert alias_version(name, T.PRODUCTION) == "1"
    assert MlflowClient().get_model_version(name, "1").tags[T.PROMOTED_FROM] == "2"
    capsys.readouterr()

    assert cli(["models", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {tuple(line.split()[:2]): line for line in lines[1:]}
    assert set(rows) == {("crafts", "2"), ("crafts", "1"), ("gifts", "1")}
    assert "candidate,production" in rows[("crafts", "1")]
    assert "v1 +1 items" in rows[("crafts", "2")]
    digest = json.loads((store["data"] / "manifest.json").read_text())["digest"][:12]
    ndcg = MlflowClient().get_run(store["gifts"]["run_id"]).data.metrics["test_ndcg_at_10"]
    for needle in (f"{BACKBONE} v1", digest, "transductive", f"{ndcg:.4f}"):
        assert needle in rows[("gifts", "1")]


def test_colocated_ingress_and_models_answer_the_same(store, endpoint):
    """``colocate``: one deployment, no hop to a model replica; the same answers. Replaces the
    module's application on the same port (with direct ingress the old replica holds it until
    it stops), so it runs last but one."""
    from serving.endpoint import EndpointConfig, start

    port = int(endpoint.rsplit(":", 1)[1])
    url = start(
        EndpointConfig(
            tenants=["crafts", "gifts"], port=port, colocate=True, tracking_uri=store["uri"]
        )
    )
    assert_concurrent_answers_are_top_k(store, url)
    stats = get(f"{url}/-/stats")
    assert stats["pid"] == stats["ingress"]["pid"]  # the models live in the ingress
    assert len(stats["loaded"]) == 2 and stats["backbones"] == 1
    assert port in listening_ports(stats["pid"])  # direct ingress (the default): no proxy


def test_ingress_direct_by_default_proxy_on_request(store, endpoint):
    """A one-node Ray serves with direct ingress unless told otherwise; a running Ray Serve
    keeps its mode (asking for the other is refused); ``ingress="proxy"`` puts Ray Serve's
    proxy on the port, with the same answers. Restarts Ray Serve, so it runs last."""
    from ray import serve

    from serving.endpoint import EndpointConfig, start

    port = int(endpoint.rsplit(":", 1)[1])
    assert port in listening_ports(get(f"{endpoint}/-/stats")["ingress"]["pid"])
    with pytest.raises(ConfigError, match="--ingress direct"):
        start(EndpointConfig(tenants=["crafts"], port=port, ingress="proxy"))
    with pytest.raises(ConfigError, match="--replicas 1"):
        EndpointConfig(tenants=["crafts"], colocate=True, replicas=2, ingress="direct").validate()

    serve.shutdown()
    cfg = EndpointConfig(
        tenants=["crafts", "gifts"], port=free_port(), ingress="proxy", tracking_uri=store["uri"]
    )
    url = start(cfg)
    assert cfg.ingress == "proxy"
    assert_concurrent_answers_are_top_k(store, url)
    assert cfg.port not in listening_ports(get(f"{url}/-/stats")["ingress"]["pid"])


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on."""
    import psutil

    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
