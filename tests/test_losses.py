"""Contrastive losses (one process), augmentation, and naive vs efficient pretraining."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.augment import augment, hash_uniform
from pretrain.config import LossConfig
from pretrain.gather import Gather
from pretrain.losses import pretrain_loss, seq_item_loss, seq_seq_loss
from pretrain.model import BackboneConfig, UniSRec
from pretrain.naive import naive_pretrain_loss

TEXT_DIM = 8
NUM_ITEMS = 15
SINGLE = Gather.single()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def cross_entropy(logits: list[float], positive: int) -> float:
    return -logits[positive] + math.log(sum(math.exp(z) for z in logits))


@pytest.fixture
def model() -> UniSRec:
    torch.manual_seed(0)
    cfg = BackboneConfig(hidden_size=16, num_heads=2, inner_size=24, max_seq_len=6, num_experts=3)
    return UniSRec(cfg, TEXT_DIM).eval()


@pytest.fixture
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(NUM_ITEMS + 1, TEXT_DIM, generator=gen)
    table[0] = 0.0
    return table, table + 0.3 * torch.randn(table.shape, generator=gen)


def make_batch(rows: list[list[int]], sample_ids: list[int] | None = None) -> dict:
    """Right-pad ``rows`` with 0 to a (B, 7) batch; an empty row is a filler row."""
    width = 7
    items = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    ids = sample_ids if sample_ids is not None else list(range(100, 100 + len(rows)))
    return {
        "items": items,
        "lengths": torch.tensor([len(r) for r in rows]),
        "sample_id": torch.tensor(ids),
    }


# ---- seq_item_loss / seq_seq_loss against hand computations -----------------------------


def test_seq_item_loss_matches_hand_computed_cross_entropy():
    queries = [[1.0, 0.0], [0.6, 0.8]]
    keys = [[2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]]
    key_ids = [4, 9, 2]
    targets = [9, 4]
    tau = 0.5

    expected = 0.0
    for q, target in zip(queries, targets, strict=True):
        logits = [cosine(q, k) / tau for k in keys]
        expected += cross_entropy(logits, key_ids.index(target))

    windows = [[7, 9], [8, 4]]  # no other key in either query's window
    loss, count = seq_item_loss(
        torch.tensor(queries), torch.tensor(targets), torch.tensor([0, 1]),
        torch.tensor(windows), torch.tensor(keys), torch.tensor(key_ids), tau, SINGLE,
    )  # fmt: skip
    assert count == 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_seq_item_loss_rejects_target_missing_from_keys():
    with pytest.raises(ValueError, match="target item"):
        seq_item_loss(
            torch.ones(1, 2), torch.tensor([5]), torch.tensor([0]), torch.tensor([[3, 5]]),
            torch.ones(2, 2), torch.tensor([1, 2]), 0.1, SINGLE,
        )  # fmt: skip


def test_seq_seq_loss_uses_other_views_as_negatives_but_not_its_windows_other_prefixes():
    seq = [[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]
    aug = [[0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]]
    window = [7, 7, 3]  # prefixes 0 and 1 come from one window
    tau = 0.2

    expected = 0.0
    for i, keys in ((0, (0, 2)), (1, (1, 2)), (2, (0, 1, 2))):
        logits = [cosine(seq[i], aug[j]) / tau for j in keys]
        expected += cross_entropy(logits, keys.index(i))

    loss, count = seq_seq_loss(
        torch.tensor(seq), torch.tensor(aug), torch.tensor(window), tau, SINGLE
    )
    assert count == 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---- pretrain_loss ------------------------------------------------------------------------


def test_seq_item_candidates_are_the_batch_targets_except_the_own_windows_items(model, tables):
    """Per-pair reference: query (row r, position t) is scored against every distinct item
    that is some query's target in the batch, leaving out the items of row r other than its
    own target (history before first_query included); each candidate counts once."""
    table, dropped = tables
    # 3 and 5 are targets of several queries and rows; 6, 7, 9 are never a target; row 2 is
    # a filler row; row 3's first two inputs are history only, and its 4 is row 1's target.
    rows = [[3, 5, 3, 5, 1], [7, 5, 2, 4], [], [6, 4, 9, 3, 11]]
    first_query = [0, 0, 0, 2]
    batch = make_batch(rows)
    batch["first_query"] = torch.tensor(first_query)
    tau = 0.1
    out = pretrain_loss(
        model, batch, table, dropped, LossConfig(lam=0.0, temperature=tau), step=0, seed=0,
        gather=SINGLE,
    )  # fmt: skip

    pairs = [(r, t) for r, row in enumerate(rows) for t in range(first_query[r], len(row) - 1)]
    batch_targets = sorted({rows[r][t + 1] for r, t in pairs})
    assert batch_targets == [1, 2, 3, 4, 5, 11]
    with torch.no_grad():
        vectors = {
            i: model.item_vectors(table[[i]], torch.tensor([i]))[0].tolist() for i in batch_targets
        }
        expected = 0.0
        for r, t in pairs:
            query = model(torch.tensor([rows[r]]), table).outputs[0, t].tolist()
            target = rows[r][t + 1]
            candidates = [i for i in batch_targets if i == target or i not in rows[r]]
            logits = [cosine(query, vectors[i]) / tau for i in candidates]
            expected += cross_entropy(logits, candidates.index(target))
    assert out["queries"] == len(pairs) == 4 + 3 + 2
    assert out["seq_item"] == pytest.approx(expected / len(pairs), rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected / len(pairs), rel=1e-5)


def test_filler_rows_change_nothing(model, tables):
    table, dropped = tables
    rows = [[3, 5, 3, 5], [7, 5, 2], [1, 9]]
    loss = LossConfig(lam=0.5, temperature=0.07)
    kwargs = dict(step=3, seed=11, gather=SINGLE)
    plain = pretrain_loss(model, make_batch(rows, [10, 11, 12]), table, dropped, loss, **kwargs)
    filled = pretrain_loss(
        model, make_batch([[], *rows, []], [90, 10, 11, 12, 91]), table, dropped, loss, **kwargs
    )
    assert filled["queries"] == plain["queries"] == 6
    assert filled["seq_item"] == pytest.approx(plain["seq_item"], rel=1e-6)
    assert filled["seq_seq"] == pytest.approx(plain["seq_seq"], rel=1e-6)
    assert filled["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)


@pytest.mark.parametrize("item_drop_prob", [1.0, 0.0], ids=["item-drop", "word-drop"])
def test_naive_and_efficient_formulations_agree(model, tables, item_drop_prob):
    table, dropped = tables
    batch = make_batch([[3, 5, 3, 5, 8, 1, 2], [7, 5, 2], [], [4, 6]])
    batch["first_query"] = torch.tensor([2, 0, 0, 0])  # row 0's first two are history only
    loss = LossConfig(lam=0.5, temperature=0.07, item_drop_batch_prob=item_drop_prob)
    results = []
    for loss_fn in (pretrain_loss, naive_pretrain_loss):
        model.zero_grad()
        out = loss_fn(model, batch, table, dropped, loss, step=1, seed=5, gather=SINGLE)
        out["loss"].backward()
        # The gate-noise weights get no gradient in eval mode: compare them as zeros.
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()
        ]
        results.append((out, grads))
    (fast, fast_grads), (naive, naive_grads) = results

    assert fast["queries"] == naive["queries"] == 4 + 2 + 1
    assert fast["seq_item"] == pytest.approx(naive["seq_item"], rel=1e-5)
    assert fast["seq_seq"] == pytest.approx(naive["seq_seq"], rel=1e-5)
    for a, b in zip(fast_grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("item_drop_prob", [1.0, 0.0], ids=["item-drop", "word-drop"])
def test_seq_seq_loss_treats_every_query_prefix_as_if_augmented_on_its_own(
    model, tables, item_drop_prob
):
    """Reference: every query prefix is encoded alone; its view is that prefix with the
    batch's (fixed) keep / word-drop decisions for its positions, also encoded alone. Keys are
    all query prefixes' views except the other prefixes of the same window."""
    table, dropped = tables
    rows = [[3, 5, 3, 5, 8, 1, 2], [7, 5, 2], [], [4, 6, 9, 10, 11]]
    first_query = [0, 0, 0, 3]  # row 3 is a later window: only its last prefix is a query
    batch = make_batch(rows, [20, 21, 22, 23])
    batch["first_query"] = torch.tensor(first_query)
    cfg = LossConfig(lam=1.0, temperature=0.1, item_drop_batch_prob=item_drop_prob)
    out = pretrain_loss(model, batch, table, dropped, cfg, step=2, seed=7, gather=SINGLE)

    input_lengths = torch.tensor([max(len(r) - 1, 0) for r in rows])
    _, _, use_worddrop, keep = augment(
        batch["items"][:, :-1], input_lengths, batch["sample_id"], step=2, seed=7,
        item_drop_prob=item_drop_prob,
    )  # fmt: skip
    queries, views, windows = [], [], []
    with torch.no_grad():
        for r, row in enumerate(rows):
            for t in range(first_query[r], len(row) - 1):
                prefix = row[: t + 1]
                queries.append(model(torch.tensor([prefix]), table).outputs[0, -1].tolist())
                if item_drop_prob == 1.0:
                    kept = [x for j, x in enumerate(prefix) if keep[r, j]]
                    view = model(torch.tensor([kept]), table).outputs[0, -1]
                else:
                    mask = use_worddrop[r : r + 1, : t + 1]
                    view = model(torch.tensor([prefix]), table, dropped, mask).outputs[0, -1]
                views.append(view.tolist())
                windows.append(r)
    expected = 0.0
    for i, q in enumerate(queries):
        keys = [j for j in range(len(views)) if j == i or windows[j] != windows[i]]
        logits = [cosine(q, views[j]) / 0.1 for j in keys]
        expected += cross_entropy(logits, keys.index(i))

    assert out["queries"] == len(queries) == 6 + 2 + 1
    assert out["seq_seq"] == pytest.approx(expected / len(queries), rel=1e-5)


