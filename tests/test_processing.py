"""Sequence processing: text cleaning, k-core, ordering, indexing, leave-one-out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sharding.config import ProcessingConfig
from sharding.processing import build_sequences, clean_text, kcore_filter, leave_one_out
from sharding.types import EventLog


def events(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    """Events in the given row order; ``order`` is the row's position."""
    return pd.DataFrame(
        {
            "user": [r[0] for r in rows],
            "item": [r[1] for r in rows],
            "timestamp": np.array([r[2] for r in rows], dtype=np.float64),
            "order": np.arange(len(rows), dtype=np.int64),
        }
    )


def as_lists(domain) -> dict[str, list[str]]:
    """user key -> item keys in sequence order."""
    return {
        user: [domain.item_keys[i - 1] for i in seq]
        for user, seq in zip(domain.user_keys, domain.sequences, strict=True)
    }


# --- clean_text -------------------------------------------------------------------------


def test_clean_text_unescapes_entities_strips_tags_and_collapses_space():
    raw = "  Foo &amp; Bar&#39;s <b>bold</b>.\n\t<br/>deal&nbsp;pack<P>two  "
    assert clean_text(raw) == "Foo & Bar's bold. deal pack two"


def test_clean_text_keeps_angle_brackets_that_are_not_tags():
    assert clean_text("size < 5 mm and > 2 mm") == "size < 5 mm and > 2 mm"


def test_clean_text_cuts_at_the_last_word_boundary():
    assert clean_text("alpha beta gamma", 12) == "alpha beta"
    assert clean_text("alpha beta gamma", 10) == "alpha beta"
    assert clean_text("alpha beta gamma", 16) == "alpha beta gamma"


def test_clean_text_cuts_a_single_long_word_mid_word():
    assert clean_text("abcdefghij klm", 4) == "abcd"


# --- k-core -------------------------------------------------------------------------------


def test_kcore_iterates_until_removing_a_user_no_longer_drops_an_item():
    # k=2. u4 has one row -> dropped; then item c has one row -> dropped; then u3 is left
    # with one row -> dropped; a and b keep two rows each. One pass would keep u3.
    log = events(
        [
            ("u1", "a", 1), ("u1", "b", 2),
            ("u2", "a", 1), ("u2", "b", 2),
            ("u3", "c", 1), ("u3", "a", 2),
            ("u4", "c", 1),
        ]
    )  # fmt: skip
    kept = kcore_filter(log, 2)
    assert sorted(zip(kept["user"], kept["item"], strict=True)) == [
        ("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"),
    ]  # fmt: skip


def test_kcore_with_separate_user_threshold_only_filters_users():
    log = events([("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1), ("u2", "b", 2)])
    kept = kcore_filter(log, 0, user_k=3)
    assert set(kept["user"]) == {"u1"}
    assert len(kept) == 3


# --- build_sequences ----------------------------------------------------------------------


def make_log(rows, texts=None, skipped=None) -> EventLog:
    texts = texts if texts is not None else {r[1]: f"text of {r[1]}" for r in rows}
    return EventLog(domain="d", events=events(rows), item_text=texts, skipped=skipped or {})


def test_equal_timestamps_keep_file_order_and_earlier_times_go_first():
    rows = [("u", "x", 5), ("u", "y", 5), ("u", "z", 1), ("u", "w", 5)]
    domain = build_sequences(make_log(rows), ProcessingConfig(kcore=0))
    assert as_lists(domain) == {"u": ["z", "x", "y", "w"]}


def test_order_column_not_row_position_breaks_timestamp_ties():
    log = make_log([("u", "x", 5), ("u", "y", 5), ("u", "z", 1)])
    log.events["order"] = [7, 3, 9]  # y was earlier in its file than x
    assert as_lists(build_sequences(log, ProcessingConfig(kcore=0))) == {"u": ["z", "y", "x"]}


def test_exact_duplicates_are_dropped_and_counted_but_repeat_purchases_kept():
    rows = [("u", "a", 1), ("u", "a", 1), ("u", "b", 2), ("u", "a", 3)]
    domain = build_sequences(
        make_log(rows, skipped={"bad_timestamp": 2}), ProcessingConfig(kcore=0)
    )
    assert as_lists(domain) == {"u": ["a", "b", "a"]}
    assert domain.skipped == {"bad_timestamp": 2, "duplicate": 1}


def test_a_wider_duplicate_key_keeps_rows_that_differ_in_its_extra_column():
    # online-retail: one invoice line twice is one interaction; the same item at the same
    # time with another quantity is a second one.
    rows = [("u", "a", 1), ("u", "a", 1), ("u", "a", 1), ("u", "b", 2), ("u", "c", 3)]
    log = make_log(rows)
    log.events["quantity"] = [6.0, 6.0, 2.0, 1.0, 1.0]
    log.duplicate_key = ("user", "item", "quantity", "timestamp")
    domain = build_sequences(log, ProcessingConfig(kcore=0))
    assert as_lists(domain) == {"u": ["a", "a", "b", "c"]}
    assert domain.skipped == {"duplicate": 1}


def test_interactions_on_items_without_text_are_dropped_and_counted():
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "d", 4), ("u", "e", 5)]
    texts = {"a": "A", "b": "B", "c": "<br>", "d": "D"}  # c cleans to nothing, e has none
    domain = build_sequences(make_log(rows, texts), ProcessingConfig(kcore=0))
    assert as_lists(domain) == {"u": ["a", "b", "d"]}
    assert domain.skipped == {"item_without_text": 2}


def test_users_with_fewer_than_three_interactions_are_dropped_even_without_kcore():
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "b", 2), ("u2", "c", 3)]
    domain = build_sequences(make_log(rows), ProcessingConfig(kcore=0))
    assert domain.user_keys == ["u2"]


