"""One HTTP endpoint for many tenants (``unisrec serve --tenants a,b --port P``), on Ray Serve.

    POST /recommend/<tenant>   {"history": ["item-key", ...], "k": 10}
      200 {"tenant": T, "version": V, "items": [{"key": K, "text": TEXT, "score": S}, ...]}
      400 / 404 / 413 {"error": "what is wrong"}     (bad request, unknown tenant, body too large)
      503 {"error": "..."} + Retry-After             (the version cannot be loaded, or no answer
                                                      within request_timeout_s)
    GET  /-/healthz            Ray Serve: 200 "success" while the HTTP server runs (liveness)
    GET  /-/ready              200 when every served tenant's version is loaded or loadable,
                               else 503; per tenant {"version", "ready", "error"}
    GET  /-/tenants            {tenant: version served now}
    GET  /-/stats              the ingress's counters and one model replica's

Two deployments:

* ``Endpoint`` (the ingress, FastAPI, one replica, no torch): checks the request, resolves
  the tenant's ``production`` alias (cached; re-read in the background every
  ``alias_refresh_s``; a new version is loaded before traffic moves to it), and hands the
  request to the tenant version's :class:`BatchQueue`: concurrent requests of one version
  go to ``TenantModels`` as one call. It owns every answer: a model replica that dies
  mid-call is retried (an answer is idempotent) until the request's deadline, then 503.
* ``TenantModels`` (``replicas`` replicas): loads a tenant version on first use with
  ``@serve.multiplexed`` (at most ``max_tenants_per_replica``, least recently used dropped),
  keeps its :class:`~adaptors.topk.RankingTable` (the catalogue's item vectors, ready to
  score), and ranks a call's requests with one encoder pass and one scoring product in its
  own thread, off the replica's event loop. Calls of a version are routed to replicas that
  hold it. Tenants on the same backbone version share one copy of its frozen encoder parts. A
  version that fails to load is remembered for ``alias_refresh_s`` and answered with a 503
  naming it.

Who takes the HTTP connections (``ingress``, ``unisrec serve --ingress``): with "direct"
(the default on a one-node Ray) the ingress replica itself, on the port (Ray Serve's direct
ingress; Serve still starts its proxy, on another port nobody uses); with "proxy" Ray
Serve's HTTP proxy, which hands every request to the ingress replica over Ray. The proxy
costs more CPU per request than the rest of the endpoint together on 2 cores.

Why the time goes where it goes (docs/benchmarks.md, "Serving"): every request crosses the
ingress (and the proxy, if there is one); the hop to a model replica is paid once per batch,
not per request. ``colocate`` (``unisrec serve --colocate``) puts the models in the
ingress's replicas: no hop at all, but a replica lost mid-request then drops its
connections (through the proxy: the proxy's plain-text 500), no 503 from the ingress.

Everything binds to 127.0.0.1.
"""

# No ``from __future__ import annotations``: FastAPI reads the route handlers' annotations
# (``request: Request``) at run time, and Request is imported inside build_app.
import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

from unisrec import tags as T
from unisrec.errors import ConfigError

APP_NAME = "unisrec"
logger = logging.getLogger("ray.serve")


