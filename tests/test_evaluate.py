"""Full-ranking evaluation: ranks, metrics and popularity groups against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from adaptors.evaluate import (
    Catalogue,
    EvalSplit,
    Ranks,
    item_popularity,
    metrics_by_group,
    metrics_from_ranks,
    popularity_groups,
    rank_of_targets,
    rank_split,
    user_blocks,
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


def test_rank_counts_items_scored_higher_and_tied_and_ignores_padding_column():
    ranks = rank_of_targets(SCORES, TARGETS)
    assert ranks.greater.tolist() == [2, 0, 1]
    assert ranks.ties.tolist() == [0, 0, 2]  # user 2: items 1 and 3 tie with the target
    assert ranks.expected.tolist() == [2.0, 0.0, 2.0]


def test_ties_with_the_target_count_as_half_a_place_each():
    tied = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    ranks = rank_of_targets(tied, torch.tensor([3]))
    assert (ranks.greater.tolist(), ranks.ties.tolist()) == ([0], [2])
    assert ranks.expected.tolist() == [1.0]


def test_excluded_items_do_not_count_but_the_target_is_still_ranked():
    exclude = torch.zeros_like(SCORES, dtype=torch.bool)
    exclude[0, [2, 3]] = True  # user 0's history holds item 2 and the target itself
    exclude[2, [1, 5]] = True
    ranks = rank_of_targets(SCORES, TARGETS, exclude)
    assert ranks.greater.tolist() == [1, 0, 0]
    assert ranks.ties.tolist() == [0, 0, 1]


def _metrics_over_all_tie_orders(greater: int, ties: int, k: int) -> tuple[float, float]:
    """Reference: average recall/ndcg over every order of the target and its tied items."""
    recalls, gains = [], []
    for order in itertools.permutations(range(ties + 1)):
        position = greater + order.index(0)  # item 0 of the tied group is the target
        recalls.append(float(position < k))
        gains.append(1 / math.log2(position + 2) if position < k else 0.0)
    return sum(recalls) / len(recalls), sum(gains) / len(gains)


@pytest.mark.parametrize(
    "greater,ties", [(0, 0), (0, 3), (2, 4), (7, 5), (9, 0), (9, 2), (10, 1), (12, 3)]
)
def test_tied_metrics_are_the_exact_expectation_over_random_tie_orders(greater, ties):
    metrics = metrics_from_ranks(Ranks(torch.tensor([greater]), torch.tensor([ties])), [10])
    recall, ndcg = _metrics_over_all_tie_orders(greater, ties, 10)
    assert metrics["recall@10"] == pytest.approx(recall)
    assert metrics["ndcg@10"] == pytest.approx(ndcg)


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


def test_metrics_by_group_uses_tied_ranks():
    counts = np.array([0, 5, 1, 9, 1, 3, 7])
    groups = popularity_groups(counts, 3)
    ranks = Ranks(torch.tensor([0, 0]), torch.tensor([1, 0]))  # first target tied with one
    report = metrics_by_group(ranks, torch.tensor([2, 4]), groups, counts, k=1)
    assert report[0]["recall@1"] == pytest.approx((0.5 + 1.0) / 2)


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


def _reference_ranks(model, table, frame, exclude_history=False):
    """Each user alone, all items at once: (greater, ties) by direct comparison; items with
    the same text as the target tie with it (a text-only model cannot tell them apart)."""
    n = table.shape[0] - 1
    with torch.no_grad():
        items = model.item_vectors(table[1:], torch.arange(1, n + 1))
        out = []
        for history, target in zip(frame["history"], frame["target"], strict=True):
            seq = model(torch.tensor([history]), table).outputs[0, -1]
            scores = model.score(seq, items, 0.07)  # (N,)
            others = torch.ones(n, dtype=torch.bool)
            others[target - 1] = False
            if exclude_history:
                others[[i - 1 for i in history if i != target]] = False
            target_score = scores[target - 1]
            twin = (table[1:] == table[target]).all(dim=1)
            out.append(
                (
                    int(((scores > target_score) & others & ~twin).sum()),
                    int((((scores == target_score) | twin) & others).sum()),
                )
            )
    return out


def test_rank_split_matches_scoring_each_user_alone_with_cosine_logits():
    model = _tiny_unisrec()
    table = F.pad(torch.randn(12, 4), (0, 0, 1, 0))  # 12 items + padding row
    table[9] = table[3]  # items 3 and 9 have the same text: user 2 and 0's targets tie
    frame = pd.DataFrame(
        {"user": [0, 1, 2], "history": [[1, 2, 3], [4], [5, 6, 7, 8]], "target": [9, 4, 3]}
    )
    split = EvalSplit.from_frame(frame, max_seq_len=5)
    expected = _reference_ranks(model, table, frame)
    for batch_size, item_block in [(2, 5), (1, 1), (3, 12), (256, 16384)]:
        ranks = rank_split(
            model, split, table, temperature=0.07, batch_size=batch_size, item_block=item_block
        )
        assert list(zip(ranks.greater.tolist(), ranks.ties.tolist(), strict=True)) == expected
    assert expected[0][1] >= 1 and expected[2][1] >= 1  # the duplicate text is a tie


def test_a_model_scoring_every_item_equal_ranks_targets_in_the_middle():
    """Regression: ties once counted in the target's favour, so this model looked perfect."""
    model = _tiny_unisrec()
    table = F.pad(torch.ones(40, 4), (0, 0, 1, 0))  # every item has the same text
    frame = pd.DataFrame({"user": [0, 1], "history": [[1, 2], [5]], "target": [3, 40]})
    ranks = rank_split(model, EvalSplit.from_frame(frame, 5), table, temperature=0.07)
    assert ranks.expected.tolist() == [19.5, 19.5]
    metrics = metrics_from_ranks(ranks, [10])
    assert metrics["recall@10"] == pytest.approx(10 / 40)
    assert metrics["ndcg@10"] == pytest.approx(sum(1 / math.log2(p + 2) for p in range(10)) / 40)


