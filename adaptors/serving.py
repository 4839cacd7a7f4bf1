"""Recommendations from a tenant's model: its item catalogue, top-k scoring, the MLflow pyfunc.

A catalogue directory (format in docs/data-format.md)::

    catalogue.json   format_version, num_items (C), trained_items (N), encoder (name, dim, ...)
    items.parquet    index (1..C), key, text
    vectors.npy      (C+1, D) float32 text vectors, row 0 = padding (zeros)

It starts as the fine-tuning domain's items (C = N). ``unisrec catalogue add`` appends items
by encoding their text with the dataset's encoder: an inductive (text-only) model recommends
them at once, without retraining. A transductive model gives them a zero item ID embedding
(text only, so they are scored somewhat differently from trained items); SASRec has no text
and never recommends them (their score is -inf).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from adaptors.evaluate import encode_histories, similarity_logits
from adaptors.registry import AdaptorSpec, load_bundle
from sharding.errors import DataError

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


# --- adding items ----------------------------------------------------------------------


def read_items_csv(path: str | Path) -> tuple[list[str], list[str]]:
    """Read a CSV with columns ``item`` and ``text``; bad rows raise DataError(file, line, field)."""
    path = Path(path)
    keys: list[str] = []
    texts: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"item", "text"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"missing column(s) {sorted(missing)}", file=path, line=1, field=sorted(missing)[0]
            )
        for row in reader:
            line = reader.line_num
            for field in ("item", "text"):
                if not (row.get(field) or "").strip():
                    raise DataError("empty value", file=path, line=line, field=field)
            if row["item"].strip() in keys:
                raise DataError(
                    f"item {row['item']!r} appears twice", file=path, line=line, field="item"
                )
            keys.append(row["item"].strip())
            texts.append(row["text"].strip())
    if not keys:
        raise DataError("no items", file=path)
    return keys, texts


def encode_with_dataset_encoder(texts: list[str], encoder: dict) -> np.ndarray:
    """``(M, D)`` float32 vectors from the encoder a catalogue's text vectors came from."""
    from sharding.config import EncoderConfig
    from sharding.text_encoder import PACKAGED, PACKAGED_NAME, encode_texts

    model = PACKAGED if encoder["name"] == PACKAGED_NAME else encoder["name"]
    cfg = EncoderConfig(
        model=model, pooling=encoder["pooling"], max_length=int(encoder["max_length"])
    )
    vectors, info = encode_texts(texts, cfg, progress=False)
    if info.dim != int(encoder["dim"]):
        raise ValueError(
            f"encoder {encoder['name']!r} gives {info.dim}-d vectors, the catalogue holds {encoder['dim']}-d"
        )
    return vectors


def add_items_from_csv(
    directory: str | Path,
    csv_path: str | Path,
    encode: Callable[[list[str], dict], np.ndarray] = encode_with_dataset_encoder,
) -> Catalogue:
    """Append the items of ``csv_path`` to the catalogue in ``directory`` and save it."""
    catalogue = Catalogue.load(directory)
    keys, texts = read_items_csv(csv_path)
    clash = [k for k in keys if k in catalogue]
    if clash:
        raise DataError(
            f"item {clash[0]!r} is already in the catalogue", file=csv_path, field="item"
        )
    updated = catalogue.with_items(keys, texts, encode(texts, catalogue.encoder))
    updated.save(directory)
    return updated


# --- scoring ---------------------------------------------------------------------------


def parse_history(history: str | Sequence[str]) -> list[str]:
    """Item keys from a list or a comma/space separated string, oldest first."""
    if isinstance(history, str):
        return [k for k in re.split(r"[\s,]+", history.strip()) if k]
    return [str(k) for k in history]


@torch.no_grad()
def catalogue_item_vectors(
    model: nn.Module, spec: AdaptorSpec, catalogue: Catalogue
) -> torch.Tensor:
    """``(C, H)`` item vectors of catalogue items 1..C.

    Items past the trained ones use ID 0, whose embedding is the zero padding row: text only
    in transductive mode. SASRec vectors for them are meaningless; :func:`top_k` masks them.
    """
    text = torch.from_numpy(np.ascontiguousarray(catalogue.vectors))
    index = torch.arange(1, len(catalogue) + 1)
    ids = torch.where(index <= spec.num_items, index, torch.zeros_like(index))
    return model.item_vectors(text[1:], ids)


@torch.no_grad()
def top_k(
    model: nn.Module,
    spec: AdaptorSpec,
    catalogue: Catalogue,
    histories: list[list[str]],
    k: int = 10,
    exclude_history: bool = True,
) -> list[list[tuple[str, float]]]:
    """The ``k`` best catalogue items (key, score) for each history of item keys.

    The model reads the last ``max_seq_len`` items of each history; with ``exclude_history``
    no item of the whole history is recommended again.
    """
    if any(not h for h in histories):
        raise ValueError("every history needs at least one item")
    model.eval()
    items = catalogue_item_vectors(model, spec, catalogue)  # (C, H)
    max_len = model.encoder.max_seq_len
    seen = [catalogue.indexes(h) for h in histories]
    indexes = [idx[-max_len:] for idx in seen]
    lengths = torch.tensor([len(i) for i in indexes])
    padded = torch.zeros(len(indexes), int(lengths.max()), dtype=torch.long)
    for row, idx in enumerate(indexes):
        padded[row, : len(idx)] = torch.tensor(idx)
    outputs = encode_histories(model, items, padded)  # (B, T, H)
    last = outputs[torch.arange(len(indexes)), lengths - 1]
    scores = similarity_logits(model, last, items, spec.temperature)  # (B, C)
    scores = F.pad(scores, (1, 0), value=float("-inf"))  # (B, C+1)
    if spec.baseline == "sasrec":
        scores[:, spec.num_items + 1 :] = float("-inf")
    if exclude_history:
        for row, idx in enumerate(seen):  # the whole history, not only the encoded tail
            scores[row, idx] = float("-inf")
    best = scores.topk(min(k, scores.shape[1] - 1), dim=1)
    return [
        [
            (catalogue.keys[i - 1], float(s))
            for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True)
            if s > float("-inf")
        ]
        for row_s, row_i in zip(best.values, best.indices, strict=True)
    ]


# --- the MLflow pyfunc -----------------------------------------------------------------


def pyfunc_signature():
    """Input: a ``history`` column (list of item keys or a separated string); params ``k``
    and ``exclude_history``; output: ``items`` and ``scores`` lists per row."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "history")]),
        params=ParamSchema(
            [ParamSpec("k", "long", 10), ParamSpec("exclude_history", "boolean", True)]
        ),
    )


class AdaptorRecommender(mlflow.pyfunc.PythonModel):
    """A tenant's recommender for ``mlflow models serve``: artifacts ``adaptor`` (a bundle)
    and ``catalogue``. Loading pulls the frozen backbone from the registry by lineage, so the
    serving process needs ``MLFLOW_TRACKING_URI`` (unless the bundle holds the whole model)."""

    def load_context(self, context) -> None:
        self.model, self.spec = load_bundle(Path(context.artifacts["adaptor"]))
        self.catalogue = Catalogue.load(context.artifacts["catalogue"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        params = params or {}
        recs = top_k(
            self.model,
            self.spec,
            self.catalogue,
            [parse_history(h) for h in model_input["history"]],
            k=int(params.get("k", 10)),
            exclude_history=bool(params.get("exclude_history", True)),
        )
        return pd.DataFrame(
            {
                "items": [[key for key, _ in row] for row in recs],
                "scores": [[s for _, s in row] for row in recs],
            }
        )