@dataclass
class EndpointConfig:
    tenants: list[str] = field(default_factory=list)  # tenants served; others get 404
    port: int = 8000  # on 127.0.0.1
    replicas: int = 1  # TenantModels replicas (colocated: Endpoint replicas)
    max_tenants_per_replica: int = 8  # loaded tenant versions per replica (LRU)
    alias: str = T.PRODUCTION  # the alias served
    alias_refresh_s: float = 5.0  # how long a resolved alias is trusted
    max_k: int = 1000
    torch_threads: int = 1  # per model replica
    max_batch_size: int = 32  # requests of one tenant version ranked in one pass
    calls_per_replica: int = 1  # a version's calls in flight per model replica
    request_timeout_s: float = 10.0  # a request not answered by then gets a 503
    max_body_bytes: int = 65536  # a larger request body gets a 413
    access_log: bool = False  # Ray Serve's line per request (costs CPU on every hop)
    # Ingress and models in one deployment: no hop between them (a lone request about a
    # third faster), but a replica lost mid-request answers no 503: its connections drop
    # (through the proxy: the proxy's plain-text 500), new ones wait for its replacement.
    colocate: bool = False
    # Who takes the HTTP connections on 127.0.0.1:port. "direct": the ingress replica itself
    # (Ray Serve's direct ingress; no proxy process in the path, a third of the CPU per
    # request); needs one ingress replica on this machine. "proxy": Ray Serve's HTTP proxy,
    # which hands each request to an ingress replica. "auto": direct on a one-node Ray unless
    # colocated replicas > 1. A running Ray Serve keeps the one it started with.
    ingress: str = "auto"
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db

    def validate(self) -> None:
        if not self.tenants:
            raise ConfigError("--tenants: name at least one tenant")
        for tenant in self.tenants:
            T.validate_tenant_name(tenant)
        if self.replicas < 1 or self.max_tenants_per_replica < 1:
            raise ConfigError("--replicas and --max-tenants-per-replica must be >= 1")
        if self.max_batch_size < 1 or self.calls_per_replica < 1:
            raise ConfigError("--max-batch-size and calls_per_replica must be >= 1")
        if self.request_timeout_s <= 0 or self.alias_refresh_s <= 0:
            raise ConfigError("--request-timeout and --alias-refresh must be > 0")
        if self.ingress not in ("auto", "direct", "proxy"):
            raise ConfigError(f"--ingress: auto, direct or proxy, not {self.ingress!r}")
        if self.ingress == "direct" and self.colocate and self.replicas > 1:
            raise ConfigError(
                "--ingress direct serves from one ingress replica on --port: with --colocate, "
                "use --replicas 1 (or --ingress proxy)"
            )


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's settings (read from the environment by its controller and replicas when
    they start) that make the ingress replica serve HTTP itself on ``port`` alone. The
    replica leaving (a kill, a redeploy) frees the port at once: no load balancer in front
    needs a draining period, nor the port a quarantine."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


