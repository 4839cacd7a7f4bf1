"""The straightforward pretraining formulation, kept as the throughput benchmark's baseline.

Every query prefix of every window becomes its own sample, padded to ``max_seq_len``, and
is augmented on its own; the adaptor runs over every position of every sample. The loss
reads each sample's last position. It computes the same losses as
:func:`pretrain.losses.pretrain_loss` (equal in eval mode) at roughly ``2 T`` times the
encoder work and ``T * max_seq_len / U`` times the adaptor work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.augment import augment
from pretrain.config import LossConfig
from pretrain.gather import Gather
from pretrain.losses import (
    global_mean_loss,
    next_item_targets,
    own_window_users,
    seq_item_loss,
    seq_seq_loss,
)
from pretrain.model import SequenceRecommender


def naive_pretrain_loss(
    model: SequenceRecommender,
    batch: dict[str, torch.Tensor],
    text_table: torch.Tensor,
    worddrop_table: torch.Tensor,
    loss: LossConfig,
    *,
    step: int,
    seed: int,
    gather: Gather,
) -> dict[str, torch.Tensor | float | int]:
    """Same arguments and result as :func:`pretrain.losses.pretrain_loss`."""
    max_len = model.cfg.max_seq_len
    items, inputs, targets, query_mask = next_item_targets(batch)
    users = batch.get("user")
    if users is None:
        users = own_window_users(items.shape[0], gather, items.device)
    if inputs.shape[1] > max_len:
        raise ValueError(f"{inputs.shape[1]} input positions exceed max_seq_len {max_len}")

    # One sample per query: row b's items 0..t, padded to max_seq_len.   (Q, max_len)
    rows, ends = query_mask.nonzero(as_tuple=True)
    padded_inputs = F.pad(inputs, (0, max_len - inputs.shape[1]))
    in_prefix = torch.arange(max_len, device=items.device) <= ends.unsqueeze(1)
    prefixes = padded_inputs[rows].masked_fill(~in_prefix, 0)
    outputs = _encode_every_position(model, prefixes, text_table[prefixes])
    queries = SequenceRecommender.last(outputs, ends + 1)  # (Q, H)

    # The candidates are the batch's distinct targets, as in the efficient formulation.
    key_ids = torch.unique(targets[query_mask])
    keys = model.item_vectors(text_table[key_ids], key_ids)
    si_sum, si_count = seq_item_loss(
        queries, targets[query_mask], rows, items, keys, key_ids, loss.temperature, gather, users
    )

    # Each query prefix augmented on its own (the decisions follow sample id and position).
    aug_items, aug_lengths, use_worddrop, _ = augment(
        prefixes, ends + 1, batch["sample_id"][rows], step, seed,
        item_drop_prob=loss.item_drop_batch_prob,
        keep_prob=loss.item_keep_prob,
        word_drop_pos_prob=loss.word_drop_position_prob,
    )  # fmt: skip
    aug_text = torch.where(
        use_worddrop.unsqueeze(-1), worddrop_table[aug_items], text_table[aug_items]
    )
    aug_outputs = _encode_every_position(model, aug_items, aug_text)
    ss_sum, ss_count = seq_seq_loss(
        queries,
        SequenceRecommender.last(aug_outputs, aug_lengths),
        users[rows],
        loss.temperature,
        gather,
    )
    # The ablation switches: a term switched off counts 0 (efficient code skips computing it).
    if not loss.seq_item:
        si_sum = si_sum.new_zeros(())
    if not loss.seq_seq:
        ss_sum = ss_sum.new_zeros(())
    return global_mean_loss(si_sum, si_count, ss_sum, ss_count, loss.seq_seq_weight, gather)


def _encode_every_position(
    model: SequenceRecommender, items: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """items: ``(S, L)`` long, text: ``(S, L, D)`` -> ``(S, L, H)``, adaptor on every cell."""
    return model.encoder(model.item_vectors(text, items))
