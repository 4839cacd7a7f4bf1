"""UniSRec's two contrastive pretraining losses, with negatives shared across ranks.

* sequence-item (L_si): a sequence prefix should score its next item above every other
  distinct target of the global batch, except the items of its own user (any of the
  user's windows in the global batch: its history and its future are not contrasts);
* sequence-sequence (L_ss): the same query prefix should score its own augmented view
  above the augmented views of all other query prefixes of the global batch (the other
  prefixes of its own user are left out: they share its items).

A user's windows overlap (``shards.window_stride``) and length buckets put windows of similar
length, often one user's siblings, into one batch: the mask is by user, not by window.

Both use cosine similarity over a temperature. ``loss = L_si + lam * L_ss``, each term a
mean over all query prefixes of the whole global batch, so 1 worker and N workers on the same global batch give
the same loss and (after DDP/DeepSpeed's gradient averaging) the same gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.augment import augment
from pretrain.config import LossConfig
from pretrain.gather import Gather
from pretrain.model import SequenceRecommender


def seq_item_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    query_rows: torch.Tensor,
    windows: torch.Tensor,
    keys: torch.Tensor,
    key_ids: torch.Tensor,
    temperature: float,
    gather: Gather,
    users: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of each query's target among all ranks' distinct batch targets.

    queries: ``(Q, H)`` sequence outputs; targets: ``(Q,)`` long item ids; query_rows:
    ``(Q,)`` long, the row of ``windows`` each query comes from; windows: ``(B, T)`` long,
    this rank's windows (item ids, 0 = padding). keys: ``(K, H)`` item vectors of this
    rank's distinct targets, key_ids: ``(K,)`` long, no duplicates, holding every target.
    users: ``(B,)`` long, the user of each window, a key unique across ranks and domains
    (default: every window its own user).

    The candidates are the global batch's distinct targets (as in the official code, whose
    candidates are the batch's positive items): keys are gathered from every rank, an item
    held by several ranks counts once, so another copy of the positive is never a negative.
    An item of any window of the query's user, on any rank, other than its target is not a
    negative either: it is the user's own history or future, not a contrast. Returns (sum of
    the Q cross-entropies, scalar with grad; Q).
    """
    if users is None:
        users = own_window_users(windows.shape[0], gather, windows.device)
    q = F.normalize(queries, dim=-1)
    all_keys, valid = gather.all_gather_ragged(F.normalize(keys, dim=-1))
    all_ids, _ = gather.all_gather_ragged(key_ids)
    all_ids = all_ids.masked_fill(~valid, -1)
    candidate = valid & _first_occurrence(all_ids)  # (K_all,)

    is_target = (targets.unsqueeze(1) == all_ids.unsqueeze(0)) & candidate  # (Q, K_all)
    if not bool(is_target.any(dim=1).all()):
        raise ValueError("every target item must be among this rank's key_ids")
    users_own = _users_hold(windows, users, all_ids, gather)[query_rows]  # (Q, K_all)
    allowed = candidate & (is_target | ~users_own)
    logits = (q @ all_keys.T / temperature).masked_fill(~allowed, float("-inf"))
    # No keys anywhere (an all-filler batch on one process): no queries either.
    labels = is_target.int().argmax(dim=1) if is_target.numel() else targets.new_zeros(0)
    return F.cross_entropy(logits, labels, reduction="sum"), int(q.shape[0])


def own_window_users(rows: int, gather: Gather, device: torch.device | None = None) -> torch.Tensor:
    """``(rows,)`` long user keys that make every window of every rank its own user (for
    batches that carry no ``user``): ``rank * rows + row``."""
    return gather.rank * rows + torch.arange(rows, device=device)