class RequestError(Exception):
    """A request the endpoint refuses: HTTP ``status`` and a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_request(body: bytes, max_k: int) -> tuple[list[str], int]:
    """``(history, k)`` from a request body; RequestError(400) saying what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise RequestError(400, 'body must be a JSON object: {"history": [...], "k": 10}')
    unknown = sorted(set(data) - {"history", "k"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; expected history and k")
    history = data.get("history")
    if not isinstance(history, list) or not all(isinstance(h, str) and h for h in history):
        raise RequestError(400, "history: expected a list of item keys (strings), oldest first")
    if not history:
        raise RequestError(400, "history: empty; give at least one item key")
    k = data.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise RequestError(400, f"k: expected an integer from 1 to {max_k}, got {k!r}")
    return history, k


def check_tenants(cfg: EndpointConfig) -> dict[str, str]:
    """``{tenant: version}`` the alias points at now; ConfigError naming the tenants without."""
    from serving.lifecycle import alias_version

    versions = {t: alias_version(T.adaptor_model_name(t), cfg.alias) for t in cfg.tenants}
    missing = [t for t, v in versions.items() if v is None]
    if missing:
        raise ConfigError(
            f"--tenants: {', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} no "
            f"{cfg.alias!r} version; promote one first (unisrec promote --tenant {missing[0]})"
        )
    return versions  # type: ignore[return-value]


class BatchQueue:
    """Requests of one tenant version waiting to be ranked together.

    A request leaves at once while fewer than ``max_in_flight`` calls are out; otherwise it
    waits, and the waiting requests leave together (at most ``max_batch_size``) as soon as a
    call returns. A lone request waits for nothing (no timer, unlike ``@serve.batch``, whose
    every batch waits ``batch_wait_timeout_s`` for company); under load a batch is whatever
    arrived during the previous call. ``send(items, deadline)`` ranks one batch and returns
    one result per item; its exception goes to every request of the batch. ``deadline`` is
    the oldest request's (``time.monotonic()``).
    """

    def __init__(
        self,
        send: Callable[[list, float], Awaitable[list]],
        max_batch_size: int,
        max_in_flight: int,
    ):
        self.send = send
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self.waiting: list[tuple[object, float, asyncio.Future]] = []
        self.in_flight = 0
        self.batches = 0
        self.requests = 0
        self.call_seconds = 0.0  # summed round trips of the calls
        self.calls: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def submit(self, item: object, deadline: float):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((item, deadline, future))
        if self.in_flight < self.max_in_flight:
            self._launch()
        return await future

    def _launch(self) -> None:
        batch = self.waiting[: self.max_batch_size]
        del self.waiting[: self.max_batch_size]
        self.in_flight += 1
        self.batches += 1
        self.requests += len(batch)
        task = asyncio.create_task(self._run(batch))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _run(self, batch: list[tuple[object, float, asyncio.Future]]) -> None:
        started = time.perf_counter()
        try:
            results = await self.send([item for item, _, _ in batch], min(d for _, d, _ in batch))
        except Exception as err:  # noqa: BLE001 - every request of the batch gets it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(err)
        else:
            for (_, _, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self.call_seconds += time.perf_counter() - started
            self.in_flight -= 1
            if self.waiting and self.in_flight < self.max_in_flight:
                self._launch()


def rank_requests(recommender, table, requests: list[tuple[list[str], int]]) -> list[dict]:
    """One answer per ``(history, k)``: ``{"items": [{"key", "text", "score"}]}`` or
    ``{"status": 400, "error": ...}``. The valid histories are ranked together: one encoder
    pass over them, one ``(B, C)`` scoring product, top-k of the largest k, each cut to its
    own k (so each answer is :func:`~adaptors.topk.top_k`'s for its history alone, up to
    float rounding of the batched products)."""
    from adaptors.topk import top_k

    catalogue = recommender.catalogue
    answers: list[dict | None] = [None] * len(requests)
    valid = []
    for row, (history, k) in enumerate(requests):
        unknown = [h for h in history if h not in catalogue]
        if k > len(catalogue):
            answers[row] = _error(400, f"k: {k} exceeds the catalogue's {len(catalogue)} items")
        elif unknown:
            answers[row] = _error(400, f"history: unknown item key(s) {unknown[:5]}")
        else:
            valid.append(row)
    if valid:
        ranked = top_k(
            recommender.model,
            recommender.spec,
            catalogue,
            [requests[row][0] for row in valid],
            k=max(requests[row][1] for row in valid),
            table=table,
        )
        for row, recs in zip(valid, ranked, strict=True):
            recs = recs[: requests[row][1]]
            indexes = catalogue.indexes([key for key, _ in recs])
            answers[row] = {
                "items": [
                    {"key": key, "text": catalogue.texts[index - 1], "score": score}
                    for (key, score), index in zip(recs, indexes, strict=True)
                ]
            }
    return answers  # type: ignore[return-value]


def share_frozen_encoder(model, shared: dict) -> None:
    """Point the parts of ``model.encoder`` that fine-tuning froze (the Transformer blocks,
    the positions) at the copies in ``shared`` (``{part name: module}``, filled by the first
    model of a backbone version), keeping the parts the tenant tuned (the input LayerNorm) as
    its own."""
    tuned = {id(p) for p in model.tuned_parameters()}
    for name, part in list(model.encoder.named_children()):
        parameters = list(part.parameters())
        if parameters and not any(id(p) in tuned for p in parameters):
            setattr(model.encoder, name, shared.setdefault(name, part))


def _error(status: int, message: str) -> dict:
    return {"status": status, "error": message}


def _timed(function, *args):
    started = time.perf_counter()
    return function(*args), time.perf_counter() - started


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def reuse_direct_ingress_port() -> None:
    """Make this replica's direct-ingress HTTP server bind its port with SO_REUSEPORT.

    Ray Serve binds the port without it, so a replica's replacement (after a kill, or a
    redeploy) cannot bind while the connections its predecessor closed linger in the kernel
    (FIN-WAIT/TIME-WAIT, up to a minute, whenever clients keep connections alive), and Serve
    then takes the port out of its pool for good: the endpoint never comes back. Ray's own
    server start has the option (its proxies use it); this turns it on for the ingress."""
    from ray.serve._private import replica

    start_server = getattr(replica, "start_asgi_http_server", None)
    if start_server is None:  # another Ray layout: its own binding, and a warning once
        logging.getLogger(__name__).warning(
            "direct ingress: this Ray has no replica.start_asgi_http_server; a replaced "
            "ingress replica may not get its port back while old connections linger"
        )
        return
    if getattr(start_server, "reuses_port", False):
        return

    async def start_with_reuse(app, http_options, **kwargs):
        return await start_server(app, http_options, **{**kwargs, "enable_so_reuseport": True})

    start_with_reuse.reuses_port = True
    replica.start_asgi_http_server = start_with_reuse


def build_app(cfg: EndpointConfig):
    """The Ray Serve application (pass it to ``serve.run``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from ray import serve
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    from unisrec.access import Credentials, use_credentials

    api = FastAPI(title="unisrec recommendations")
    settings = asdict(cfg)
    logging_config = {"enable_access_log": cfg.access_log}
    # Replicas call the tracking server as the user who started the endpoint, whether this
    # process started Ray or joined a running one: an argument of theirs (shown nowhere),
    # not their runtime_env (Ray shows its env_vars in the dashboard and the state API).
    credentials = Credentials.current()
    env = direct_ingress_env(cfg.port) if cfg.ingress == "direct" else {}
    replica_options = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    # A model replica died or is being replaced: the same call again reaches another replica
    # or the replacement.
    replica_gone = (RayActorError, WorkerCrashedError, ReplicaUnavailableError, BackPressureError)

    class TenantModels:
        def __init__(self, settings: dict, credentials: Credentials | None = None):
            from concurrent.futures import ThreadPoolExecutor

            import torch

            from unisrec.tracking import configure_mlflow

            torch.set_num_threads(settings["torch_threads"])
            use_credentials(credentials)
            configure_mlflow(settings["tracking_uri"])
            self.retry_load_s = settings["alias_refresh_s"]
            self.encoders: dict = {}  # (backbone name, version) -> {frozen encoder part: module}
            self.loaded: list[str] = []
            self.failed: dict[str, tuple[str, float]] = {}  # model id -> (message, when)
            # Ranking runs here, one batch at a time: the event loop keeps taking calls.
            self.ranker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank")
            # rank: ranking itself; wait: queued behind another call's ranking
            self.counts = {"calls": 0, "requests": 0, "rank_seconds": 0.0, "wait_seconds": 0.0}

        @serve.multiplexed(max_num_models_per_replica=cfg.max_tenants_per_replica)
        async def tenant_model(self, model_id: str):
            return await asyncio.to_thread(self._load, model_id)

        def _load(self, model_id: str):
            from adaptors.publish import load_adaptor
            from adaptors.topk import ranking_table

            name, version = model_id.rsplit("/", 1)
            recommender = load_adaptor(f"models:/{name}/{version}")
            spec = recommender.spec
            if spec.backbone_name and not spec.trains_everything:
                # The encoder's frozen parts are the backbone's: one copy for every tenant on it.
                key = (spec.backbone_name, spec.backbone_version)
                share_frozen_encoder(recommender.model, self.encoders.setdefault(key, {}))
            table = ranking_table(
                recommender.model, spec, recommender.catalogue, recommender.item_vectors
            )
            self.loaded.append(model_id)
            return recommender, table

        async def _model(self, model_id: str):
            """The loaded ``(recommender, table)``, or an error answer naming the version."""
            failed = self.failed.get(model_id)
            if failed and time.monotonic() - failed[1] < self.retry_load_s:
                return _error(503, failed[0])
            try:
                model = await self.tenant_model(model_id)
            except Exception as err:  # noqa: BLE001 - unreadable artifacts, a bad version
                name, version = model_id.rsplit("/", 1)
                first_line = (str(err).strip().splitlines() or [""])[0][:300]
                message = (
                    f"version {version} of {name} cannot be loaded "
                    f"({type(err).__name__}: {first_line}); promote a working version "
                    "(unisrec promote --tenant TENANT --version N)"
                )
                logger.exception("loading %s failed", model_id)
                self.failed[model_id] = (message, time.monotonic())
                return _error(503, message)
            self.failed.pop(model_id, None)
            return model

        async def rank(
            self, requests: list[tuple[list[str], int]], model_id: str = ""
        ) -> list[dict]:
            model = await self._model(model_id or serve.get_multiplexed_model_id())
            if isinstance(model, dict):
                return [model] * len(requests)
            started = time.perf_counter()
            answers, seconds = await asyncio.get_running_loop().run_in_executor(
                self.ranker, _timed, rank_requests, *model, requests
            )
            self.counts["calls"] += 1
            self.counts["requests"] += len(requests)
            self.counts["rank_seconds"] += seconds
            self.counts["wait_seconds"] += time.perf_counter() - started - seconds
            return answers

        async def ready(self, model_id: str = "") -> dict:
            """Load this call's version (if it is not loaded): ``{}`` or an error answer."""
            model = await self._model(model_id or serve.get_multiplexed_model_id())
            return model if isinstance(model, dict) else {}

        def stats(self) -> dict:
            return {
                "backbones": len(self.encoders),
                "loaded": list(self.loaded),
                "failed": {k: m for k, (m, _) in self.failed.items()},
                "pid": os.getpid(),
                "rss_mib": _rss_mib(),
                **self.counts,
            }

    @serve.deployment(
        num_replicas=cfg.replicas if cfg.colocate else 1,
        # The ingress takes every request the proxy has: a replica at its limit makes the
        # proxy back off and retry (the old default of 5 queued 8 clients there).
        max_ongoing_requests=1000,
        ray_actor_options=replica_options,
        logging_config=logging_config,
    )
    @serve.ingress(api)
    class Endpoint:
        def __init__(self, models, settings: dict, credentials: Credentials | None = None):
            from unisrec.tracking import configure_mlflow

            if settings["ingress"] == "direct":
                reuse_direct_ingress_port()  # before Serve starts this replica's server
            use_credentials(credentials)
            configure_mlflow(settings["tracking_uri"])
            self.models = models  # a handle to the TenantModels deployment, or None:
            colocated = models is None
            self.local = TenantModels(settings, credentials) if colocated else None
            self.cfg = EndpointConfig(**settings)
            self.versions: dict[str, tuple[str | None, float]] = {}  # tenant -> (version, when)
            self.refreshing: dict[str, asyncio.Task] = {}
            self.queues: dict[str, BatchQueue] = {}
            self.handles: dict = {}
            # handle_seconds: from the request's arrival here to its answer, summed
            self.counts = {
                "answered": 0,
                "handle_seconds": 0.0,
                "retries": 0,
                "timeouts": 0,
                "errors": 0,
            }

        # --- which version serves a tenant ---------------------------------------------

        async def _version(self, tenant: str) -> str:
            if tenant not in self.cfg.tenants:
                raise RequestError(
                    404, f"tenant {tenant!r} is not served here (serving: {self.cfg.tenants})"
                )
            cached = self.versions.get(tenant)
            if cached is None:  # the first request of a tenant waits for its alias
                # shielded: a caller that goes away must not cancel the others' answer
                version = await asyncio.shield(self._refresh_task(tenant))
            else:
                version, fetched = cached
                if time.monotonic() - fetched > self.cfg.alias_refresh_s:
                    self._refresh_task(tenant)  # the others go on with the cached version
            if version is None:
                raise RequestError(404, f"tenant {tenant!r} has no {self.cfg.alias!r} version")
            return version

        def _refresh_task(self, tenant: str) -> asyncio.Task:
            task = self.refreshing.get(tenant)
            if task is None or task.done():
                task = self.refreshing[tenant] = asyncio.create_task(self._refresh(tenant))
            return task

        async def _refresh(self, tenant: str) -> str | None:
            from serving.lifecycle import alias_version

            cached = self.versions.get(tenant, (None, 0.0))[0]
            try:
                name = T.adaptor_model_name(tenant)
                version = await asyncio.to_thread(alias_version, name, self.cfg.alias)
            except Exception as err:  # noqa: BLE001 - the registry is down: keep what we have
                logger.warning("cannot re-read %s's %s alias: %s", tenant, self.cfg.alias, err)
                if cached is None:
                    raise RequestError(
                        503, f"tenant {tenant!r}: cannot read its {self.cfg.alias!r} alias ({err})"
                    ) from err
                self.versions[tenant] = (cached, time.monotonic())
                return cached
            if cached is not None and version is not None and version != cached:
                # Load the new version before traffic moves to it (a version that cannot
                # load moves anyway: its requests get the 503 that names it).
                deadline = time.monotonic() + max(60.0, self.cfg.request_timeout_s)
                try:
                    await self._call(tenant, version, "ready", None, deadline)
                except Exception as err:  # noqa: BLE001
                    logger.warning("warming %s version %s: %s", tenant, version, err)
            self.versions[tenant] = (version, time.monotonic())
            return version

        # --- one call to the model replicas, a batch of requests --------------------------

        async def _call(self, tenant: str, version: str, method: str, payload, deadline: float):
            model_id = f"{T.adaptor_model_name(tenant)}/{version}"
            if self.local is not None:
                call = getattr(self.local, method)
                args = (payload,) if payload is not None else ()
                try:
                    return await asyncio.wait_for(
                        call(*args, model_id=model_id), deadline - time.monotonic()
                    )
                except TimeoutError:
                    self.counts["timeouts"] += 1
                    raise self._unanswered(tenant, version) from None
            handle = self.handles.get(model_id)
            if handle is None:
                handle = self.handles[model_id] = self.models.options(multiplexed_model_id=model_id)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                call = getattr(handle, method)
                response = call.remote(payload) if payload is not None else call.remote()
                try:
                    return await asyncio.wait_for(_awaited(response), remaining)
                except TimeoutError:
                    response.cancel()
                    break
                except replica_gone as err:
                    self.counts["retries"] += 1
                    logger.warning("%s of %s: %s; trying again", method, model_id, type(err))
                    await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            self.counts["timeouts"] += 1
            raise self._unanswered(tenant, version)

        def _unanswered(self, tenant: str, version: str) -> RequestError:
            return RequestError(
                503,
                f"tenant {tenant!r} version {version}: no answer within "
                f"{self.cfg.request_timeout_s:g} s (model replicas restarting or overloaded); "
                "retry later",
            )

        def _queue(self, tenant: str, version: str) -> BatchQueue:
            key = f"{tenant}/{version}"
            queue = self.queues.get(key)
            if queue is None:

                async def send(requests: list, deadline: float) -> list:
                    return await self._call(tenant, version, "rank", requests, deadline)

                queue = self.queues[key] = BatchQueue(
                    send,
                    self.cfg.max_batch_size,
                    self.cfg.calls_per_replica * self.cfg.replicas,
                )
            return queue

        # --- routes --------------------------------------------------------------------

        @api.post("/recommend/{tenant}")
        async def recommend(self, tenant: str, request: Request):
            started = time.perf_counter()
            try:
                return await self._recommend(tenant, request)
            finally:
                self.counts["answered"] += 1
                self.counts["handle_seconds"] += time.perf_counter() - started

        async def _recommend(self, tenant: str, request):
            deadline = time.monotonic() + self.cfg.request_timeout_s
            try:
                body = await _read_body(request, self.cfg.max_body_bytes)
                history, k = parse_request(body, self.cfg.max_k)
                version = await self._version(tenant)
                result = await self._queue(tenant, version).submit((history, k), deadline)
            except RequestError as err:
                return _json_error(err.status, err.message)
            except Exception as err:  # noqa: BLE001 - a bug: its traceback goes to the log only
                self.counts["errors"] += 1
                logger.exception("POST /recommend/%s failed", tenant)
                return _json_error(500, f"internal error ({type(err).__name__}); see the log")
            if "error" in result:
                return _json_error(result["status"], result["error"])
            body = {"tenant": tenant, "version": version, "items": result["items"]}
            return Response(json.dumps(body), media_type="application/json")

        @api.get("/-/ready")
        async def ready(self):
            deadline = time.monotonic() + self.cfg.request_timeout_s
            tenants = {}
            for tenant in self.cfg.tenants:
                try:
                    version = await self._version(tenant)
                    answer = await self._call(tenant, version, "ready", None, deadline)
                    error = answer.get("error")
                except RequestError as err:
                    version, error = self.versions.get(tenant, (None, 0.0))[0], err.message
                tenants[tenant] = {"version": version, "ready": error is None}
                if error is not None:
                    tenants[tenant]["error"] = error
            ready = all(t["ready"] for t in tenants.values())
            return JSONResponse({"ready": ready, "tenants": tenants}, 200 if ready else 503)

        @api.get("/-/tenants")
        async def tenants(self):
            served = {}
            for tenant in self.cfg.tenants:
                try:
                    served[tenant] = await self._version(tenant)
                except RequestError:
                    served[tenant] = None
            return served

        @api.get("/-/stats")
        async def stats(self):
            batches = sum(q.batches for q in self.queues.values())
            requests = sum(q.requests for q in self.queues.values())
            try:
                models = (
                    self.local.stats()
                    if self.local is not None
                    else await asyncio.wait_for(
                        _awaited(self.models.stats.remote()), self.cfg.request_timeout_s
                    )
                )
            except Exception as err:  # noqa: BLE001 - the ingress's own figures still count
                models = {"error": f"no model replica answered ({type(err).__name__})"}
            return {
                **models,
                "ingress": {
                    "pid": os.getpid(),
                    "rss_mib": _rss_mib(),
                    "requests": requests,  # ranked (went to a model replica)
                    "batches": batches,
                    "call_seconds": sum(q.call_seconds for q in self.queues.values()),
                    **self.counts,
                },
            }

    if cfg.colocate:
        return Endpoint.bind(None, settings, credentials)
    models = serve.deployment(
        TenantModels,
        num_replicas=cfg.replicas,
        max_ongoing_requests=64,  # calls, each a batch; the ingress bounds them per version
        ray_actor_options=replica_options,
        logging_config=logging_config,
    )
    return Endpoint.bind(models.bind(settings, credentials), settings, credentials)


async def _awaited(response):
    return await response


async def _read_body(request, limit: int) -> bytes:
    """The request body; RequestError(413) past ``limit`` bytes, refused before reading it
    when the Content-Length says so."""
    declared = request.headers.get("content-length")
    too_large = RequestError(413, f"request body over {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json_error(status: int, message: str):
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def start(cfg: EndpointConfig) -> str:
    """Start (or update) the application on 127.0.0.1:``cfg.port`` in the current Ray (a
    local one is started if needed); returns its base URL. Checks the tenants first, and
    settles ``cfg.ingress`` ("auto" becomes "direct" or "proxy").

    With direct ingress the ingress replica listens on the port and Ray Serve's proxy (which
    Serve starts anyway) on another, unused one. Which of the two a Ray Serve instance does
    is fixed when it starts: a running one keeps its own, and asking for the other is refused.
    Updating a direct-ingress application stops it first (its replica holds the port)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from unisrec.runtime import ensure_ray, free_port
    from unisrec.tracking import configure_mlflow

    cfg.validate()
    cfg.tracking_uri = configure_mlflow(cfg.tracking_uri)
    check_tenants(cfg)
    ensure_ray()
    running = _get_global_client(raise_if_no_controller_running=False)
    if running is not None:
        proxy_port = running.http_config.port
        groups = ray.get(running._controller.get_target_groups.remote())
        if proxy_port == cfg.port:
            mode = "proxy"
        elif any(target.port == cfg.port for group in groups for target in group.targets):
            mode = "direct"  # an ingress replica of this Ray Serve listens on the port
        else:
            raise ConfigError(
                f"Ray Serve already runs in this Ray, not on port {cfg.port}; shut it down "
                "(serve shutdown) or serve on its port"
            )
        if cfg.ingress not in ("auto", mode):
            raise ConfigError(
                f"Ray Serve already runs in this Ray with --ingress {mode}; shut it down "
                "(serve shutdown) to change it"
            )
        cfg.ingress = mode
    else:
        if cfg.ingress == "auto":
            one_node = sum(node["Alive"] for node in ray.nodes()) == 1
            many_ingress = cfg.colocate and cfg.replicas > 1
            cfg.ingress = "direct" if one_node and not many_ingress else "proxy"
        proxy_port = free_port() if cfg.ingress == "direct" else cfg.port
    cfg.validate()
    serve.start(
        # The proxy's own limit only backs up the ingress's (it answers 408 in plain text).
        http_options={
            "host": "127.0.0.1",
            "port": proxy_port,
            "request_timeout_s": cfg.request_timeout_s + 30,
        },
        logging_config={"enable_access_log": cfg.access_log},
        controller_options=(
            {"runtime_env": {"env_vars": direct_ingress_env(cfg.port)}}
            if cfg.ingress == "direct"
            else None
        ),
    )
    if running is not None and cfg.ingress == "direct" and APP_NAME in serve.status().applications:
        # The port is the running ingress replica's until it stops, and a rolling update
        # starts the new one first: stop the old application (requests in between are refused).
        serve.delete(APP_NAME)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{cfg.port}"
