"""Top-k recommendations from a tenant's model and catalogue.

recs = top_k(model, spec, catalogue, [["item-a", "item-b"]], k=10)   # [[(key, score)]]

A caller that ranks the same catalogue again and again (a server) keeps its
:class:`RankingTable` and passes ``table=``: the adaptor over the whole catalogue, and the
candidates' normalisation, are then paid once instead of on every call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adaptors.bundle import AdaptorSpec
from adaptors.catalogue import Catalogue
from pretrain.model import SequenceRecommender


def parse_history(history: str | Sequence[str]) -> list[str]:
    """Item keys from a list or a comma/space separated string, oldest first."""
    if isinstance(history, str):
        return [k for k in re.split(r"[\s,]+", history.strip()) if k]
    return [str(k) for k in history]


@torch.no_grad()
def catalogue_item_vectors(
    model: SequenceRecommender, spec: AdaptorSpec, catalogue: Catalogue
) -> torch.Tensor:
    """``(C+1, H)`` item vectors of catalogue items 1..C (row 0 zeros).

    Items past the trained ones use ID 0, whose embedding is the zero padding row: text only
    in transductive mode. SASRec vectors for them are meaningless; :func:`top_k` masks them.
    """
    text = torch.from_numpy(np.ascontiguousarray(catalogue.vectors))
    index = torch.arange(1, len(catalogue) + 1)
    ids = torch.where(index <= spec.num_items, index, torch.zeros_like(index))
    return model.catalogue_vectors(text, ids)


@dataclass(frozen=True)
class RankingTable:
    """A model's catalogue made ready for ranking: computed once per model and catalogue.

    item_vectors: ``(C+1, H)`` float32, :func:`catalogue_item_vectors` (row 0 zeros): what the
        encoder reads histories from.
    candidates: ``(C, H)`` float32, items 1..C as the model's
        :meth:`~pretrain.model.SequenceRecommender.score_candidates` reads them (UniSRec's
        L2-normalised once here instead of on every call: ~90 ms for 100,000 items on one
        core, against ~15 ms for the product itself).
    """

    item_vectors: torch.Tensor
    candidates: torch.Tensor


@torch.no_grad()
def ranking_table(
    model: SequenceRecommender,
    spec: AdaptorSpec,
    catalogue: Catalogue,
    item_vectors: torch.Tensor | None = None,
) -> RankingTable:
    """The :class:`RankingTable` of this model and catalogue (``item_vectors``: already
    computed :func:`catalogue_item_vectors`, reused)."""
    vectors = (
        item_vectors if item_vectors is not None else catalogue_item_vectors(model, spec, catalogue)
    )
    return RankingTable(vectors, model.candidates(vectors[1:]))


@torch.no_grad()
def top_k(
    model: SequenceRecommender,
    spec: AdaptorSpec,
    catalogue: Catalogue,
    histories: list[list[str]],
    k: int = 10,
    exclude_history: bool = True,
    item_vectors: torch.Tensor | None = None,
    table: RankingTable | None = None,
) -> list[list[tuple[str, float]]]:
    """The ``k`` best catalogue items (key, score) for each history of item keys.

    The model reads the last ``max_seq_len`` items of each history; with ``exclude_history``
    no item of the whole history is recommended again. ``item_vectors``: the
    :func:`catalogue_item_vectors` of this model and catalogue, ``(C+1, H)``, when the caller
    keeps them (a server does: running the adaptor over the whole catalogue costs far more
    than encoding one history); computed here otherwise. ``table``: the
    :func:`ranking_table` of this model and catalogue, which a server keeps instead (it
    includes the item vectors). All histories are encoded in one pass, padded to the
    longest, and scored in one ``(B, C)`` product.
    """
    if any(not h for h in histories):
        raise ValueError("every history needs at least one item")
    model.eval()
    if table is None:
        table = ranking_table(model, spec, catalogue, item_vectors)
    items = table.item_vectors
    max_len = model.max_seq_len
    seen = [catalogue.indexes(h) for h in histories]
    indexes = [idx[-max_len:] for idx in seen]
    lengths = torch.tensor([len(i) for i in indexes])
    padded = torch.zeros(len(indexes), int(lengths.max()), dtype=torch.long)
    for row, idx in enumerate(indexes):
        padded[row, : len(idx)] = torch.tensor(idx)
    last = model.last(model.encode(padded, items), lengths)  # (B, H)
    scores = model.score_candidates(last, table.candidates, spec.temperature)  # (B, C)
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