def test_rank_split_excluding_history_drops_exactly_the_history_items():
    model = _tiny_unisrec()
    table = F.pad(torch.randn(12, 4), (0, 0, 1, 0))
    frame = pd.DataFrame(
        {"user": [0, 1, 2], "history": [[1, 2, 3, 4, 5], [6, 7], [9, 10, 11]], "target": [3, 8, 12]}
    )
    split = EvalSplit.from_frame(frame, max_seq_len=5)
    plain = rank_split(model, split, table, temperature=0.07)
    for item_block in (4, 16384):
        excluded = rank_split(
            model, split, table, temperature=0.07, exclude_history=True, item_block=item_block
        )
        reference = _reference_ranks(model, table, frame, exclude_history=True)
        assert list(zip(excluded.greater.tolist(), excluded.ties.tolist(), strict=True)) == (
            reference
        )
    assert (excluded.greater <= plain.greater).all()
    assert (excluded.greater < plain.greater).any()  # the data exercises the exclusion
    # user 0's target repeats a history item and is still ranked, against 12 - 5 others
    assert excluded.greater[0] + excluded.ties[0] <= 12 - 5


def test_sasrec_is_ranked_by_dot_product_of_its_id_embeddings():
    torch.manual_seed(0)
    model = SASRec(BackboneConfig(hidden_size=8, inner_size=16, max_seq_len=5), num_items=6).eval()
    frame = pd.DataFrame({"user": [0], "history": [[1, 2]], "target": [3]})
    ranks = rank_split(model, EvalSplit.from_frame(frame, 5), torch.zeros(7, 4), temperature=0.07)
    with torch.no_grad():
        seq = model(torch.tensor([[1, 2]]), None).outputs[0, -1]
        scores = model.item_ids.weight[1:] @ seq
    assert ranks.greater.tolist() == [int((scores > scores[2]).sum())]


def _dense_reference(model, table, frame, temperature, exclude_history=False):
    """Plain ranking: all users padded into one encoder pass, every item scored by one dense
    matmul, then (greater, ties) counted per user; twins (same text as the target) tie."""
    n = table.shape[0] - 1
    split = EvalSplit.from_frame(frame, model.max_seq_len)
    with torch.no_grad():
        items = model.catalogue_vectors(table)  # (N+1, H)
        queries = model.last(model.encode(split.histories, items), split.lengths)  # (U, H)
        scores = (F.normalize(queries, dim=-1) / temperature) @ F.normalize(items[1:], dim=-1).T
    out = []
    for u, (history, target) in enumerate(zip(frame["history"], frame["target"], strict=True)):
        counted = torch.ones(n, dtype=torch.bool)
        counted[target - 1] = False
        if exclude_history:
            counted[[i - 1 for i in history if i != target]] = False
        twin = (table[1:] == table[target]).all(dim=1)
        above = scores[u] > scores[u, target - 1]
        equal = scores[u] == scores[u, target - 1]
        out.append((int((above & counted & ~twin).sum()), int(((equal | twin) & counted).sum())))
    return out


