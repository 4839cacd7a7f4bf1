"""Full-ranking evaluation: ranks, metrics and popularity groups against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from adaptors.evaluate import (
    EvalSplit,
    item_popularity,
    metrics_by_group,
    metrics_from_ranks,
    popularity_groups,
    rank_of_targets,
    rank_split,
)
from pretrain.model import BackboneConfig, SASRec, UniSRec

#             pad   1    2    3    4    5
SCORES = torch.tensor(
    [
        [9.0, 0.1, 0.9, 0.5, 0.7, 0.3],  # target 3: items 2 and 4 score higher -> rank 2
        [9.0, 0.8, 0.2, 0.4, 0.6, 0.0],  # target 1: best item -> rank 0
        [9.0, 0.5, 0.5, 0.5, 0.1, 0.9],  # target 2: only item 5 is strictly higher -> rank 1
    ]
)
TARGETS = torch.tensor([3, 1, 2])


def test_rank_counts_items_scored_strictly_higher_and_ignores_padding_column():
    assert rank_of_targets(SCORES, TARGETS).tolist() == [2, 0, 1]


def test_ties_with_the_target_count_in_its_favour():
    tied = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    assert rank_of_targets(tied, torch.tensor([3])).tolist() == [0]


def test_excluded_items_do_not_count_but_the_target_is_still_ranked():
    exclude = torch.zeros_like(SCORES, dtype=torch.bool)
    exclude[0, [2, 3]] = True  # user 0's history holds item 2 and the target itself
    exclude[2, 5] = True
    assert rank_of_targets(SCORES, TARGETS, exclude).tolist() == [1, 0, 0]


def test_metrics_match_hand_computed_recall_and_ndcg():
    ranks = torch.tensor([0, 1, 9, 10, 60])
    metrics = metrics_from_ranks(ranks, [10, 50])
    assert metrics["recall@10"] == pytest.approx(3 / 5)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert metrics["recall@50"] == pytest.approx(4 / 5)
    expected = (1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)) / 5
    assert metrics["ndcg@50"] == pytest.approx(expected)


def test_metrics_of_no_users_are_zero_not_nan():
    assert metrics_from_ranks(torch.zeros(0, dtype=torch.long), [10]) == {
        "recall@10": 0.0,
        "ndcg@10": 0.0,
    }


def test_popularity_counts_training_interactions_per_item():
    counts = item_popularity([np.array([1, 2, 2]), np.array([2, 4])], num_items=4)
    assert counts.tolist() == [0, 1, 3, 0, 1]


def test_popularity_groups_split_items_evenly_least_popular_first():
    counts = np.array([0, 5, 1, 9, 1, 3, 7])  # items 1..6
    groups = popularity_groups(counts, 3)
    assert groups[0] == -1
    # by (count, index): 2(1) 4(1) | 5(3) 1(5) | 6(7) 3(9)
    assert groups[1:].tolist() == [1, 0, 2, 0, 1, 2]


def test_metrics_by_group_counts_targets_per_group():
    counts = np.array([0, 5, 1, 9, 1, 3, 7])
    groups = popularity_groups(counts, 3)
    ranks = torch.tensor([0, 20, 3, 0])
    targets = torch.tensor([2, 4, 3, 1])  # groups 0, 0, 2, 1
    report = metrics_by_group(ranks, targets, groups, counts, k=10)
    assert [g["count"] for g in report] == [2, 1, 1]
    assert [g["recall@10"] for g in report] == [0.5, 1.0, 1.0]
    assert report[0]["ndcg@10"] == pytest.approx(0.5)
    assert report[2]["ndcg@10"] == pytest.approx(1 / math.log2(5))
    assert (report[0]["min_count"], report[0]["max_count"]) == (1, 1)


def test_eval_split_keeps_the_most_recent_history_items():
    frame = pd.DataFrame({"user": [0, 1], "history": [[1, 2, 3, 4], [5]], "target": [6, 7]})
    split = EvalSplit.from_frame(frame, max_seq_len=3)
    assert split.histories.tolist() == [[2, 3, 4], [5, 0, 0]]
    assert split.lengths.tolist() == [3, 1]
    assert split.targets.tolist() == [6, 7]


def _tiny_unisrec() -> UniSRec:
    torch.manual_seed(0)
    cfg = BackboneConfig(hidden_size=8, inner_size=16, num_heads=2, num_experts=2, max_seq_len=5)
    return UniSRec(cfg, text_dim=4).eval()


def test_rank_split_matches_scoring_each_user_alone_with_cosine_logits():
    model = _tiny_unisrec()
    table = F.pad(torch.randn(12, 4), (0, 0, 1, 0))  # 12 items + padding row
    frame = pd.DataFrame(
        {"user": [0, 1, 2], "history": [[1, 2, 3], [4], [5, 6, 7, 8]], "target": [4, 9, 2]}
    )
    split = EvalSplit.from_frame(frame, max_seq_len=5)
    ranks = rank_split(model, split, table, temperature=0.07, batch_size=2)

    with torch.no_grad():
        items = F.normalize(model.item_vectors(table[1:], torch.arange(1, 13)), dim=-1)
        for user, (history, target) in enumerate(
            zip(frame["history"], frame["target"], strict=True)
        ):
            seq = model(torch.tensor([history]), table).outputs[0, -1]
            scores = items @ F.normalize(seq, dim=0)
            assert ranks[user] == int((scores > scores[target - 1]).sum())


def test_rank_split_excluding_history_never_ranks_worse():
    model = _tiny_unisrec()
    table = F.pad(torch.randn(12, 4), (0, 0, 1, 0))
    frame = pd.DataFrame({"user": [0, 1], "history": [[1, 2, 3, 4, 5], [6, 7]], "target": [3, 8]})
    split = EvalSplit.from_frame(frame, max_seq_len=5)
    plain = rank_split(model, split, table, temperature=0.07)
    excluded = rank_split(model, split, table, temperature=0.07, exclude_history=True)
    assert (excluded <= plain).all()
    # user 0's target repeats a history item and is still ranked, against 12 - 4 others
    assert excluded[0] <= 12 - 5


def test_sasrec_is_ranked_by_dot_product_of_its_id_embeddings():
    torch.manual_seed(0)
    model = SASRec(BackboneConfig(hidden_size=8, inner_size=16, max_seq_len=5), num_items=6).eval()
    frame = pd.DataFrame({"user": [0], "history": [[1, 2]], "target": [3]})
    ranks = rank_split(model, EvalSplit.from_frame(frame, 5), torch.zeros(7, 4), temperature=0.07)
    with torch.no_grad():
        seq = model(torch.tensor([[1, 2]]), None).outputs[0, -1]
        scores = model.item_ids.weight[1:] @ seq
    assert ranks.tolist() == [int((scores > scores[2]).sum())]