def test_a_users_sibling_windows_are_not_each_others_negatives(model, tables):
    """Per-pair reference with one user's two overlapping windows in the batch (rows 0 and
    1, as length buckets group them): for a query of that user, no item of either window but
    its target is a sequence-item candidate, and no prefix of either window is a
    sequence-sequence key but its own view. Row 2 is another user."""
    table, dropped = tables
    rows = [[3, 5, 7, 2, 9], [7, 2, 9, 4, 6], [8, 4, 1, 11]]
    first_query = [0, 3, 0]  # row 1 is the later window: its first three inputs are history
    users = [40, 40, 41]
    batch = make_batch(rows, [30, 31, 32])
    batch["first_query"] = torch.tensor(first_query)
    batch["user"] = torch.tensor(users)
    tau = 0.1
    cfg = LossConfig(lam=1.0, temperature=tau, item_drop_batch_prob=0.0)  # word drop
    out = pretrain_loss(model, batch, table, dropped, cfg, step=2, seed=7, gather=SINGLE)

    pairs = [(r, t) for r, row in enumerate(rows) for t in range(first_query[r], len(row) - 1)]
    batch_targets = sorted({rows[r][t + 1] for r, t in pairs})
    _, _, use_worddrop, _ = augment(
        batch["items"][:, :-1], torch.tensor([len(r) - 1 for r in rows]), batch["sample_id"],
        step=2, seed=7, item_drop_prob=0.0,
    )  # fmt: skip
    with torch.no_grad():
        vectors = {
            i: model.item_vectors(table[[i]], torch.tensor([i]))[0].tolist() for i in batch_targets
        }
        queries, views = [], []
        for r, t in pairs:
            prefix = torch.tensor([rows[r][: t + 1]])
            queries.append(model(prefix, table).outputs[0, -1].tolist())
            mask = use_worddrop[r : r + 1, : t + 1]
            views.append(model(prefix, table, dropped, mask).outputs[0, -1].tolist())
    seq_item = seq_seq = 0.0
    for i, (r, t) in enumerate(pairs):
        target = rows[r][t + 1]
        own_items = {x for u, row in zip(users, rows, strict=True) if u == users[r] for x in row}
        candidates = [x for x in batch_targets if x == target or x not in own_items]
        logits = [cosine(queries[i], vectors[x]) / tau for x in candidates]
        seq_item += cross_entropy(logits, candidates.index(target))
        keys = [j for j, (s, _) in enumerate(pairs) if j == i or users[s] != users[r]]
        logits = [cosine(queries[i], views[j]) / tau for j in keys]
        seq_seq += cross_entropy(logits, keys.index(i))

    assert out["queries"] == len(pairs) == 4 + 1 + 3
    assert out["seq_item"] == pytest.approx(seq_item / len(pairs), rel=1e-5)
    assert out["seq_seq"] == pytest.approx(seq_seq / len(pairs), rel=1e-5)


