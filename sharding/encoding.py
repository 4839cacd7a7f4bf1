"""The shard job's text encoding: answer what it can from the embedding cache and encode
only the rest, in this process (``sharding/text_encoder.py``) or on a Ray actor pool
(``sharding/ray_encoding.py``), as ``EncoderConfig.backend`` says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sharding.config import EncoderConfig
from sharding.embedding_cache import EmbeddingCache
from sharding.text_encoder import TextEncoder, encoder_name, model_dim
from unisrec.config import expand_env

log = logging.getLogger(__name__)


@dataclass
class EncoderInfo:
    """What produced a set of text vectors; stored in the dataset manifest."""

    name: str
    dim: int
    pooling: str
    max_length: int

    @property
    def identity(self) -> str:
        """Vectors are interchangeable only when this string is equal (the cache key prefix)."""
        return f"{self.name}|pooling={self.pooling}|max_length={self.max_length}"


def cached_encode(
    texts: Sequence[str],
    dim: int,
    cache: EmbeddingCache | None,
    encode: Callable[[list[str]], np.ndarray],
) -> tuple[np.ndarray, int]:
    """Vectors for ``texts``, calling ``encode`` only on distinct texts the cache lacks.

    Args:
        texts: N texts, repeats allowed.
        dim: vector width.
        cache: where known vectors are read and new ones stored; None encodes everything.
        encode: distinct missing texts ``(M,)`` -> ``(M, dim) float32``.

    Returns:
        ``(N, dim) float32`` vectors in the order of ``texts``, and how many came from cache.
    """
    if cache is None:
        vectors = np.empty((len(texts), dim), dtype=np.float32)
        found = np.zeros(len(texts), dtype=bool)
    else:
        vectors, found = cache.get_many(texts)
    missing_at = np.flatnonzero(~found)
    missing = list(dict.fromkeys(texts[i] for i in missing_at))
    if missing:
        fresh = encode(missing)
        if cache is not None:
            cache.put_many(missing, fresh)
        row_of = {t: r for r, t in enumerate(missing)}
        vectors[missing_at] = fresh[[row_of[texts[i]] for i in missing_at]]
    return vectors, int(found.sum())


def encode_texts(
    texts: Sequence[str], cfg: EncoderConfig, progress: bool = True
) -> tuple[np.ndarray, EncoderInfo]:
    """Encode ``texts`` as ``cfg`` says, through the embedding cache.

    Returns ``(N, dim) float32`` vectors in input order and the ``EncoderInfo`` naming the
    encoder. The model is loaded only when some text is not cached.
    """
    info = EncoderInfo(
        encoder_name(cfg.model), model_dim(cfg.model), cfg.resolved_pooling(), cfg.max_length
    )
    cache_dir = expand_env(cfg.cache_dir)  # also when cfg was built in code, not loaded
    cache = EmbeddingCache(cache_dir, info.identity, info.dim) if cache_dir else None

    def encode_missing(missing: list[str]) -> np.ndarray:
        if cfg.backend == "ray":
            from sharding.ray_encoding import encode_with_ray  # imports ray: only when asked

            return encode_with_ray(missing, cfg, progress=progress)
        return TextEncoder.from_config(cfg).encode(missing, progress=progress)

    vectors, from_cache = cached_encode(texts, info.dim, cache, encode_missing)
    log.info(
        "%s: %d texts, %d from cache, %d not (cache: %s)",
        info.name,
        len(texts),
        from_cache,
        len(texts) - from_cache,
        "off" if cache is None else cache.directory,
    )
    return vectors, info
