"""Encode item texts on a Ray Data actor pool (``encoder.backend: ray``).

Each actor loads the encoder once and then encodes whole batches; every row carries its
input position, so the vectors come back in input order whatever order Ray finishes them.

Ray: an already initialised Ray in this process is used as it is, and ``RAY_ADDRESS``
names a cluster to join. Otherwise a private local Ray is started on loopback for the call
and shut down after it; a Ray some other process started on this machine is never joined.
``ray`` is imported only when needed, because its first import fixes whether a local Ray
stays on loopback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import numpy as np

from sharding.config import EncoderConfig
from sharding.text_encoder import TextEncoder, model_dim

log = logging.getLogger(__name__)


class EncoderActor:
    """Ray Data callable class: ``{"i", "text"}`` batches -> ``{"i", "vector"}`` batches."""

    def __init__(self, cfg: EncoderConfig):
        self.encoder = TextEncoder.from_config(cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``i`` ``(B,) int64``, ``text`` ``(B,) object`` -> ``i``, ``vector`` ``(B, dim) float32``."""
        vectors = self.encoder.encode(batch["text"].tolist(), progress=False)
        return {"i": batch["i"], "vector": vectors}


def _start_ray_if_needed() -> bool:
    """Make sure Ray is initialised; True when this call started it (and must shut it down)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init()
        return True
    # Ray reads this when first imported, hence the late import: without it a local Ray
    # listens on the machine's network address, not on loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    # "local" starts a new instance instead of joining whatever Ray last ran on this machine.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    address = ray.util.get_node_ip_address()
    if address != "127.0.0.1":
        log.warning(
            "local Ray listens on %s, not loopback: ray was imported before "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set; export it to keep Ray on 127.0.0.1",
            address,
        )
    return True


def _gpus_per_actor(device: str, cluster_gpus: float) -> float:
    if device == "cpu":
        return 0.0
    if device.startswith("cuda"):
        return 1.0
    return 1.0 if cluster_gpus >= 1.0 else 0.0


def encode_with_ray(texts: Sequence[str], cfg: EncoderConfig, progress: bool = True) -> np.ndarray:
    """Encode ``texts`` on ``cfg.ray_actors`` actors; returns ``(N, dim) float32`` in input order."""
    out = np.empty((len(texts), model_dim(cfg.model)), dtype=np.float32)
    if not texts:
        return out
    order = range(len(texts))
    if cfg.bucket_by_length:
        # Ray batches are cut in dataset order, so similar lengths must sit next to each other
        # here; characters stand in for tokens to spare the driver a tokenizer.
        order = sorted(order, key=lambda i: -len(texts[i]))
    started = _start_ray_if_needed()
    import ray  # only now: see _start_ray_if_needed

    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        dataset = ray.data.from_items([{"i": i, "text": texts[i]} for i in order])
        encoded = dataset.map_batches(
            EncoderActor,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.batch_size,
            # ``concurrency=`` is deprecated for map_batches in Ray 2.60 in favour of this.
            compute=ray.data.ActorPoolStrategy(size=cfg.ray_actors),
            num_gpus=_gpus_per_actor(cfg.device, ray.cluster_resources().get("GPU", 0.0)),
        )
        filled = 0
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            out[batch["i"]] = batch["vector"]
            filled += len(batch["i"])
    finally:
        if started:
            ray.shutdown()
    if filled != len(texts):
        raise RuntimeError(f"Ray encoding returned {filled} vectors for {len(texts)} texts")
    return out
