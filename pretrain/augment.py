"""The augmented view of each sequence for the sequence-sequence contrastive loss.

Per batch, one of two augmentations (as in the paper):
  * item drop (probability ``item_drop_prob``): keep each item with ``keep_prob``, always
    keep the first, and close the gaps;
  * word drop (otherwise): each position reads its item's word-dropped text vector with
    probability ``word_drop_pos_prob``; the caller looks those up in a second text table.

Every random decision is a hash of ``(seed, step)`` for the batch-level choice and of
``(seed, step, sample_id, position)`` per item, never of the rank or row order, so one worker
and two workers holding the same global batch augment it identically.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit state times one of them stays below 2**63, so the
# int64 arithmetic never overflows.
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)
_ITEM_DROP_SALT = 1
_WORD_DROP_SALT = 2


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """Scramble a 32-bit state held in int64 (xor-shift / multiply rounds)."""
    for m in _MULTIPLIERS:
        h = h ^ (h >> 16)
        h = (h * m) & _MASK32
    return h ^ (h >> 16)


def hash_uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """Uniform floats in [0, 1) that depend only on the (broadcast) integer ``keys``.

    Each key is an int or an int64 tensor; the result has their broadcast shape, float32.
    Both 32-bit halves of every key are mixed in, so large sample ids stay distinct.
    """
    h = torch.zeros((), dtype=torch.int64)
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64)
        h = _mix32(h ^ (key & _MASK32))
        h = _mix32(h ^ ((key >> 32) & _MASK32))
    # The top 24 bits are exact in float32.
    return (h >> 8).to(torch.float32) / float(1 << 24)


def augment(
    items: torch.Tensor,
    lengths: torch.Tensor,
    sample_ids: torch.Tensor,
    step: int,
    seed: int,
    item_drop_prob: float = 0.9,
    keep_prob: float = 0.8,
    word_drop_pos_prob: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a batch of right-padded sequences.

    items: ``(B, T)`` long, right-padded with 0; lengths: ``(B,)`` long (0 for filler rows);
    sample_ids: ``(B,)`` long, a stable id per sample.
    Returns ``aug_items`` ``(B, T)`` long (right-padded with 0), ``aug_lengths`` ``(B,)`` long,
    ``use_worddrop`` ``(B, T)`` bool (all False under item drop) and ``keep`` ``(B, T)`` bool,
    the input positions that survive (every valid one under word drop).

    A decision depends on the position, not on the length, so a prefix ``items[b, :t+1]``
    augmented on its own gets exactly the first ``cumsum(keep[b])[t]`` items of row b's
    augmented view: its causal encoding is the output at ``cumsum(keep[b])[t] - 1``.
    """
    b, t = items.shape
    positions = torch.arange(t, device=items.device).unsqueeze(0)  # (1, T)
    ids = sample_ids.to(torch.int64).unsqueeze(1)  # (B, 1)
    valid = positions < lengths.unsqueeze(1)  # (B, T)

    if hash_uniform(seed, step).item() < item_drop_prob:
        u = hash_uniform(seed, step, _ITEM_DROP_SALT, ids, positions)
        keep = valid & ((u < keep_prob) | (positions == 0))
        # Kept items move left to their rank among the kept ones; dropped ones go nowhere.
        target = torch.where(keep, keep.long().cumsum(dim=1) - 1, t)
        out = items.new_zeros(b, t + 1)  # column t swallows dropped and padded positions
        out.scatter_(1, target, items)
        return out[:, :t], keep.sum(dim=1), torch.zeros_like(keep), keep

    u = hash_uniform(seed, step, _WORD_DROP_SALT, ids, positions)
    use_worddrop = valid & (u < word_drop_pos_prob)
    return items.masked_fill(~valid, 0), lengths.clone(), use_worddrop, valid
