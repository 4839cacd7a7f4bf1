"""Parametric-whitening mixture-of-experts adaptor: frozen text vectors -> item vectors.

UniSRec never trains the text encoder. Each item's text is encoded once into a vector of
``in_dim`` (e.g. 384 for MiniLM); this adaptor maps it into the recommender's space of
``out_dim``. Each expert whitens with a learned shift and a projection; a gate chosen from the
text vector itself mixes the experts, so items from different domains can lean on different
experts. Only this module is tuned when adapting to a new domain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PWLayer(nn.Module):
    """One expert: ``(dropout(x) - b) @ W``, a learned whitening of the text vector."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(in_dim))
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(self.lin.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., in_dim)`` float32 -> ``(..., out_dim)`` float32."""
        return self.lin(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
    """``sum_g gate_g(x) * expert_g(x)`` over ``num_experts`` :class:`PWLayer` experts.

    Gates are ``softmax(x W_gate + noise)``; the noise, ``randn * (softplus(x W_noise) + 0.01)``,
    is added only while training (and only if ``noise``), so evaluation is deterministic. Both
    gate matrices start at zero: every expert begins with the same weight 1/G.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_experts: int = 8,
        dropout: float = 0.2,
        noise: bool = True,
    ):
        super().__init__()
        self.noise = noise
        self.experts = nn.ModuleList(PWLayer(in_dim, out_dim, dropout) for _ in range(num_experts))
        self.w_gate = nn.Parameter(torch.zeros(in_dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(in_dim, num_experts))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., in_dim)`` -> expert weights ``(..., G)`` float32, summing to 1."""
        logits = x @ self.w_gate
        if self.training and self.noise:
            std = F.softplus(x @ self.w_noise) + 1e-2
            logits = logits + torch.randn_like(logits) * std
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., in_dim)`` float32 text vectors -> ``(..., out_dim)`` float32."""
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (..., G, out)
        return (self.gates(x).unsqueeze(-1) * outputs).sum(dim=-2)
