"""The models, in one file: UniSRec (MoE adaptor over text vectors, then a causal
Transformer) and SASRec, its ID-only baseline. Both offer one interface,
:class:`SequenceRecommender`, that losses, fine-tuning, evaluation and serving call.

Shapes used throughout:
    B  sequences in a batch          T  positions (right-padded with item index 0)
    D  text vector size (frozen)     H  hidden size (``BackboneConfig.hidden_size``)
    N  items in the text table       U  distinct items in a batch

A model holds no text table: the caller passes one, ``(N+1, D)`` float32 with row 0 for
padding, indexed globally in pretraining and per domain in fine-tuning.

The interface (every other module calls only these)::

    item_vectors(text (U, D), ids (U,))            -> (U, H)     adaptor (+ ID embedding)
    catalogue_vectors(text_table (N+1, D))         -> (N+1, H)   all items once, row 0 = 0
    encode(seqs (B, T), vectors (V, H))            -> (B, T, H)  output t summarises 0..t
    encode_last(seqs, lengths (B,), vectors)       -> (B, H)     output at lengths-1 only
    score(queries (..., H), vectors (N, H), tau)   -> (..., N)   logits
    forward(items (B, T), text_table, ...)         -> SequenceBatch: each distinct item
                                                      through the adaptor once, then encode
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from unisrec.errors import ConfigError


@dataclass
class BackboneConfig:
    """Sizes and regularisation of the model (defaults follow the paper)."""

    hidden_size: int = 300  # H: item and sequence vector size
    num_layers: int = 2  # Transformer blocks
    num_heads: int = 2  # attention heads; must divide hidden_size
    inner_size: int = 256  # feed-forward width inside each block
    dropout: float = 0.5  # on embeddings, attention output and feed-forward output
    attn_dropout: float = 0.5  # on attention probabilities
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (as in SASRec/RecBole)
    max_seq_len: int = 50  # learned positions; longer inputs are rejected
    num_experts: int = 8  # G: adaptor experts; 1 = one expert, no gate (paper's "w/o MoE")
    whitening: bool = True  # False: experts are plain x @ W, no learned shift ("w/o PW")
    adaptor_dropout: float = 0.2  # dropout on the text vector inside each expert
    initializer_range: float = 0.02  # std of the normal init of Linear/Embedding weights

    def validate(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"num_experts: must be >= 1, got {self.num_experts}")


# --- the MoE adaptor: frozen text vectors -> item vectors ---------------------------------


class PWLayer(nn.Module):
    """One expert: ``(dropout(x) - b) @ W``, a learned whitening of the text vector.

    Computed as ``dropout(x) @ W - b @ W``: text vectors are frozen, so the backward pass
    then needs no ``(n, in_dim)`` input gradient (a third of the expert's matmul work) to
    reach ``b``.

    ``whitening=False`` drops the shift ``b`` (no such parameter): ``dropout(x) @ W``, the
    paper's "w/o PW" ablation.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0, whitening: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(in_dim)) if whitening else None
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(self.lin.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., in_dim)`` float32 -> ``(..., out_dim)`` float32."""
        p = self.dropout.p
        if self.training and p > 0:
            # Dropout as a comparison with uniform draws: the same Bernoulli(1-p) mask and
            # 1/(1-p) scale as nn.Dropout, a third cheaper on CPU, where drawing the masks
            # of 8 experts over a whole catalogue is the costliest non-matmul step.
            x = torch.where(torch.rand_like(x) >= p, x / (1 - p), 0.0)
        out = self.lin(x)
        return out - self.lin(self.bias) if self.bias is not None else out


class MoEAdaptor(nn.Module):
    """``sum_g gate_g(x) * expert_g(x)`` over ``num_experts`` :class:`PWLayer` experts.

    UniSRec never trains the text encoder; this module maps each item's text vector into the
    recommender's space, and is the only part tuned when adapting to a new domain. Gates are
    ``softmax(x W_gate + noise)``; the noise, ``randn * (softplus(x W_noise) + 0.01)``, is
    added only while training (and only if ``noise``), so evaluation is deterministic. Both
    gate matrices start at zero: every expert begins with the same weight 1/G. With one
    expert there is no gate at all (no gate parameters): the output is that expert's.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_experts: int = 8,
        dropout: float = 0.2,
        noise: bool = True,
        whitening: bool = True,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.noise = noise
        self.experts = nn.ModuleList(
            PWLayer(in_dim, out_dim, dropout, whitening) for _ in range(num_experts)
        )
        self.w_gate: nn.Parameter | None = None
        self.w_noise: nn.Parameter | None = None
        if num_experts > 1:
            self.w_gate = nn.Parameter(torch.zeros(in_dim, num_experts))
            self.w_noise = nn.Parameter(torch.zeros(in_dim, num_experts))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., in_dim)`` -> expert weights ``(..., G)`` float32, summing to 1."""
        if self.w_gate is None:
            return x.new_ones(*x.shape[:-1], 1)
        logits = x @ self.w_gate
        if self.training and self.noise:
            std = F.softplus(x @ self.w_noise) + 1e-2
            logits = logits + torch.randn_like(logits) * std
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., in_dim)`` float32 text vectors -> ``(..., out_dim)`` float32."""
        if len(self.experts) == 1:
            return self.experts[0](x)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (..., G, out)
        return (self.gates(x).unsqueeze(-1) * outputs).sum(dim=-2)


