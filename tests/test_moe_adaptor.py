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


# ---- ablation switches (the paper's "w/o PW" and "w/o MoE") -------------------------------


def test_without_whitening_an_expert_has_no_shift_and_computes_x_at_w():
    layer = PWLayer(in_dim=3, out_dim=2, dropout=0.0, whitening=False)
    assert [name for name, _ in layer.named_parameters()] == ["lin.weight"]
    x = torch.tensor([[1.0, 2.0, -1.0]])
    w = layer.lin.weight.detach()  # (out, in)
    expected = [[sum(x[0, i].item() * w[o, i].item() for i in range(3)) for o in range(2)]]
    torch.testing.assert_close(layer(x), torch.tensor(expected))


def test_unisrec_config_whitening_false_builds_shiftless_experts():
    from pretrain.model import BackboneConfig, UniSRec

    cfg = BackboneConfig(hidden_size=8, num_heads=2, inner_size=8, num_experts=3, whitening=False)
    names = [n for n, _ in UniSRec(cfg, text_dim=6).adaptor.named_parameters()]
    assert not any(n.endswith(".bias") for n in names)
    with_pw = UniSRec(BackboneConfig(hidden_size=8, num_heads=2, inner_size=8, num_experts=3), 6)
    assert sum(n.endswith(".bias") for n, _ in with_pw.adaptor.named_parameters()) == 3


def test_one_expert_has_no_gate_and_is_that_expert_even_in_training():
    torch.manual_seed(0)
    adaptor = MoEAdaptor(in_dim=6, out_dim=4, num_experts=1, dropout=0.0).train()
    assert adaptor.w_gate is None and adaptor.w_noise is None
    assert {n for n, _ in adaptor.named_parameters()} == {"experts.0.bias", "experts.0.lin.weight"}
    with torch.no_grad():
        adaptor.experts[0].bias.normal_()
    x = torch.randn(5, 6)
    expected = (x - adaptor.experts[0].bias) @ adaptor.experts[0].lin.weight.T
    torch.testing.assert_close(adaptor(x), expected)
    torch.testing.assert_close(adaptor.gates(x), torch.ones(5, 1))


def test_zero_experts_is_a_config_error():
    import pytest

    from pretrain.model import BackboneConfig
    from unisrec.config import from_dict
    from unisrec.errors import ConfigError

    with pytest.raises(ConfigError, match="num_experts"):
        from_dict(BackboneConfig, {"num_experts": 0})


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
