"""One HTTP endpoint for many tenants (``unisrec serve --tenants a,b --port P``), on Ray Serve.

    POST /recommend/<tenant>   {"history": ["item-key", ...], "k": 10}
      200 {"tenant": T, "version": V, "items": [{"key": K, "text": TEXT, "score": S}, ...]}
      4xx {"error": "what is wrong"}                 (the endpoint keeps serving)
    GET  /-/tenants            {tenant: version served now}
    GET  /-/stats              per replica: tenants loaded, backbones held

Two deployments:

* ``Endpoint`` (ingress, FastAPI): checks the request, resolves the tenant's ``production``
  alias to a version (re-read every ``alias_refresh_s`` seconds, so a promotion or a
  ``unisrec catalogue add`` reaches the endpoint without a restart), and calls
* ``TenantModels`` (``replicas`` replicas): loads a tenant version on first use with
  ``@serve.multiplexed`` (at most ``max_tenants_per_replica``, least recently used dropped)
  and ranks its catalogue. Requests for a version are routed to a replica that holds it.
  Tenants on the same backbone version share one copy of its frozen sequence encoder; a
  loaded version keeps its catalogue's item vectors, so a request encodes only its history.

Everything binds to 127.0.0.1.
"""

# No ``from __future__ import annotations``: FastAPI reads the route handlers' annotations
# (``request: Request``) at run time, and Request is imported inside build_app.
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

from unisrec import tags as T
from unisrec.errors import ConfigError

APP_NAME = "unisrec"


@dataclass
class EndpointConfig:
    tenants: list[str] = field(default_factory=list)  # tenants served; others get 404
    port: int = 8000  # on 127.0.0.1
    replicas: int = 1  # TenantModels replicas
    max_tenants_per_replica: int = 8  # loaded tenant versions per replica (LRU)
    alias: str = T.PRODUCTION  # the alias served
    alias_refresh_s: float = 5.0  # how long a resolved alias is trusted
    max_k: int = 1000
    torch_threads: int = 1  # per replica
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db

    def validate(self) -> None:
        if not self.tenants:
            raise ConfigError("--tenants: name at least one tenant")
        for tenant in self.tenants:
            T.validate_tenant_name(tenant)
        if self.replicas < 1 or self.max_tenants_per_replica < 1:
            raise ConfigError("--replicas and --max-tenants-per-replica must be >= 1")


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


def build_app(cfg: EndpointConfig):
    """The Ray Serve application (pass it to ``serve.run``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="unisrec recommendations")
    settings = asdict(cfg)

    @serve.deployment(num_replicas=cfg.replicas, ray_actor_options={"num_cpus": 0})
    class TenantModels:
        def __init__(self, settings: dict):
            import torch

            from unisrec.tracking import configure_mlflow

            torch.set_num_threads(settings["torch_threads"])
            configure_mlflow(settings["tracking_uri"])
            self.encoders: dict = {}  # (backbone name, version) -> shared SequenceEncoder
            self.loaded: list[str] = []

        @serve.multiplexed(max_num_models_per_replica=cfg.max_tenants_per_replica)
        async def tenant_model(self, model_id: str):
            return await asyncio.to_thread(self._load, model_id)

        def _load(self, model_id: str):
            from adaptors.publish import load_adaptor

            name, version = model_id.rsplit("/", 1)
            recommender = load_adaptor(f"models:/{name}/{version}")
            spec = recommender.spec
            if spec.backbone_name and not spec.trains_everything:
                # The encoder is the backbone's, frozen: one copy serves every tenant on it.
                key = (spec.backbone_name, spec.backbone_version)
                recommender.model.encoder = self.encoders.setdefault(key, recommender.model.encoder)
            self.loaded.append(model_id)
            return recommender

        async def recommend(self, history: list[str], k: int) -> dict:
            from adaptors.topk import top_k

            recommender = await self.tenant_model(serve.get_multiplexed_model_id())
            catalogue = recommender.catalogue
            if k > len(catalogue):
                return _error(400, f"k: {k} exceeds the catalogue's {len(catalogue)} items")
            unknown = [h for h in history if h not in catalogue]
            if unknown:
                return _error(400, f"history: unknown item key(s) {unknown[:5]}")
            recs = top_k(
                recommender.model,
                recommender.spec,
                catalogue,
                [history],
                k=k,
                item_vectors=recommender.item_vectors,  # computed once, when it loaded
            )[0]
            return {
                "items": [
                    {"key": key, "text": catalogue.texts[index - 1], "score": score}
                    for (key, score), index in zip(
                        recs, catalogue.indexes([key for key, _ in recs]), strict=True
                    )
                ]
            }

        def stats(self) -> dict:
            return {"backbones": len(self.encoders), "loaded": list(self.loaded)}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Endpoint:
        def __init__(self, models, settings: dict):
            from unisrec.tracking import configure_mlflow

            configure_mlflow(settings["tracking_uri"])
            self.models = models
            self.cfg = EndpointConfig(**settings)
            self.versions: dict[str, tuple[str | None, float]] = {}

        async def _version(self, tenant: str) -> str:
            if tenant not in self.cfg.tenants:
                raise RequestError(
                    404, f"tenant {tenant!r} is not served here (serving: {self.cfg.tenants})"
                )
            version, fetched = self.versions.get(tenant, (None, 0.0))
            if version is None or time.monotonic() - fetched > self.cfg.alias_refresh_s:
                from serving.lifecycle import alias_version

                name = T.adaptor_model_name(tenant)
                version = await asyncio.to_thread(alias_version, name, self.cfg.alias)
                self.versions[tenant] = (version, time.monotonic())
            if version is None:
                raise RequestError(404, f"tenant {tenant!r} has no {self.cfg.alias!r} version")
            return version

        @api.post("/recommend/{tenant}")
        async def recommend(self, tenant: str, request: Request):
            try:
                history, k = parse_request(await request.body(), self.cfg.max_k)
                version = await self._version(tenant)
            except RequestError as err:
                return JSONResponse({"error": err.message}, status_code=err.status)
            model_id = f"{T.adaptor_model_name(tenant)}/{version}"
            handle = self.models.options(multiplexed_model_id=model_id)
            result = await handle.recommend.remote(history, k)
            if "error" in result:
                return JSONResponse({"error": result["error"]}, status_code=result["status"])
            return {"tenant": tenant, "version": version, "items": result["items"]}

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
            return await self.models.stats.remote()

    return Endpoint.bind(TenantModels.bind(settings), settings)


def _error(status: int, message: str) -> dict:
    return {"status": status, "error": message}


def start(cfg: EndpointConfig) -> str:
    """Start (or update) the application on 127.0.0.1:``cfg.port`` in the current Ray (a
    local one is started if needed); returns its base URL. Checks the tenants first."""
    from ray import serve

    from unisrec.runtime import ensure_ray
    from unisrec.tracking import configure_mlflow

    cfg.validate()
    cfg.tracking_uri = configure_mlflow(cfg.tracking_uri)
    check_tenants(cfg)
    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{cfg.port}"
