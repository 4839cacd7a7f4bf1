"""Full-ranking leave-one-out evaluation: every user's target against every item of the domain.

Shapes:
    U  users in a batch     N  items in the domain (indexes 1..N; 0 is padding)
    T  history positions    H  model hidden size

Ranking rule: a target's rank is the number of catalogue items scored *strictly higher*
(0 = top). Ties therefore count in the target's favour; with float scores from a trained
model they are practically absent, but a model scoring everything equal would look perfect,
so don't evaluate one. Column 0 (padding) never counts. With ``exclude_history`` the user's
history items do not count either, except the target itself when it repeats an earlier item.

Metrics, averaged over users (as the paper and RecBole): ``recall@k = [rank < k]`` and
``ndcg@k = [rank < k] / log2(rank + 2)`` (one relevant item, so IDCG = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pretrain.model import SequenceRecommender


@dataclass
class EvalSplit:
    """One leave-one-out split as tensors.

    histories: ``(U, T) int64`` item indexes, right-padded with 0; lengths: ``(U,) int64``
    (>= 1); targets: ``(U,) int64`` the held-out item of each user.
    """

    histories: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, max_seq_len: int) -> EvalSplit:
        """``frame``: a valid/test split (columns history, target); histories keep their
        last ``max_seq_len`` items (the model's limit may be shorter than the dataset's)."""
        histories = [np.asarray(h, dtype=np.int64)[-max_seq_len:] for h in frame["history"]]
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        if len(histories) and int(lengths.min()) < 1:
            raise ValueError("every user needs at least one history item")
        padded = torch.zeros(
            len(histories), int(lengths.max()) if len(histories) else 1, dtype=torch.long
        )
        for row, history in enumerate(histories):
            padded[row, : len(history)] = torch.tensor(history)
        targets = torch.tensor(frame["target"].to_numpy(dtype=np.int64))
        return cls(padded, lengths, targets)

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def rank_of_targets(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of each target among the items.

    scores: ``(U, N+1)`` float, column 0 = padding (ignored); targets: ``(U,)`` long in 1..N;
    exclude: optional ``(U, N+1)`` bool, True = item takes no part in the ranking (the target
    itself always does). Returns ``(U,)`` long: items with a strictly greater score.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_scores = scores[rows, targets].unsqueeze(1)
    counted = scores > target_scores
    counted[:, 0] = False
    if exclude is not None:
        counted &= ~exclude
    return counted.sum(dim=1)


def metrics_from_ranks(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """ranks: ``(U,)`` long 0-based -> ``{"recall@k": .., "ndcg@k": ..}`` averaged over users.

    An empty ``ranks`` gives zeros rather than NaNs.
    """
    ranks = ranks.double()
    metrics: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        metrics[f"recall@{k}"] = float(hit.double().mean()) if len(ranks) else 0.0
        gain = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
        metrics[f"ndcg@{k}"] = float(gain.mean()) if len(ranks) else 0.0
    return metrics


def item_popularity(train_sequences: list[np.ndarray], num_items: int) -> np.ndarray:
    """Training-set interaction count of every item: ``(N+1,) int64``, row 0 = 0."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for sequence in train_sequences:
        np.add.at(counts, np.asarray(sequence, dtype=np.int64), 1)
    counts[0] = 0
    return counts


def popularity_groups(counts: np.ndarray, num_groups: int) -> np.ndarray:
    """Split items 1..N into ``num_groups`` groups of (nearly) equal item count by training
    frequency, group 0 the least popular (the paper's long-tail analysis).

    counts: ``(N+1,)`` from :func:`item_popularity` -> ``(N+1,) int64`` group per item; item 0
    gets -1. Equal-frequency ties are split by item index, so groups never collapse.
    """
    order = np.lexsort((np.arange(1, len(counts)), counts[1:])) + 1  # least popular first
    groups = np.full(len(counts), -1, dtype=np.int64)
    for group, members in enumerate(np.array_split(order, num_groups)):
        groups[members] = group
    return groups


