"""experiments.sibling_windows counts what a window mask missed, checked on a small batch."""

from __future__ import annotations

from experiments.sibling_windows import count_batch


def test_counts_sibling_queries_and_the_negatives_a_window_mask_kept():
    #        user  items            first_query
    rows = [
        (7, [1, 2, 3, 4], 0),  # queries -> 2, 3, 4
        (7, [3, 4, 5, 6], 2),  # sibling window: queries -> 6
        (8, [9, 5, 1], 0),  # another user: queries -> 5, 1
    ]
    counts = count_batch(rows)
    assert counts["queries"] == 3 + 1 + 2
    assert counts["queries_with_sibling"] == 4
    # batch targets {1, 2, 3, 4, 5, 6}: user 7's window 0 kept its sibling's 5 and 6 as
    # negatives (3 queries x 2); window 1's query kept 1 and 2 (its target 6 is its own).
    assert counts["si_pairs_unmasked"] == 3 * 2 + 2
    # each of window 0's 3 queries met window 1's 1 prefix, and the reverse
    assert counts["ss_pairs_unmasked"] == 3 * 1 + 1 * 3
    assert counts["batches_with_sibling"] == 1