# --- the sequence encoder: a causal, post-LN Transformer (SASRec's, as in RecBole) ---------


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

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``(B, T, H)`` -> ``(B, T, H)``; with ``last`` ``(B,)`` long, only the outputs at
        those positions: ``(B, H)`` (see :meth:`last_outputs`)."""
        if last is not None:
            return self.last_outputs(x, last)
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

    def last_outputs(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """x: ``(B, T, H)``, last: ``(B,)`` long -> ``(B, H)``: the output at position
        ``last[b]`` of each row, equal to ``forward(x)[b, last[b]]`` up to float rounding.

        Keys and values at every position, the query, attention, output projection and
        residual only at ``last``: a third of the QKV work and all of the output work of the
        other positions is skipped. Positions after ``last[b]`` are masked, so rows may be
        right-padded.
        """
        b, t, h = x.shape
        heads = self.num_heads
        x_last = x[torch.arange(b, device=x.device), last]  # (B, H)
        q = F.linear(x_last, self.qkv.weight[:h], self.qkv.bias[:h]).view(b, heads, 1, h // heads)
        k, v = (
            F.linear(x, self.qkv.weight[h:], self.qkv.bias[h:])
            .view(b, t, 2, heads, h // heads)
            .permute(2, 0, 3, 1, 4)
        )  # (B, heads, T, H/heads) each
        seen = None
        if bool((last < t - 1).any()):
            seen = (torch.arange(t, device=x.device) <= last[:, None]).view(b, 1, 1, t)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=seen, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, heads, 1, H/heads)
        return self.norm(x_last + self.dropout(self.out(attn.reshape(b, h))))


class FeedForward(nn.Module):
    """Position-wise ``H -> inner -> H`` with GELU, then residual + LN."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.down = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., H)`` -> ``(..., H)``."""
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

    def forward(self, item_vecs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """item_vecs: ``(B, T, H)`` float32 with ``T <= max_seq_len`` -> ``(B, T, H)`` float32.

        Output t summarises items ``0..t`` (the sequence's prefix ending at t). With
        ``lengths`` ``(B,)`` long (>= 1), only each row's output at ``lengths - 1``: ``(B, H)``,
        the last block run at that position alone (the others still feed its keys and values).
        """
        t = item_vecs.shape[1]
        if t > self.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds max_seq_len {self.max_seq_len}; "
                "truncate to the most recent items first"
            )
        # Called as a module (not .weight[:t]) so DeepSpeed ZeRO-3 gathers the partitioned table.
        positions = self.position(torch.arange(t, device=item_vecs.device))
        x = self.dropout(self.norm(item_vecs + positions))
        if lengths is None:
            for block in self.blocks:
                x = block(x)
            return x
        for block in self.blocks[:-1]:
            x = block(x)
        attention, feed_forward = self.blocks[-1]
        return feed_forward(attention(x, last=lengths - 1))


# --- the interface ----------------------------------------------------------------------


class SequenceBatch(NamedTuple):
    """What :meth:`SequenceRecommender.forward` returns.

    outputs: ``(B, T, H)``, output t summarises items ``0..t``; item_ids: ``(U,)`` long, the
    batch's distinct item indexes, sorted (0 first when the batch has padding); item_vectors:
    ``(U, H)``, their vectors (the candidates of a contrastive loss).
    """

    outputs: torch.Tensor
    item_ids: torch.Tensor
    item_vectors: torch.Tensor