def metrics_by_group(
    ranks: torch.Tensor,
    targets: torch.Tensor,
    groups: np.ndarray,
    counts: np.ndarray,
    k: int = 10,
) -> list[dict]:
    """Per popularity group of the target item: users, recall@k, ndcg@k and the group's
    training-frequency range. ranks, targets: ``(U,)``; groups, counts: ``(N+1,)``."""
    target_group = torch.as_tensor(groups)[targets.cpu()]
    report = []
    for group in range(int(groups.max()) + 1):
        members = np.flatnonzero(groups == group)
        in_group = target_group == group
        metrics = metrics_from_ranks(ranks.cpu()[in_group], [k])
        report.append(
            {
                "group": group,
                "items": int(len(members)),
                "min_count": int(counts[members].min()) if len(members) else 0,
                "max_count": int(counts[members].max()) if len(members) else 0,
                "count": int(in_group.sum()),
                f"recall@{k}": metrics[f"recall@{k}"],
                f"ndcg@{k}": metrics[f"ndcg@{k}"],
            }
        )
    return report


@torch.no_grad()
def rank_split(
    model: SequenceRecommender,
    split: EvalSplit,
    text_table: torch.Tensor,
    *,
    temperature: float,
    exclude_history: bool = False,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Rank every user's target against all N items; returns ``(U,)`` long ranks on the CPU.

    text_table: ``(N+1, D)`` float32 on the model's device. The model is put in eval mode
    (no dropout, no gate noise) and left there.
    """
    model.eval()
    device = text_table.device
    items = model.catalogue_vectors(text_table)  # (N+1, H), once for all users
    ranks = torch.empty(len(split), dtype=torch.long)
    # Users of similar history length share a batch, so little of it is padding.
    for batch in torch.argsort(split.lengths, stable=True).split(batch_size):
        lengths = split.lengths[batch].to(device)
        histories = split.histories[batch, : int(lengths.max())].to(device)
        last = model.last(model.encode(histories, items), lengths)  # (U, H)
        logits = model.score(last, items[1:], temperature)  # (U, N)
        scores = F.pad(logits, (1, 0), value=float("-inf"))  # (U, N+1), column 0 = padding
        exclude = None
        if exclude_history:
            exclude = torch.zeros_like(scores, dtype=torch.bool)
            exclude.scatter_(1, histories, True)
        ranks[batch] = rank_of_targets(scores, split.targets[batch].to(device), exclude).cpu()
    return ranks


@dataclass
class EvalData:
    """A domain's text vectors, valid and test splits, and training popularity."""

    text_table: torch.Tensor  # (N+1, D) float32 on the scoring device, row 0 = padding
    valid: EvalSplit
    test: EvalSplit
    popularity: np.ndarray  # (N+1,) int64 training interactions per item

    @property
    def num_items(self) -> int:
        return self.text_table.shape[0] - 1


def load_eval_data(dataset, domain: str, max_seq_len: int, device: torch.device) -> EvalData:
    """``dataset``: a :class:`sharding.dataset.Dataset`; histories cut to ``max_seq_len``."""
    train = list(dataset.split(domain, "train")["items"])
    return EvalData(
        text_table=torch.from_numpy(np.array(dataset.embeddings(domain), dtype=np.float32)).to(
            device
        ),
        valid=EvalSplit.from_frame(dataset.split(domain, "valid"), max_seq_len),
        test=EvalSplit.from_frame(dataset.split(domain, "test"), max_seq_len),
        popularity=item_popularity(train, dataset.domain(domain).num_items),
    )


def full_report(
    model: SequenceRecommender,
    data: EvalData,
    *,
    temperature: float,
    ks: list[int],
    exclude_history: bool = False,
    batch_size: int = 1024,
    groups: int = 5,
) -> dict:
    """``{"valid": metrics, "test": metrics, "test_by_popularity": [...]}``; the popularity
    breakdown uses the first cut-off in ``ks``."""
    options = {
        "temperature": temperature,
        "exclude_history": exclude_history,
        "batch_size": batch_size,
    }
    valid_ranks = rank_split(model, data.valid, data.text_table, **options)
    test_ranks = rank_split(model, data.test, data.text_table, **options)
    return {
        "valid": metrics_from_ranks(valid_ranks, ks),
        "test": metrics_from_ranks(test_ranks, ks),
        "test_by_popularity": metrics_by_group(
            test_ranks,
            data.test.targets,
            popularity_groups(data.popularity, groups),
            data.popularity,
            k=ks[0],
        ),
    }
