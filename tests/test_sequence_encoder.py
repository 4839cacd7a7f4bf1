"""SequenceEncoder and UniSRec: causality, padding, one adaptor pass per distinct item."""

from __future__ import annotations

import pytest
import torch

from pretrain.model import BackboneConfig, SequenceEncoder, UniSRec

TEXT_DIM = 8
NUM_ITEMS = 20


def small_config(**overrides) -> BackboneConfig:
    sizes = dict(hidden_size=16, num_heads=2, inner_size=24, max_seq_len=8, num_experts=3)
    return BackboneConfig(**(sizes | overrides))


def text_table(seed: int = 0) -> torch.Tensor:
    """``(NUM_ITEMS + 1, TEXT_DIM)`` with the padding row 0 zeroed."""
    table = torch.randn(NUM_ITEMS + 1, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    table[0] = 0.0
    return table


@pytest.fixture
def model() -> UniSRec:
    torch.manual_seed(0)
    return UniSRec(small_config(), TEXT_DIM).eval()


def test_output_at_t_equals_encoding_the_prefix_alone(model):
    items = torch.tensor([[3, 7, 7, 1, 12, 5, 9], [2, 4, 6, 8, 10, 11, 13]])
    table = text_table()
    full = model(items, table).outputs
    for t in range(items.shape[1]):
        prefix = model(items[:, : t + 1], table).outputs
        torch.testing.assert_close(full[:, t], prefix[:, t], atol=1e-5, rtol=0)


def test_right_padding_leaves_valid_positions_unchanged(model):
    table = text_table()
    alone = model(torch.tensor([[4, 9, 2]]), table).outputs
    # Row 0 padded with 0s up to the longer row 1:
    #   [4 9 2 . . . .]
    #   [1 2 3 4 5 6 7]
    batch = torch.tensor([[4, 9, 2, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
    padded = model(batch, table).outputs
    torch.testing.assert_close(padded[0, :3], alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(padded).all()


def test_padding_outputs_are_finite_even_in_training(model):
    model.train()
    out = model(torch.tensor([[5, 0, 0, 0], [0, 0, 0, 0]]), text_table()).outputs
    assert torch.isfinite(out).all()


def test_adaptor_runs_once_per_distinct_item(model):
    rows_seen = []
    model.adaptor.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
    items = torch.tensor([[3, 7, 7, 1, 3, 0], [7, 1, 1, 1, 0, 0], [2, 3, 0, 0, 0, 0]])
    model(items, text_table())
    assert rows_seen == [torch.unique(items).numel()]  # {0, 1, 2, 3, 7}: 5 rows, not 18


def test_word_dropped_positions_read_the_second_table(model):
    table, dropped = text_table(0), text_table(1)
    items = torch.tensor([[3, 7, 3, 5]])
    use = torch.tensor([[False, True, True, False]])
    # Item 3 appears once plain and once word-dropped: two different inputs.
    text = torch.where(use.unsqueeze(-1), dropped[items], table[items])
    expected = model.encoder(model.item_vectors(text, items))
    got = model(items, table, dropped, use).outputs
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_longer_than_max_seq_len_raises(model):
    items = torch.ones(1, model.cfg.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(items, text_table())


def test_heads_must_divide_hidden_size():
    with pytest.raises(ValueError, match="not divisible"):
        SequenceEncoder(small_config(hidden_size=15))


def test_last_reads_position_length_minus_one():
    outputs = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    last = UniSRec.last(outputs, torch.tensor([3, 1]))
    assert last.squeeze(-1).tolist() == [2.0, 4.0]


def test_transductive_item_vectors_add_the_id_embedding():
    torch.manual_seed(0)
    model = UniSRec(small_config(), TEXT_DIM, num_items=NUM_ITEMS).eval()
    ids = torch.tensor([0, 3, 3, 17])
    text = text_table()[ids]
    expected = model.adaptor(text) + model.item_ids.weight[ids]
    torch.testing.assert_close(model.item_vectors(text, ids), expected)
    torch.testing.assert_close(model.item_ids.weight[0], torch.zeros(16))


@pytest.mark.parametrize("num_items", [0, NUM_ITEMS])
def test_encoder_and_tuned_parameters_split_the_model(num_items):
    model = UniSRec(small_config(), TEXT_DIM, num_items=num_items)
    input_norm = {id(p) for p in model.encoder.norm.parameters()}
    frozen = {id(p) for p in model.encoder.parameters()} - input_norm
    tuned = {id(p) for p in model.tuned_parameters()}
    assert not frozen & tuned
    assert frozen | tuned == {id(p) for p in model.parameters()}
    assert id(model.encoder.position.weight) in frozen
    assert input_norm <= tuned, "the input LayerNorm trains with the adaptor (official code)"
    if num_items:
        assert id(model.item_ids.weight) in tuned
