"""MoEAdaptor: shapes, gating, training-only noise, and the whitening expert's arithmetic."""

from __future__ import annotations

import math

import torch

from pretrain.model import MoEAdaptor, PWLayer


def test_output_keeps_leading_dims_and_maps_to_out_dim():
    adaptor = MoEAdaptor(in_dim=12, out_dim=5, num_experts=3)
    assert adaptor(torch.randn(2, 7, 12)).shape == (2, 7, 5)
    assert adaptor(torch.randn(4, 12)).shape == (4, 5)


def test_gates_are_a_distribution_over_experts_with_and_without_noise():
    torch.manual_seed(0)
    adaptor = MoEAdaptor(in_dim=6, out_dim=4, num_experts=5)
    with torch.no_grad():
        adaptor.w_gate.normal_()
        adaptor.w_noise.normal_()
    x = torch.randn(10, 6)
    for training in (True, False):
        adaptor.train(training)
        gates = adaptor.gates(x)
        assert gates.shape == (10, 5)
        assert (gates >= 0).all()
        torch.testing.assert_close(gates.sum(dim=-1), torch.ones(10))


def test_gates_start_uniform_because_gate_weights_are_zero():
    adaptor = MoEAdaptor(in_dim=6, out_dim=4, num_experts=4).eval()
    torch.testing.assert_close(adaptor.gates(torch.randn(3, 6)), torch.full((3, 4), 0.25))


def test_gate_noise_only_in_training():
    torch.manual_seed(0)
    # No dropout: the gate noise is then the only source of randomness.
    adaptor = MoEAdaptor(in_dim=8, out_dim=4, num_experts=3, dropout=0.0)
    x = torch.randn(5, 8)

    adaptor.eval()
    torch.testing.assert_close(adaptor(x), adaptor(x), rtol=0, atol=0)
    clean = adaptor(x)

    adaptor.train()
    first, second = adaptor(x), adaptor(x)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, clean)

    quiet = MoEAdaptor(in_dim=8, out_dim=4, num_experts=3, dropout=0.0, noise=False)
    quiet.load_state_dict(adaptor.state_dict())
    torch.testing.assert_close(quiet.train()(x), clean)


def test_expert_subtracts_learned_shift_then_projects():
    layer = PWLayer(in_dim=3, out_dim=2, dropout=0.0)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]))
    x = [1.0, 1.0, 1.0]
    # (x - b) = [0.5, 2.0, -1.0]; row 0: 0.5 + 4 - 3 = 1.5; row 1: -0.5 + 0 - 0.5 = -1.0
    torch.testing.assert_close(layer(torch.tensor([x])), torch.tensor([[1.5, -1.0]]))


def test_expert_initialisation_is_zero_shift_and_small_projection():
    torch.manual_seed(0)
    layer = PWLayer(in_dim=400, out_dim=300)
    assert torch.count_nonzero(layer.bias) == 0
    assert layer.lin.bias is None
    assert abs(layer.lin.weight.std().item() - 0.02) < 1e-3


def test_output_is_gate_weighted_sum_of_experts():
    torch.manual_seed(1)
    adaptor = MoEAdaptor(in_dim=4, out_dim=3, num_experts=2, dropout=0.0).eval()
    with torch.no_grad():
        adaptor.w_gate.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        for expert in adaptor.experts:
            expert.bias.normal_()
    x = torch.tensor([2.0, 1.0, -1.0, 0.5])

    # softmax([2, 1])
    g0 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.0))
    gates = [g0, 1.0 - g0]
    expected = [0.0, 0.0, 0.0]
    for g, expert in zip(gates, adaptor.experts, strict=True):
        w, b = expert.lin.weight.tolist(), expert.bias.tolist()
        for j in range(3):
            expected[j] += g * sum((x[i].item() - b[i]) * w[j][i] for i in range(4))

    torch.testing.assert_close(adaptor(x), torch.tensor(expected))


def test_expert_dropout_keeps_each_input_with_probability_1_minus_p_scaled_up():
    torch.manual_seed(0)
    layer = PWLayer(in_dim=4, out_dim=4, dropout=0.25).train()
    with torch.no_grad():
        layer.lin.weight.copy_(torch.eye(4))
    out = layer(torch.ones(50_000, 4))  # identity projection, zero shift: out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    torch.testing.assert_close(layer.eval()(torch.ones(3, 4)), torch.ones(3, 4))