def test_kcore_argument_overrides_the_config():
    rows = [(f"u{u}", "a", 1) for u in range(3)] + [(f"u{u}", "b", 2) for u in range(3)]
    rows += [(f"u{u}", "c", 3) for u in range(3)] + [("u0", "rare", 4)]
    cfg = ProcessingConfig(kcore=2)
    assert "rare" not in build_sequences(make_log(rows), cfg).item_keys
    assert "rare" in build_sequences(make_log(rows), cfg, kcore=0).item_keys


def test_items_and_users_are_indexed_in_sorted_key_order_with_cleaned_cut_texts():
    rows = [("u2", "b", 1), ("u2", "c", 2), ("u2", "a", 3), ("u1", "c", 1), ("u1", "a", 2)]
    rows.append(("u1", "b", 3))
    texts = {"a": "Alpha &amp; one", "b": "Beta  two three", "c": "<i>Gamma</i>"}
    domain = build_sequences(make_log(rows, texts), ProcessingConfig(kcore=0, max_text_chars=9))
    assert domain.item_keys == ["a", "b", "c"]
    assert domain.item_texts == ["Alpha &", "Beta two", "Gamma"]
    assert domain.user_keys == ["u1", "u2"]
    assert [s.tolist() for s in domain.sequences] == [[3, 1, 2], [2, 3, 1]]
    assert all(s.dtype == np.int64 for s in domain.sequences)
    assert domain.num_interactions == 6


def test_sequences_are_kept_whole_beyond_max_seq_len():
    rows = [("u", f"i{t:02d}", t) for t in range(12)]
    domain = build_sequences(make_log(rows), ProcessingConfig(kcore=0, max_seq_len=4))
    assert len(domain.sequences[0]) == 12


# --- tie groups ---------------------------------------------------------------------------

# One user, eight items at t=5 (a tie group), one before and one after.
TIED = [("u", "z", 1)] + [("u", item, 5) for item in "abcdefgh"] + [("u", "y", 9)]


def tie_order_of(rows, **cfg) -> list[str]:
    return as_lists(build_sequences(make_log(rows), ProcessingConfig(kcore=0, **cfg)))["u"]


def test_shuffle_permutes_a_tie_group_the_same_on_every_run_and_differently_by_seed():
    first = tie_order_of(TIED, tie_order="shuffle", seed=0)
    again = tie_order_of(TIED, tie_order="shuffle", seed=0)
    other = tie_order_of(TIED, tie_order="shuffle", seed=1)
    assert first == again
    assert other != first
    for order in (first, other):
        assert order[0] == "z" and order[-1] == "y"  # time still orders across groups
        assert sorted(order[1:-1]) == list("abcdefgh")
        assert order[1:-1] != list("abcdefgh")  # not file order


def test_shuffle_does_not_depend_on_where_the_rows_sit_in_the_file():
    shuffled = tie_order_of(TIED, tie_order="shuffle", seed=0)
    others = [("v", "a", 5), ("v", "b", 5), ("v", "c", 7)]
    moved = others + TIED[::-1]  # reversed file order, other users' rows in front
    assert tie_order_of(moved, tie_order="shuffle", seed=0) == shuffled


