"""Items added to a tenant's catalogue by their text alone, after fine-tuning
(``unisrec catalogue add --tenant T items.csv``).

    keys, texts = read_items_csv("new.csv")                  # columns item, text
    vectors = encode_with_dataset_encoder(texts, catalogue.encoder)   # (M, D) float32
    add_items_from_csv("runs/finetune/shop/catalogue", "new.csv")     # a catalogue directory

The registry side (a new adaptor version with the longer catalogue) is
serving/lifecycle.py's ``add_catalogue_version``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adaptors.catalogue import Catalogue
from unisrec.errors import DataError


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
    from sharding.encoding import encode_texts
    from sharding.text_encoder import PACKAGED, PACKAGED_NAME

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
