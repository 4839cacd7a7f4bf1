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
from collections.abc import Sequence

import numpy as np

from sharding.config import EncoderConfig
from sharding.text_encoder import TextEncoder, model_dim
from unisrec.runtime import ensure_ray

log = logging.getLogger(__name__)


class EncoderActor:
    """Ray Data callable class: ``{"i", "text"}`` batches -> ``{"i", "vector"}`` batches."""

    def __init__(self, cfg: EncoderConfig):
        self.encoder = TextEncoder.from_config(cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``i`` ``(B,) int64``, ``text`` ``(B,) object`` -> ``i``, ``vector`` ``(B, dim) float32``."""
        vectors = self.encoder.encode(batch["text"].tolist(), progress=False)
        return {"i": batch["i"], "vector": vectors}


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
    started = ensure_ray()
    import ray  # only now: ensure_ray keeps a local Ray on loopback first

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