def test_file_tie_order_keeps_file_order_whatever_the_seed():
    assert tie_order_of(TIED, tie_order="file", seed=7) == ["z", *"abcdefgh", "y"]


def test_tie_groups_of_the_kept_interactions_are_counted_with_the_policy():
    rows = [("u", "a", 1), ("u", "b", 1), ("u", "c", 1), ("u", "d", 2)]
    rows += [("v", "a", 1), ("v", "b", 2), ("v", "c", 2), ("v", "d", 3)]
    rows += [("w", "a", 4), ("w", "x", 4), ("w", "b", 5), ("w", "c", 6)]  # x has no text
    log = make_log(rows, texts={i: i for i in "abcd"})
    assert build_sequences(log, ProcessingConfig(kcore=0)).ties == {
        "order": "file", "seed": None, "groups": 2, "interactions": 5,
    }  # fmt: skip
    shuffled = build_sequences(log, ProcessingConfig(kcore=0, tie_order="shuffle", seed=3))
    assert shuffled.ties == {"order": "shuffle", "seed": 3, "groups": 2, "interactions": 5}


def test_the_manifest_and_data_stats_say_how_each_domain_ordered_its_ties(tmp_path, capsys):
    from recipes.cli import main
    from sharding.config import ShardJobConfig
    from sharding.dataset import Dataset
    from sharding.dataset_writer import EncodedDomain, write_dataset
    from sharding.stats import format_stats

    rows = TIED + [("v", "a", 1), ("v", "b", 2), ("v", "c", 3)]
    shuffled = build_sequences(make_log(rows), ProcessingConfig(kcore=0), tie_order="shuffle")
    shuffled.name = "basket"
    kept = build_sequences(make_log(rows), ProcessingConfig(kcore=0))
    kept.name = "shop"
    given = build_sequences(make_log(rows), ProcessingConfig(kcore=0))
    given.name, given.ties = "atomic", None  # what unisrec-atomic hands over: no timestamps
    encoded = [
        EncodedDomain(d, False, np.ones((len(d.item_keys), 4), np.float32), None)
        for d in (shuffled, kept, given)
    ]
    encoder = {"name": "test", "dim": 4, "pooling": "cls", "max_length": 8}
    write_dataset(tmp_path / "ds", encoded, encoder, ShardJobConfig())

    domains = Dataset(tmp_path / "ds").manifest["domains"]
    assert domains["basket"]["ties"] == {
        "order": "shuffle", "seed": 0, "groups": 1, "interactions": 8,
    }  # fmt: skip
    assert domains["shop"]["ties"]["order"] == "file"
    assert domains["atomic"]["ties"] is None

    assert main(["data", "stats", str(tmp_path / "ds")]) == 0
    table = {line.split()[0]: line.split()[5:] for line in capsys.readouterr().out.splitlines()}
    assert table["basket"] == ["shuffle:0", "1", "8", "(61.5%)"]
    assert table["shop"] == ["file", "1", "8", "(61.5%)"]
    assert table["atomic"] == ["given", "-", "-"]

    del domains["shop"]["ties"]  # a manifest written before ties were recorded
    manifest = {**Dataset(tmp_path / "ds").manifest, "domains": domains}
    shop = next(line for line in format_stats(manifest).splitlines() if line.startswith("shop"))
    assert shop.split()[5:] == ["?", "?", "?"]


# --- leave_one_out ------------------------------------------------------------------------


def test_leave_one_out_cuts_histories_to_max_seq_len():
    train, (valid_hist, valid_target), (test_hist, test_target) = leave_one_out(
        np.array([1, 2, 3, 4, 5, 6]), max_seq_len=3
    )
    assert train.tolist() == [1, 2, 3, 4]
    assert (valid_hist.tolist(), valid_target) == ([2, 3, 4], 5)
    assert (test_hist.tolist(), test_target) == ([3, 4, 5], 6)


def test_leave_one_out_keeps_short_histories_whole():
    train, (valid_hist, valid_target), (test_hist, test_target) = leave_one_out(
        np.array([7, 8, 9]), max_seq_len=50
    )
    assert train.tolist() == [7]
    assert (valid_hist.tolist(), valid_target) == ([7], 8)
    assert (test_hist.tolist(), test_target) == ([7, 8], 9)


def test_leave_one_out_refuses_sequences_shorter_than_three():
    with pytest.raises(ValueError, match="at least 3"):
        leave_one_out(np.array([1, 2]), max_seq_len=50)
