"""A content-addressed, on-disk cache of text vectors, so no text is encoded twice.

Layout under ``root``::

    <sha256(identity)[:20]>/          one directory per encoder identity
        identity.txt                  the identity string, for people reading the cache
        chunk-<ns>-<uuid>.npz         keys (n, 32) uint8 raw sha256, vectors (n, dim) float32

A key is ``sha256(identity + "\\0" + text)``. The identity names the model, pooling and
max length (see ``EncoderInfo.identity``), so a change to any of them never reuses vectors.

Chunks are append-only and written atomically under names no other writer can pick, so
several processes may share one cache: each adds its own chunks and never rewrites another's.
A process sees the chunks that existed when it opened the cache, plus its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sharding.atomic import atomic_path

log = logging.getLogger(__name__)

_DIGEST_BYTES = 32


class EmbeddingCache:
    """Text -> vector store for one encoder identity, loaded into memory on open.

    Args:
        root: cache root directory (created if missing); ``~`` is expanded.
        encoder_identity: the string that makes vectors comparable (model, pooling, length).
        dim: vector width; chunks of another width are ignored as foreign.
    """

    def __init__(self, root: str | os.PathLike, encoder_identity: str, dim: int):
        self.identity = encoder_identity
        self.dim = dim
        folder = hashlib.sha256(encoder_identity.encode()).hexdigest()[:20]
        self.directory = Path(os.path.expanduser(root)) / folder
        self.directory.mkdir(parents=True, exist_ok=True)
        identity_file = self.directory / "identity.txt"
        if not identity_file.exists():
            with atomic_path(identity_file) as tmp:
                tmp.write_text(encoder_identity + "\n")
        # key -> (chunk number, row): chunks stay as loaded, nothing is copied into one array.
        self._index: dict[bytes, tuple[int, int]] = {}
        self._chunks: list[np.ndarray] = []
        for path in sorted(self.directory.glob("chunk-*.npz")):
            self._load_chunk(path)

    def __len__(self) -> int:
        return len(self._index)

    def key(self, text: str) -> bytes:
        """The 32-byte sha256 digest that addresses ``text`` under this identity."""
        return hashlib.sha256(self.identity.encode() + b"\0" + text.encode()).digest()

    def get_many(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Look ``texts`` up.

        Returns:
            vectors: ``(N, dim) float32``; rows of texts not in the cache are zero.
            found: ``(N,) bool``, True where the row came from the cache.
        """
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        found = np.zeros(len(texts), dtype=bool)
        for i, text in enumerate(texts):
            where = self._index.get(self.key(text))
            if where is not None:
                chunk, row = where
                vectors[i] = self._chunks[chunk][row]
                found[i] = True
        return vectors, found

    def put_many(self, texts: Sequence[str], vectors: np.ndarray) -> int:
        """Store ``vectors`` ``(N, dim) float32`` for ``texts`` as one new chunk file.

        Texts already cached (or repeated within ``texts``) are skipped. Returns how many
        entries were added.
        """
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(
                f"put_many: vectors of shape {vectors.shape} for {len(texts)} texts, "
                f"expected ({len(texts)}, {self.dim})"
            )
        new_rows: dict[bytes, int] = {}
        for i, text in enumerate(texts):
            key = self.key(text)
            if key not in self._index and key not in new_rows:
                new_rows[key] = i
        if not new_rows:
            return 0
        keys = np.frombuffer(b"".join(new_rows), dtype=np.uint8).reshape(-1, _DIGEST_BYTES)
        chunk = np.ascontiguousarray(vectors[list(new_rows.values())], dtype=np.float32)
        # Nanoseconds sort chunks by age; the uuid keeps concurrent writers' names apart.
        path = self.directory / f"chunk-{time.time_ns()}-{uuid.uuid4().hex[:12]}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=keys, vectors=chunk)
        self._add(keys, chunk)
        return len(new_rows)

    def _load_chunk(self, path: Path) -> None:
        # The cache only saves work: an unreadable chunk is skipped and its texts re-encoded.
        try:
            with np.load(path) as data:
                keys, vectors = data["keys"], data["vectors"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("embedding cache: skipping unreadable chunk %s (%s)", path, err)
            return
        if (
            keys.ndim != 2
            or keys.shape[1] != _DIGEST_BYTES
            or vectors.shape != (len(keys), self.dim)
            or vectors.dtype != np.float32
        ):
            log.warning(
                "embedding cache: skipping chunk %s: keys %s, vectors %s %s, expected (n, %d) float32",
                path,
                keys.shape,
                vectors.shape,
                vectors.dtype,
                self.dim,
            )
            return
        self._add(keys, vectors)

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        chunk = len(self._chunks)
        self._chunks.append(vectors)
        raw = keys.tobytes()
        for row in range(len(keys)):
            self._index.setdefault(
                raw[row * _DIGEST_BYTES : (row + 1) * _DIGEST_BYTES], (chunk, row)
            )
