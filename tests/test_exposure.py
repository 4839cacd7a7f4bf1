"""Exposure analysis: each user's top items and the share of them per popularity group."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from adaptors.evaluate import EvalSplit
from experiments.exposure import group_shares, top_items, write_exposure
from pretrain.model import BackboneConfig, UniSRec


def test_top_items_are_each_users_best_items_outside_its_history():
    torch.manual_seed(0)
    cfg = BackboneConfig(hidden_size=8, inner_size=16, num_heads=2, num_experts=2, max_seq_len=5)
    model = UniSRec(cfg, text_dim=4).eval()
    table = F.pad(torch.randn(12, 4), (0, 0, 1, 0))  # 12 items + padding row
    histories = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]  # the last one longer than max_seq_len
    frame = pd.DataFrame({"user": [0, 1, 2], "history": histories, "target": [9, 4, 3]})
    split = EvalSplit.from_frame(frame, max_seq_len=5)

    top = top_items(model, split, table, temperature=0.07, k=4, batch_size=2)

    with torch.no_grad():  # each user alone, every item scored, by hand
        items = model.item_vectors(table[1:], torch.arange(1, 13))
        for row, history in enumerate(histories):
            seq = model(torch.tensor([history[-5:]]), table).outputs[0, -1]
            scores = model.score(seq, items, 0.07)
            allowed = [i for i in range(1, 13) if i not in history]
            expected = sorted(allowed, key=lambda i: -float(scores[i - 1]))[:4]
            assert top[row].tolist() == expected


def test_group_shares_count_every_slot_once():
    groups = np.array([-1, 0, 0, 1, 2])  # items 1..4
    shares = group_shares(torch.tensor([[1, 3], [2, 4], [1, 1]]), groups)
    assert shares == pytest.approx([4 / 6, 1 / 6, 1 / 6])


def test_each_training_fraction_gets_its_own_report_files(tmp_path):
    table = {"scratch": {"exposure": [0.4, 0.6], "per_seed": [[0.4, 0.6]], "targets": [0.5, 0.5]}}
    first = write_exposure(tmp_path, table, 0.1, 10)
    second = write_exposure(tmp_path, table, 0.25, 10)
    assert [p.name for p in first] == ["exposure-f0.1.json", "exposure-f0.1.md"]
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in first + second}
    assert "| scratch (n=1) | 0.400 | 0.600 |" in first[1].read_text()
