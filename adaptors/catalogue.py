"""A tenant's item catalogue: the items its model can recommend, by key, text and vector.

A catalogue directory (format in docs/data-format.md)::

    catalogue.json   format_version, num_items (C), trained_items (N), encoder (name, dim, ...)
    items.parquet    index (1..C), key, text
    vectors.npy      (C+1, D) float32 text vectors, row 0 = padding (zeros)

It starts as the fine-tuning domain's items (C = N). ``unisrec catalogue add``
(serving/new_items.py) appends items by encoding their text with the dataset's encoder: an
inductive (text-only) model recommends them at once, without retraining. A transductive
model gives them a zero item ID embedding (text only, so they are scored somewhat
differently from trained items); SASRec has no text and never recommends them (their score
is -inf).

Fine-tuning writes the catalogue and the registered pyfunc reads it, so it lives here, below
serving/.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from unisrec.errors import DataError

CATALOGUE_VERSION = 1
META_FILE = "catalogue.json"
ITEMS_FILE = "items.parquet"
VECTORS_FILE = "vectors.npy"


@dataclass
class Catalogue:
    """Items a tenant can be recommended. Index i (1-based) is ``keys[i-1]``, vector row i."""

    keys: list[str]
    texts: list[str]
    vectors: np.ndarray  # (C+1, D) float32, row 0 zeros
    trained_items: int  # N: items 1..N were in the fine-tuning domain
    encoder: dict  # name, dim, pooling, max_length

    def __post_init__(self) -> None:
        if self.vectors.shape[0] != len(self.keys) + 1 or len(self.texts) != len(self.keys):
            raise ValueError(
                f"catalogue: {len(self.keys)} keys, {len(self.texts)} texts, {self.vectors.shape[0]} vector rows"
            )
        self._index = {key: i + 1 for i, key in enumerate(self.keys)}

    @classmethod
    def load(cls, directory: str | Path) -> Catalogue:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise DataError("no catalogue here (fine-tune the tenant first)", file=meta_path)
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != CATALOGUE_VERSION:
            raise DataError(
                f"catalogue version {meta.get('format_version')!r}, expected {CATALOGUE_VERSION}",
                file=meta_path,
                field="format_version",
            )
        items = pd.read_parquet(directory / ITEMS_FILE)
        vectors = np.load(directory / VECTORS_FILE)
        return cls(
            list(items["key"]), list(items["text"]), vectors, meta["trained_items"], meta["encoder"]
        )

    def save(self, directory: str | Path) -> None:
        """Write all three files; each is written aside and renamed, so readers never see a
        half-written file (the meta file goes last: its counts describe complete files)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(
            {"index": np.arange(1, len(self.keys) + 1), "key": self.keys, "text": self.texts}
        )
        _replace(directory / ITEMS_FILE, lambda p: frame.to_parquet(p, index=False))
        _replace(directory / VECTORS_FILE, lambda p: np.save(p, self.vectors))
        meta = {
            "format_version": CATALOGUE_VERSION,
            "num_items": len(self.keys),
            "trained_items": self.trained_items,
            "encoder": self.encoder,
        }
        _replace(
            directory / META_FILE,
            lambda p: p.write_text(json.dumps(meta, indent=2), encoding="utf-8"),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def indexes(self, keys: Sequence[str]) -> list[int]:
        """Catalogue indexes of ``keys``; an unknown key raises KeyError naming it."""
        unknown = [k for k in keys if k not in self._index]
        if unknown:
            raise KeyError(f"items not in the catalogue: {unknown[:5]}")
        return [self._index[k] for k in keys]

    def with_items(self, keys: list[str], texts: list[str], vectors: np.ndarray) -> Catalogue:
        """A new catalogue with ``keys`` appended. vectors: ``(M, D)`` float32."""
        clash = [k for k in keys if k in self]
        if clash or len(set(keys)) != len(keys):
            raise ValueError(f"item keys already in the catalogue or repeated: {clash[:5] or keys}")
        if vectors.shape != (len(keys), self.vectors.shape[1]):
            raise ValueError(
                f"expected vectors of shape {(len(keys), self.vectors.shape[1])}, got {vectors.shape}"
            )
        return Catalogue(
            self.keys + list(keys),
            self.texts + list(texts),
            np.concatenate([self.vectors, vectors.astype(np.float32)]),
            self.trained_items,
            self.encoder,
        )


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    tmp.replace(path)


def write_domain_catalogue(directory: Path, dataset, domain: str) -> Path:
    """A dataset domain's items as a tenant's catalogue in ``directory``; items added to an
    earlier catalogue of the same domain are kept. ``dataset``: a sharding Dataset."""
    items = dataset.items(domain).sort_values("index")
    keys = list(items["key"])
    fresh = Catalogue(
        keys,
        list(items["text"]),
        np.array(dataset.embeddings(domain)),
        len(keys),
        dict(dataset.manifest["encoder"]),
    )
    if (directory / "catalogue.json").is_file():
        previous = Catalogue.load(directory)
        if previous.keys[: len(keys)] == keys and len(previous) > len(keys):
            extra = slice(len(keys), None)
            fresh = fresh.with_items(
                previous.keys[extra], previous.texts[extra], previous.vectors[len(keys) + 1 :]
            )
    fresh.save(directory)
    return directory