def _users_hold(
    windows: torch.Tensor, users: torch.Tensor, ids: torch.Tensor, gather: Gather
) -> torch.Tensor:
    """windows: ``(B, T)`` long (0 = padding), users: ``(B,)`` long, ids: ``(K,)`` long ->
    ``(B, K)`` bool, True where some window of row b's user, on any rank, holds ids[k].

    Every rank's ``(user, item)`` cells are gathered (P of them, no autograd needed); memory
    ``U x (P + K)`` for the U distinct users, not ``B x T x K``.
    """
    rows, cols = windows.nonzero(as_tuple=True)
    cells, valid = gather.all_gather_ragged(torch.stack([users[rows], windows[rows, cols]], 1))
    cells = cells[valid]  # (P, 2): user, item
    n = cells.shape[0]
    user_uniq, user_at = torch.unique(torch.cat([cells[:, 0], users]), return_inverse=True)
    item_uniq, item_at = torch.unique(torch.cat([cells[:, 1], ids]), return_inverse=True)
    holds = torch.zeros(user_uniq.shape[0], item_uniq.shape[0], dtype=torch.bool, device=ids.device)
    holds[user_at[:n], item_at[:n]] = True
    return holds[user_at[n:]][:, item_at[n:]]


def seq_seq_loss(
    seq: torch.Tensor,
    aug: torch.Tensor,
    user: torch.Tensor,
    temperature: float,
    gather: Gather,
) -> tuple[torch.Tensor, int]:
    """InfoNCE of each query prefix against all ranks' augmented prefix views.

    seq, aug: ``(Q, H)``, query prefix i and its augmented view (Q may differ per rank);
    user: ``(Q,)`` long, the user each prefix comes from, a key unique across ranks and
    domains. Query i's positive is its own view; every other user's view is a negative; the
    other prefixes of its own user (of any of its windows, on any rank) are not keys.
    Returns (sum of the Q cross-entropies, scalar with grad; Q).
    """
    q = F.normalize(seq, dim=-1)
    all_aug, valid = gather.all_gather_ragged(F.normalize(aug, dim=-1))  # (world * Q_max, H)
    all_user, _ = gather.all_gather_ragged(user)
    q_max = all_aug.shape[0] // gather.world_size
    own = gather.rank * q_max + torch.arange(q.shape[0], device=q.device)  # (Q,)
    keys = torch.arange(all_aug.shape[0], device=q.device)
    sibling = (user.unsqueeze(1) == all_user.unsqueeze(0)) & (own.unsqueeze(1) != keys)
    logits = (q @ all_aug.T / temperature).masked_fill(sibling | ~valid, float("-inf"))
    return F.cross_entropy(logits, own, reduction="sum"), int(q.shape[0])