def test_fast_ranking_matches_a_dense_reference_over_ragged_histories():
    """Users of 1..8 history items (T = 8), a catalogue of 90 items with twins, ranked in
    length groups with the last block at the last position only, in user and item blocks:

        user  0: [a]              length 1   } one length group, encoded unpadded
        user  1: [b]              length 1   }
        user  2: [c d e f g h i j] length 8
        ...
    """
    torch.manual_seed(3)
    cfg = BackboneConfig(hidden_size=16, inner_size=32, num_heads=2, num_experts=3, max_seq_len=8)
    model = UniSRec(cfg, text_dim=6).eval()
    with torch.no_grad():
        model.adaptor.w_gate.normal_(0, 0.5)  # gates away from the uniform start
    table = F.pad(torch.randn(90, 6), (0, 0, 1, 0))
    table[40] = table[7]
    table[41] = table[7]  # items 7, 40, 41 share a text
    generator = np.random.default_rng(0)
    lengths = generator.integers(1, 9, size=70)
    histories = [list(generator.integers(1, 91, size=length)) for length in lengths]
    targets = list(generator.integers(1, 91, size=70))
    targets[:6] = [7, 40, 41, 7, 12, 12]
    histories[4] = [12, 3, 12]  # the target repeats a history item
    frame = pd.DataFrame({"user": range(70), "history": histories, "target": targets})
    split = EvalSplit.from_frame(frame, cfg.max_seq_len)
    for exclude in (False, True):
        expected = _dense_reference(model, table, frame, 0.07, exclude_history=exclude)
        for batch_size, item_block in [(1024, 16384), (17, 16384), (20, 31), (3, 90), (1, 7)]:
            ranks = rank_split(
                model,
                split,
                table,
                temperature=0.07,
                exclude_history=exclude,
                batch_size=batch_size,
                item_block=item_block,
            )
            got = list(zip(ranks.greater.tolist(), ranks.ties.tolist(), strict=True))
            assert got == expected, (exclude, batch_size, item_block)
    assert all(expected[u][1] >= 2 for u in range(3))  # the twins tie with the target


def test_encode_last_is_the_last_output_of_the_full_encoder():
    torch.manual_seed(1)
    cfg = BackboneConfig(hidden_size=16, inner_size=32, num_heads=2, max_seq_len=6)
    model = UniSRec(cfg, text_dim=4).eval()
    table = F.pad(torch.randn(20, 4), (0, 0, 1, 0))
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        items = model.catalogue_vectors(table)
        for lengths in (torch.tensor([6, 2, 1]), torch.tensor([6, 6, 6])):
            full = model.last(model.encode(seqs, items), lengths)
            torch.testing.assert_close(model.encode_last(seqs, lengths, items), full)


def test_a_catalogue_computed_once_ranks_like_one_computed_per_split():
    model = _tiny_unisrec()
    table = F.pad(torch.randn(12, 4), (0, 0, 1, 0))
    frame = pd.DataFrame({"user": [0, 1], "history": [[1, 2, 3], [4]], "target": [9, 4]})
    split = EvalSplit.from_frame(frame, max_seq_len=5)
    with torch.no_grad():
        catalogue = Catalogue.of(model, table, item_block=16384)
    alone = rank_split(model, split, table, temperature=0.07)
    shared = rank_split(model, split, table, temperature=0.07, catalogue=catalogue)
    assert torch.equal(alone.greater, shared.greater) and torch.equal(alone.ties, shared.ties)


def test_user_blocks_cover_every_row_once_without_a_short_last_block():
    for count, size in [(0, 8), (5, 1024), (1024, 1024), (1030, 1024), (1050, 1024), (40, 1)]:
        blocks = user_blocks(count, size)
        rows = [r for block in blocks for r in range(count)[block]]
        assert rows == list(range(count))
        assert (
            all(block.stop - block.start >= 16 for block in blocks)
            or len(blocks) <= 1
            or (size < 16)
        )
