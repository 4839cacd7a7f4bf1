"""SASRec (Kang & McAuley, 2018): the ID-only baseline of the paper's tables.

The same :class:`pretrain.model.SequenceEncoder` as UniSRec, fed by a learned item ID
embedding instead of adapted text vectors; candidates are scored by dot product with the same
embedding (as RecBole's SASRec with cross-entropy loss). It cannot score items it was not
trained on.

Its methods take the same arguments as :class:`pretrain.model.UniSRec` so the fine-tuning
recipe and the evaluator drive both alike; the text arguments are accepted and ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model import BackboneConfig, SequenceEncoder


class SASRec(nn.Module):
    """Item ID embedding ``(N+1, H)`` (row 0 = padding) -> causal Transformer."""

    def __init__(self, cfg: BackboneConfig, num_items: int):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"SASRec needs at least one item, got num_items={num_items}")
        self.cfg = cfg
        self.num_items = num_items
        self.item_ids = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=0)
        nn.init.normal_(self.item_ids.weight, std=cfg.initializer_range)
        with torch.no_grad():
            self.item_ids.weight[0].zero_()
        self.encoder = SequenceEncoder(cfg)

    def item_vectors(
        self, text_vecs: torch.Tensor | None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids: ``(...)`` long item indexes -> ``(..., H)`` float32; ``text_vecs`` is ignored."""
        if ids is None:
            raise ValueError("SASRec scores items by ID: ids are required")
        return self.item_ids(ids)

    def sequence_outputs(
        self, items: torch.Tensor, text_table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """items: ``(B, T)`` long, right-padded with 0 -> ``(B, T, H)`` float32.

        Output t summarises items ``0..t``; ``text_table`` is ignored.
        """
        return self.encoder(self.item_ids(items))
