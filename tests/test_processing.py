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
