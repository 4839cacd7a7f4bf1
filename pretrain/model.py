"""The UniSRec model: MoE adaptor over text vectors, then a causal Transformer over sequences.

Shapes used throughout:
    B  sequences in a batch          T  positions (right-padded with item index 0)
    D  text vector size (frozen)     H  hidden size (``BackboneConfig.hidden_size``)
    N  items in the text table       U  unique items in a batch

The model holds no text table: the caller passes one, ``(N+1, D)`` with row 0 for padding,
indexed globally in pretraining and per domain in fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptors.moe import MoEAdaptor


@dataclass
class BackboneConfig:
    """Sizes and regularisation of the UniSRec backbone (defaults follow the paper)."""

    hidden_size: int = 300  # H: item and sequence vector size
    num_layers: int = 2  # Transformer blocks
    num_heads: int = 2  # attention heads; must divide hidden_size
    inner_size: int = 256  # feed-forward width inside each block
    dropout: float = 0.5  # on embeddings, attention output and feed-forward output
    attn_dropout: float = 0.5  # on attention probabilities
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (as in SASRec/RecBole)
    max_seq_len: int = 50  # learned positions; longer inputs are rejected
    num_experts: int = 8  # G: adaptor experts
    adaptor_dropout: float = 0.2  # dropout on the text vector inside each expert
    temperature: float = 0.07  # tau of both contrastive losses
    initializer_range: float = 0.02  # std of the normal init of Linear/Embedding weights


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t, then residual + LN."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}"
            )
        self.num_heads = cfg.num_heads
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, T, H)`` -> ``(B, T, H)``."""
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads).unbind(dim=2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=True,
        )  # (B, heads, T, H/heads)
        attn = attn.transpose(1, 2).reshape(b, t, h)
        return self.norm(x + self.dropout(self.out(attn)))


class FeedForward(nn.Module):
    """Position-wise ``H -> inner -> H`` with GELU, then residual + LN."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.down = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, T, H)`` -> ``(B, T, H)``."""
        return self.norm(x + self.dropout(self.down(F.gelu(self.up(x)))))


class SequenceEncoder(nn.Module):
    """Item vectors + learned positions -> LN -> dropout -> post-LN causal Transformer blocks.

    No padding mask is needed: sequences are right-padded and attention is causal, so a valid
    position only ever attends to earlier valid positions. Outputs at padded positions are
    meaningless and must not be read.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        self.position = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            nn.Sequential(CausalSelfAttention(cfg), FeedForward(cfg)) for _ in range(cfg.num_layers)
        )
        self.apply(lambda m: _init_weights(m, cfg.initializer_range))

    def forward(self, item_vecs: torch.Tensor) -> torch.Tensor:
        """item_vecs: ``(B, T, H)`` float32 with ``T <= max_seq_len`` -> ``(B, T, H)`` float32.

        Output t summarises items ``0..t`` (the sequence's prefix ending at t).
        """
        t = item_vecs.shape[1]
        if t > self.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds max_seq_len {self.max_seq_len}; "
                "truncate to the most recent items first"
            )
        x = self.dropout(self.norm(item_vecs + self.position.weight[:t]))
        for block in self.blocks:
            x = block(x)
        return x


class UniSRec(nn.Module):
    """Text vectors -> :class:`MoEAdaptor` (+ item ID embedding) -> :class:`SequenceEncoder`.

    ``num_items == 0`` is the inductive, ID-agnostic model. ``num_items > 0`` adds a learned
    ID embedding (row 0 = padding) to every item vector, inputs and candidates alike: the
    paper's transductive setting.
    """

    def __init__(self, cfg: BackboneConfig, text_dim: int, num_items: int = 0):
        super().__init__()
        self.cfg = cfg
        self.text_dim = text_dim
        self.adaptor = MoEAdaptor(
            text_dim, cfg.hidden_size, num_experts=cfg.num_experts, dropout=cfg.adaptor_dropout
        )
        self.encoder = SequenceEncoder(cfg)
        self.item_ids: nn.Embedding | None = None
        if num_items > 0:
            self.item_ids = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=0)
            nn.init.normal_(self.item_ids.weight, std=cfg.initializer_range)
            with torch.no_grad():
                self.item_ids.weight[0].zero_()

    def item_vectors(
        self, text_vecs: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """text_vecs: ``(U, D)`` float32, ids: ``(U,)`` long item indexes -> ``(U, H)`` float32.

        ``ids`` is only read in transductive mode, where it is required. Any leading shape
        works (``(..., D)`` with ``(...)`` ids).
        """
        vecs = self.adaptor(text_vecs)
        if self.item_ids is not None:
            if ids is None:
                raise ValueError("a transductive model (num_items > 0) needs item ids")
            vecs = vecs + self.item_ids(ids)
        return vecs

    def sequence_outputs(
        self,
        items: torch.Tensor,
        text_table: torch.Tensor,
        worddrop_table: torch.Tensor | None = None,
        use_worddrop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode item sequences; output t summarises items ``0..t``.

        items: ``(B, T)`` long indexes into ``text_table`` ``(N+1, D)``, right-padded with 0.
        worddrop_table: ``(N+1, D)`` text vectors of word-dropped texts, read where
        ``use_worddrop`` ``(B, T)`` bool is set (the augmented view in pretraining).
        Returns ``(B, T, H)`` float32.

        The adaptor runs once per distinct (item, text variant) in the batch, not per position:
        a batch of 50-item sequences usually repeats items many times.
        """
        keys = items
        n_rows = text_table.shape[0]
        if use_worddrop is not None:
            if worddrop_table is None:
                raise ValueError("use_worddrop needs a worddrop_table")
            keys = items + use_worddrop.long() * n_rows  # word-dropped variants get own keys
        uniq, inverse = torch.unique(keys, return_inverse=True)
        ids = uniq % n_rows
        text = text_table[ids]
        if use_worddrop is not None:
            text = torch.where((uniq >= n_rows).unsqueeze(-1), worddrop_table[ids], text)
        return self.encoder(self.item_vectors(text, ids)[inverse])

    @staticmethod
    def last_outputs(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """outputs: ``(B, T, H)``, lengths: ``(B,)`` long -> ``(B, H)``: output at lengths-1.

        Rows with length 0 return position 0 (a meaningless but finite vector).
        """
        last = (lengths - 1).clamp(min=0)
        return outputs[torch.arange(outputs.shape[0], device=outputs.device), last]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The sequence encoder (positions, LayerNorm, blocks): frozen in fine-tuning."""
        return self.encoder.parameters()

    def adaptor_parameters(self) -> Iterator[nn.Parameter]:
        """The MoE adaptor and, if transductive, the item ID embedding: tuned in fine-tuning."""
        yield from self.adaptor.parameters()
        if self.item_ids is not None:
            yield from self.item_ids.parameters()


def _init_weights(module: nn.Module, std: float) -> None:
    """SASRec/RecBole initialisation, which the paper's backbone inherits."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