def next_item_targets(
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a batch into all its next-item prediction problems at once.

    batch: ``items`` ``(B, T)`` long, right-padded with 0; ``lengths`` ``(B,)`` long, 0 for
    filler rows; ``first_query`` ``(B,)`` long (optional, default 0): input positions before
    it are history only (see :func:`sharding.windows.training_windows`). Input position t
    predicts item t+1, so every query of every window is answered in one causal pass:

        items     [a b c d 0]   length 4, first_query 1
        inputs    [a b c d]     positions 1..2 are queries
        targets   [b c d 0]     query_mask [0 1 1 0]

    Returns ``items`` ``(B, T)`` with anything past a row's length zeroed, ``inputs``
    ``(B, T-1)``, ``targets`` ``(B, T-1)`` and ``query_mask`` ``(B, T-1)`` bool.
    """
    items, lengths = batch["items"], batch["lengths"]
    if items.shape[1] < 2:
        raise ValueError(f"items needs at least 2 columns (input + target), got {items.shape}")
    first_query = batch.get("first_query")
    if first_query is None:
        first_query = torch.zeros_like(lengths)
    positions = torch.arange(items.shape[1], device=items.device)
    items = items.masked_fill(positions >= lengths.unsqueeze(1), 0)
    inputs_at = positions[:-1]
    query_mask = (inputs_at < (lengths - 1).unsqueeze(1)) & (inputs_at >= first_query.unsqueeze(1))
    return items, items[:, :-1], items[:, 1:], query_mask


def global_mean_loss(
    si_sum: torch.Tensor,
    si_count: int,
    ss_sum: torch.Tensor,
    ss_count: int,
    ss_weight: float,
    gather: Gather,
) -> dict[str, torch.Tensor | float | int]:
    """Turn this rank's loss sums into its share of the global-mean loss.

    DDP and DeepSpeed average gradients over ranks, so each rank's loss is scaled by the world
    size: the averaged gradient is then the one-process gradient of
    ``mean(L_si) + ss_weight * mean(L_ss)`` over the global batch
    (:attr:`LossConfig.seq_seq_weight`). Returns ``loss`` (scalar to backprop) and the global
    means ``seq_item``, ``seq_seq`` (0 for a term switched off) and query count ``queries``
    for logging.
    """
    sums = torch.stack([si_sum.detach(), ss_sum.detach()]).double()
    counts = torch.tensor([si_count, ss_count], dtype=torch.float64, device=sums.device)
    totals = gather.all_reduce_sum(torch.cat([sums, counts]))  # one collective for all four
    si_total, ss_total = max(float(totals[2]), 1.0), max(float(totals[3]), 1.0)
    loss = (si_sum / si_total + ss_weight * ss_sum / ss_total) * gather.world_size
    return {
        "loss": loss,
        "seq_item": float(totals[0]) / si_total,
        "seq_seq": float(totals[1]) / ss_total,
        "queries": int(totals[2]),
    }


def pretrain_loss(
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
    """UniSRec pretraining loss on this rank's part of a global batch.

    model: called as a module (a DeepSpeed engine works too: ZeRO-3 gathers its partitioned
    parameters in the module hooks). batch: ``items`` ``(B, T)`` long global item indexes
    right-padded with 0 (T may be ``max_seq_len + 1``: the last column is only ever a
    target), ``lengths`` ``(B,)`` long (0 for filler rows), ``first_query`` ``(B,)`` long
    (optional; see :func:`next_item_targets`), ``sample_id`` ``(B,)`` long, ``user`` ``(B,)``
    long (optional; the user key of :func:`sharding.stream.pad_batch`; without it every
    window is its own user).
    text_table, worddrop_table: ``(N+1, D)`` float32 text vectors of each item's text and of
    its word-dropped text. B must be equal on every rank. See :func:`global_mean_loss` for
    the returned dict.
    """
    items, inputs, targets, query_mask = next_item_targets(batch)
    input_lengths = (batch["lengths"] - 1).clamp(min=0)
    users = batch.get("user")
    if users is None:
        users = own_window_users(items.shape[0], gather, items.device)

    # The adaptor runs once per distinct item; its outputs are inputs, targets the candidates.
    encoded = model(items, text_table, last_is_target=True)
    outputs = encoded.outputs  # (B, T-1, H)
    # A term switched off (the paper's ablations) is not computed: sum 0 over the queries.
    queries = int(query_mask.sum())
    si_sum, si_count = ss_sum, ss_count = outputs.new_zeros(()), queries
    if loss.seq_item:
        query_targets = targets[query_mask]
        is_key = torch.isin(encoded.item_ids, query_targets)  # the batch's distinct targets
        si_sum, si_count = seq_item_loss(
            outputs[query_mask],
            query_targets,
            query_mask.nonzero(as_tuple=True)[0],
            items,
            encoded.item_vectors[is_key],
            encoded.item_ids[is_key],
            loss.temperature,
            gather,
            users,
        )

    if loss.seq_seq:
        # One augmented pass over whole windows; prefix t's view is the augmented row's
        # output at cumsum(keep)[t] - 1 (word drop keeps every item: position t).
        aug_items, _, use_worddrop, keep = augment(
            inputs, input_lengths, batch["sample_id"], step, seed,
            item_drop_prob=loss.item_drop_batch_prob,
            keep_prob=loss.item_keep_prob,
            word_drop_pos_prob=loss.word_drop_position_prob,
        )  # fmt: skip
        aug_outputs = model(aug_items, text_table, worddrop_table, use_worddrop).outputs
        rows, cols = query_mask.nonzero(as_tuple=True)
        view_at = keep.long().cumsum(dim=1) - 1  # (B, T-1)
        ss_sum, ss_count = seq_seq_loss(
            outputs[rows, cols],
            aug_outputs[rows, view_at[rows, cols]],
            users[rows],
            loss.temperature,
            gather,
        )
    return global_mean_loss(si_sum, si_count, ss_sum, ss_count, loss.seq_seq_weight, gather)


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """ids: ``(K,)`` long -> ``(K,)`` bool, True where ids[i] did not appear before i."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full_like(uniq, ids.shape[0]).scatter_reduce(0, inverse, positions, "amin")
    return first[inverse] == positions