class SequenceRecommender(nn.Module, ABC):
    """A next-item model: item vectors, a causal sequence encoder, and a scoring rule."""

    cfg: BackboneConfig
    encoder: SequenceEncoder

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    @property
    @abstractmethod
    def reads_item_ids(self) -> bool:
        """Whether :meth:`item_vectors` reads ``ids``; if not, items with equal text vectors
        are the same item to the model (evaluation scores them as exact ties)."""

    @abstractmethod
    def item_vectors(self, text_vecs: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        """text_vecs: ``(..., D)`` float32, ids: ``(...)`` long -> ``(..., H)`` float32."""

    def candidates(self, vectors: torch.Tensor) -> torch.Tensor:
        """Item vectors ``(N, H)`` as :meth:`score_candidates` reads them; a caller that
        scores many queries against one catalogue computes them once."""
        return vectors

    @abstractmethod
    def score_candidates(
        self, queries: torch.Tensor, candidates: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """queries: ``(..., H)``, candidates: ``(N, H)`` from :meth:`candidates` -> logits
        ``(..., N)`` float32."""

    def score(
        self, queries: torch.Tensor, vectors: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """queries: ``(..., H)``, vectors: ``(N, H)`` -> logits ``(..., N)`` float32."""
        return self.score_candidates(queries, self.candidates(vectors), temperature)

    @abstractmethod
    def tuned_parameters(self) -> Iterator[nn.Parameter]:
        """What fine-tuning trains when it does not train everything."""

    def catalogue_vectors(
        self, text_table: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every item through the adaptor once: text_table ``(N+1, D)`` (row 0 padding),
        ids ``(N,)`` long (default ``1..N``) -> ``(N+1, H)`` with row 0 all zeros.

        Row i is item i's vector, so :meth:`encode` reads histories of item indexes from it
        directly and ``[1:]`` are the candidates of :meth:`score`.
        """
        if ids is None:
            ids = torch.arange(1, text_table.shape[0], device=text_table.device)
        return F.pad(self.item_vectors(text_table[1:], ids), (0, 0, 1, 0))

    def encode(self, seqs: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """seqs: ``(B, T)`` long row indexes into vectors ``(V, H)`` -> ``(B, T, H)``.

        Output t summarises ``seqs[:, :t+1]``; outputs past a row's length are meaningless.
        """
        return self.encoder(vectors[seqs])

    def encode_last(
        self, seqs: torch.Tensor, lengths: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        """seqs: ``(B, T)`` long row indexes into vectors ``(V, H)``, lengths: ``(B,)`` long
        (>= 1) -> ``(B, H)``: ``last(encode(seqs, vectors), lengths)`` up to float rounding,
        with the last block computed at the last position only (ranking reads nothing else).
        """
        return self.encoder(vectors[seqs], lengths)

    def forward(
        self,
        items: torch.Tensor,
        text_table: torch.Tensor | None,
        worddrop_table: torch.Tensor | None = None,
        use_worddrop: torch.Tensor | None = None,
        *,
        last_is_target: bool = False,
    ) -> SequenceBatch:
        """Encode a batch of item sequences, each distinct item through the adaptor once.

        items: ``(B, T)`` long indexes into ``text_table`` ``(N+1, D)``, right-padded with 0.
        worddrop_table: ``(N+1, D)`` text vectors of word-dropped texts, read where
        ``use_worddrop`` ``(B, T)`` bool is set (the augmented view in pretraining); such
        positions count as distinct items of their own. With ``last_is_target`` the last
        column's items are vectors (candidates) but not encoded: outputs are ``(B, T-1, H)``,
        so T may be ``max_seq_len + 1``.
        """
        keys = items
        n_rows = text_table.shape[0] if text_table is not None else 0
        if use_worddrop is not None:
            if worddrop_table is None or text_table is None:
                raise ValueError("use_worddrop needs a text_table and a worddrop_table")
            keys = items + use_worddrop.long() * n_rows  # word-dropped variants get own keys
        uniq, inverse = torch.unique(keys, return_inverse=True)
        ids = uniq % n_rows if use_worddrop is not None else uniq
        text = text_table[ids] if text_table is not None else None
        if use_worddrop is not None:
            text = torch.where((uniq >= n_rows).unsqueeze(-1), worddrop_table[ids], text)
        vectors = self.item_vectors(text, ids)
        if last_is_target:
            inverse = inverse[:, :-1]
        return SequenceBatch(self.encode(inverse, vectors), ids, vectors)

    @staticmethod
    def last(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """outputs: ``(B, T, H)``, lengths: ``(B,)`` long -> ``(B, H)``: output at lengths-1.

        Rows with length 0 return position 0 (a meaningless but finite vector).
        """
        last = (lengths - 1).clamp(min=0)
        return outputs[torch.arange(outputs.shape[0], device=outputs.device), last]


class UniSRec(SequenceRecommender):
    """Text vectors -> :class:`MoEAdaptor` (+ item ID embedding) -> :class:`SequenceEncoder`;
    scores are cosine similarities over a temperature.

    ``num_items == 0`` is the inductive, ID-agnostic model. ``num_items > 0`` adds a learned
    ID embedding (row 0 = padding) to every item vector, inputs and candidates alike: the
    paper's transductive setting.
    """

    def __init__(self, cfg: BackboneConfig, text_dim: int, num_items: int = 0):
        super().__init__()
        self.cfg = cfg
        self.text_dim = text_dim
        self.adaptor = MoEAdaptor(
            text_dim,
            cfg.hidden_size,
            num_experts=cfg.num_experts,
            dropout=cfg.adaptor_dropout,
            whitening=cfg.whitening,
        )
        self.encoder = SequenceEncoder(cfg)
        self.item_ids: nn.Embedding | None = None
        if num_items > 0:
            self.item_ids = _id_embedding(num_items, cfg)

    @property
    def reads_item_ids(self) -> bool:
        return self.item_ids is not None

    def item_vectors(self, text_vecs: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` are read only in transductive mode; id 0 adds the zero padding row."""
        if text_vecs is None:
            raise ValueError("UniSRec represents items by text: text_vecs are required")
        vecs = self.adaptor(text_vecs)
        if self.item_ids is not None:
            vecs = vecs + self.item_ids(ids)
        return vecs

    def candidates(self, vectors: torch.Tensor) -> torch.Tensor:
        """Cosine scoring: the items L2-normalised."""
        return F.normalize(vectors, dim=-1)

    def score_candidates(
        self, queries: torch.Tensor, candidates: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        # 1/tau on the (..., H) queries, not on the (..., N) logits: one pass less each way.
        return (F.normalize(queries, dim=-1) / temperature) @ candidates.T

    def tuned_parameters(self) -> Iterator[nn.Parameter]:
        """The MoE adaptor, the encoder's input LayerNorm and, if transductive, the item ID
        embedding: the official code freezes only the Transformer blocks and the positions."""
        yield from self.adaptor.parameters()
        yield from self.encoder.norm.parameters()
        if self.item_ids is not None:
            yield from self.item_ids.parameters()


class SASRec(SequenceRecommender):
    """SASRec (Kang & McAuley, 2018), the ID-only baseline of the paper's tables: the same
    :class:`SequenceEncoder` fed by a learned item ID embedding ``(N+1, H)``; candidates are
    scored by dot product with that embedding (RecBole's SASRec with cross-entropy). Text
    arguments are accepted and ignored; it cannot score items it was not trained on.
    """

    def __init__(self, cfg: BackboneConfig, num_items: int):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"SASRec needs at least one item, got num_items={num_items}")
        self.cfg = cfg
        self.num_items = num_items
        self.item_ids = _id_embedding(num_items, cfg)
        self.encoder = SequenceEncoder(cfg)

    @property
    def reads_item_ids(self) -> bool:
        return True

    def item_vectors(self, text_vecs: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        return self.item_ids(ids)

    def score_candidates(
        self, queries: torch.Tensor, candidates: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return queries @ candidates.T

    def tuned_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()


def _id_embedding(num_items: int, cfg: BackboneConfig) -> nn.Embedding:
    """``(num_items + 1, H)`` item ID embedding, row 0 the zero padding row."""
    table = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=0)
    nn.init.normal_(table.weight, std=cfg.initializer_range)
    with torch.no_grad():
        table.weight[0].zero_()
    return table


def _init_weights(module: nn.Module, std: float) -> None:
    """SASRec/RecBole initialisation, which the paper's backbone inherits."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
