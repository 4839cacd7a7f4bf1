"""The model's math against independent references written here, op by op.

The references read the model's weights but none of its code: RecBole's SASRec Transformer
(item + position embedding -> LayerNorm -> dropout; post-LN blocks: attention -> dropout ->
residual -> LayerNorm, then dense -> GELU -> dense -> dropout -> residual -> LayerNorm), the
paper's noisy gate ``softmax(x W_g + eps * (softplus(x W_n) + 0.01))`` in training only, and
the whitening expert ``(dropout(x) - b) W``. ``tests/mutations.py`` shows that each of these
tests catches a plausible wrong model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import BackboneConfig, MoEAdaptor, PWLayer, SASRec, SequenceEncoder, UniSRec

H, HEADS, INNER, T = 12, 3, 20, 6


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _reference_block(x: torch.Tensor, attention, feed_forward) -> torch.Tensor:
    """One RecBole TransformerLayer in eval mode, written out; x: ``(T, H)``."""
    w, b = attention.qkv.weight, attention.qkv.bias
    q, k, v = (x @ w[i * H : (i + 1) * H].T + b[i * H : (i + 1) * H] for i in range(3))
    d = H // HEADS
    heads = []
    for h in range(HEADS):
        qh, kh, vh = (m[:, h * d : (h + 1) * d] for m in (q, k, v))
        scores = qh @ kh.T / math.sqrt(d)
        future = torch.triu(torch.ones(len(x), len(x), dtype=torch.bool), diagonal=1)
        heads.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ vh)
    attended = torch.cat(heads, dim=-1) @ attention.out.weight.T + attention.out.bias
    x = _layer_norm(attended + x, attention.norm)
    hidden = _gelu(x @ feed_forward.up.weight.T + feed_forward.up.bias)
    out = hidden @ feed_forward.down.weight.T + feed_forward.down.bias
    return _layer_norm(out + x, feed_forward.norm)


def _reference_encoder(encoder: SequenceEncoder, item_vecs: torch.Tensor) -> torch.Tensor:
    """item_vecs ``(T, H)`` -> ``(T, H)``: input LayerNorm over item + position, then blocks."""
    x = _layer_norm(item_vecs + encoder.position.weight[: len(item_vecs)], encoder.norm)
    for attention, feed_forward in encoder.blocks:
        x = _reference_block(x, attention, feed_forward)
    return x


def _config(**overrides) -> BackboneConfig:
    sizes = dict(hidden_size=H, num_heads=HEADS, inner_size=INNER, max_seq_len=T, num_experts=3)
    return BackboneConfig(**(sizes | overrides))


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (LayerNorm gains and biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_sequence_encoder_is_recbole_post_ln_transformer():
    torch.manual_seed(0)
    encoder = SequenceEncoder(_config()).eval()
    _randomise(encoder)
    item_vecs = torch.randn(2, T, H)
    got = encoder(item_vecs)
    for row in range(2):
        torch.testing.assert_close(got[row], _reference_encoder(encoder, item_vecs[row]))


def test_unisrec_forward_is_adaptor_then_encoder_and_scores_are_cosine_over_tau():
    torch.manual_seed(0)
    model = UniSRec(_config(), text_dim=5).eval()
    _randomise(model)
    table = torch.randn(9, 5)
    items = torch.tensor([[3, 1, 4, 1, 5, 0]])
    outputs = model(items, table).outputs[0]

    experts = model.adaptor.experts
    gates = torch.softmax(table[items[0]] @ model.adaptor.w_gate, dim=-1)  # eval: no noise
    vecs = sum(
        gates[:, g : g + 1] * ((table[items[0]] - e.bias) @ e.lin.weight.T)
        for g, e in enumerate(experts)
    )
    torch.testing.assert_close(outputs, _reference_encoder(model.encoder, vecs))

    candidates = torch.randn(7, H)
    cos = (outputs[2] / outputs[2].norm()) @ (candidates / candidates.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(model.score(outputs[2], candidates, 0.25), cos / 0.25)


def test_sasrec_scores_by_dot_product_over_its_id_embedding():
    torch.manual_seed(0)
    model = SASRec(_config(), num_items=6).eval()
    _randomise(model)
    outputs = model(torch.tensor([[2, 5, 1]]), None).outputs[0]
    vecs = model.item_ids.weight[torch.tensor([2, 5, 1])]
    torch.testing.assert_close(outputs, _reference_encoder(model.encoder, vecs))
    weights = model.item_ids.weight[1:]
    torch.testing.assert_close(model.score(outputs[-1], weights, 0.25), weights @ outputs[-1])


def test_noisy_gate_is_softplus_scaled_gaussian_in_training_only(monkeypatch):
    torch.manual_seed(0)
    adaptor = MoEAdaptor(in_dim=6, out_dim=4, num_experts=5, dropout=0.0)
    _randomise(adaptor)
    x = torch.randn(8, 6)
    eps = torch.randn(8, 5)
    monkeypatch.setattr(torch, "randn_like", lambda t: eps.clone())

    adaptor.train()
    expected = torch.softmax(
        x @ adaptor.w_gate + eps * (F.softplus(x @ adaptor.w_noise) + 0.01), -1
    )
    torch.testing.assert_close(adaptor.gates(x), expected)
    adaptor.eval()
    torch.testing.assert_close(adaptor.gates(x), torch.softmax(x @ adaptor.w_gate, dim=-1))


def test_whitening_expert_drops_out_the_text_vector_before_the_shift():
    """With W = I the expert's output is ``x * m - b``: every ``(out + b) / x`` must be a
    dropout mask value, 0 or 1/(1-p), whatever random draws the layer makes. Dropping after
    the shift, ``(x - b) * m``, would give other ratios."""
    torch.manual_seed(0)
    expert = PWLayer(in_dim=16, out_dim=16, dropout=0.5).train()
    _randomise(expert)
    with torch.no_grad():
        expert.lin.weight.copy_(torch.eye(16))
    x = torch.rand(64, 16) + 0.5  # away from 0: the ratio is well defined

    mask = (expert(x) + expert.bias.detach()) / x
    dropped, kept = mask.abs() < 1e-5, (mask - 2.0).abs() < 1e-5
    assert bool((dropped | kept).all()), mask[~(dropped | kept)][:5]
    assert 0.4 < kept.float().mean().item() < 0.6
    # A zero text vector keeps its whole shift whatever the dropout draws.
    torch.testing.assert_close(expert(torch.zeros(3, 16)), (-expert.bias).detach().expand(3, 16))


@pytest.mark.parametrize("t", range(1, T + 1))
def test_encoder_output_at_t_depends_only_on_items_up_to_t(t):
    torch.manual_seed(0)
    encoder = SequenceEncoder(_config()).eval()
    _randomise(encoder)
    item_vecs = torch.randn(1, T, H)
    changed = item_vecs.clone()
    changed[:, t:] = torch.randn(1, T - t, H)
    torch.testing.assert_close(encoder(item_vecs)[:, :t], encoder(changed)[:, :t])