# ---- ablation switches: loss.seq_item / loss.seq_seq ------------------------------------


def losses_and_grads(model, tables, loss: LossConfig) -> tuple[dict, list[torch.Tensor]]:
    table, dropped = tables
    batch = make_batch([[3, 5, 3, 5, 8, 1, 2], [7, 5, 2], [], [4, 6]])
    model.zero_grad()
    out = pretrain_loss(model, batch, table, dropped, loss, step=1, seed=5, gather=SINGLE)
    out["loss"].backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return out, grads


def test_without_seq_seq_the_loss_is_exactly_the_seq_item_term(model, tables):
    both, _ = losses_and_grads(model, tables, LossConfig(lam=0.5))
    only_si, grads = losses_and_grads(model, tables, LossConfig(lam=0.5, seq_seq=False))
    _, lam0_grads = losses_and_grads(model, tables, LossConfig(lam=0.0))
    assert only_si["seq_item"] == both["seq_item"]
    assert only_si["loss"].item() == pytest.approx(only_si["seq_item"], rel=1e-7)
    assert only_si["seq_seq"] == 0.0 and only_si["queries"] == both["queries"] == 9
    for a, b in zip(grads, lam0_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("item_drop_prob", [1.0, 0.0], ids=["item-drop", "word-drop"])
def test_without_seq_item_the_loss_is_exactly_the_seq_seq_term(model, tables, item_drop_prob):
    on = dict(lam=0.5, item_drop_batch_prob=item_drop_prob)
    both, _ = losses_and_grads(model, tables, LossConfig(**on))
    only_ss, _ = losses_and_grads(model, tables, LossConfig(**on, seq_item=False))
    assert only_ss["loss"].item() == pytest.approx(only_ss["seq_seq"], rel=1e-6)
    assert only_ss["seq_seq"] == pytest.approx(both["seq_seq"], rel=1e-6)
    assert only_ss["seq_item"] == 0.0 and only_ss["queries"] == 9


def test_both_losses_off_is_a_config_error():
    from pretrain.config import PretrainConfig
    from unisrec.config import from_dict
    from unisrec.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.seq_item, seq_seq"):
        from_dict(PretrainConfig, {"loss": {"seq_item": False, "seq_seq": False}})
    assert from_dict(PretrainConfig, {"loss": {"seq_seq": False}}).loss.seq_seq_weight == 0.0
    assert from_dict(PretrainConfig, {"loss": {"seq_item": False}}).loss.seq_seq_weight == 1.0


# ---- augmentation -------------------------------------------------------------------------


def test_item_drop_keeps_first_item_and_packs_survivors_left():
    items = torch.tensor([[11, 12, 13, 14, 15, 16, 0, 0]] * 64 + [[0] * 8])
    lengths = torch.tensor([6] * 64 + [0])
    aug, aug_lengths, use_worddrop, keep = augment(
        items, lengths, torch.arange(65), step=0, seed=0, item_drop_prob=1.0
    )
    assert torch.equal(keep.sum(dim=1), aug_lengths)
    assert not use_worddrop.any()
    assert aug_lengths[-1] == 0 and not aug[-1].any()
    for row, n in zip(aug[:-1].tolist(), aug_lengths[:-1].tolist(), strict=True):
        assert row[0] == 11
        kept = row[:n]
        assert kept == sorted(set(kept)) and set(kept) <= {11, 12, 13, 14, 15, 16}
        assert row[n:] == [0] * (8 - n)
    # 1 + 5 * 0.8 = 5 items kept on average.
    assert 4.5 < aug_lengths[:-1].float().mean().item() < 5.5


def test_word_drop_marks_only_valid_positions_and_keeps_items():
    items = torch.tensor([[1, 2, 3, 4, 5, 0]] * 200)
    lengths = torch.tensor([5] * 200)
    aug, aug_lengths, use_worddrop, keep = augment(
        items, lengths, torch.arange(200), step=0, seed=0, item_drop_prob=0.0
    )
    assert torch.equal(keep, items > 0)
    assert torch.equal(aug, items) and torch.equal(aug_lengths, lengths)
    assert not use_worddrop[:, 5].any()
    assert 0.15 < use_worddrop[:, :5].float().mean().item() < 0.25


def test_augmentation_follows_sample_id_not_row_position():
    items = torch.randint(1, 50, (6, 10))
    lengths = torch.tensor([10, 7, 3, 9, 1, 5])
    ids = torch.tensor([40, 41, 42, 43, 44, 45])
    for p in (1.0, 0.0):
        whole = augment(items, lengths, ids, step=7, seed=3, item_drop_prob=p)
        order = torch.tensor([4, 0, 5, 2, 1, 3])
        shuffled = augment(
            items[order], lengths[order], ids[order], step=7, seed=3, item_drop_prob=p
        )
        for a, b in zip(whole, shuffled, strict=True):
            assert torch.equal(a[order], b)
        other_step = augment(items, lengths, ids, step=8, seed=3, item_drop_prob=p)
        assert not all(torch.equal(a, b) for a, b in zip(whole, other_step, strict=True))


def test_batch_level_choice_follows_item_drop_prob_over_steps():
    picks = [hash_uniform(0, step).item() < 0.9 for step in range(2000)]
    assert 0.87 < sum(picks) / len(picks) < 0.93


def test_hash_uniform_separates_large_ids():
    big = torch.tensor([1 << 40, (1 << 40) + 1, 1 << 41])
    u = hash_uniform(0, 0, big)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 3
