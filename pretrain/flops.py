"""Matrix-multiply FLOPs of UniSRec's work, counted from shapes (for roofline benchmarks).

A FLOP is a multiply or an add (a ``(m, k) @ (k, n)`` product is ``2 m k n``). Only matrix
products are counted: the adaptor's experts and gates, the Transformer's projections,
attention and feed-forward, and the scoring of queries against items. Elementwise work
(dropout, LayerNorm, softmax, normalisation) is left out; it is what keeps a run below the
matmul peak. Backward passes count the products autograd runs: weight gradients always,
input gradients only where the input needs one (text vectors never do).
``tests/test_flops.py`` checks these counts against ``torch.utils.flop_counter``.

Shapes: n items through the adaptor (D -> H, G experts), b sequences of t positions
(inner size I, L layers), p queries scored against n items.
"""

from __future__ import annotations

from typing import NamedTuple

from pretrain.model import BackboneConfig


class Gemm(NamedTuple):
    """``count`` products of ``(m, k) @ (k, n)``."""

    m: int
    k: int
    n: int
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def total_flops(gemms: list[Gemm]) -> int:
    return sum(g.flops for g in gemms)


def adaptor_gemms(
    n: int, text_dim: int, cfg: BackboneConfig, *, training: bool, backward: bool, calls: int = 1
) -> list[Gemm]:
    """The MoE adaptor over ``n`` text vectors in ``calls`` calls: G experts ``(n, D) @ (D, H)``
    and their shifts ``(1, D) @ (D, H)`` once per call, the gate (and, when training, the noise
    gate) ``(n, D) @ (D, G)``. Backward: the same products again for the weight gradients,
    plus the shifts' own gradients; no gradient for the frozen text vectors."""
    g, h = cfg.num_experts, cfg.hidden_size
    forward = [
        Gemm(n, text_dim, h, g),
        Gemm(1, text_dim, h, g * calls),
        Gemm(n, text_dim, g, 2 if training else 1),
    ]
    if not backward:
        return forward
    return forward * 2 + [Gemm(1, h, text_dim, g * calls)]


def encoder_gemms(b: int, t: int, cfg: BackboneConfig, *, backward: bool) -> list[Gemm]:
    """The causal Transformer over ``(b, t)`` positions (padding included: it is computed).

    Per layer: QKV ``(bt, H) @ (H, 3H)``, attention (:func:`attention_gemms`), output
    ``(bt, H) @ (H, H)``, feed-forward up and down. Backward: twice the forward (input and
    weight gradients; the encoder's input, item vectors, needs a gradient in every training
    use).
    """
    h, m = cfg.hidden_size, b * t
    layer = [
        Gemm(m, h, 3 * h),
        Gemm(m, h, h),
        Gemm(m, h, cfg.inner_size),
        Gemm(m, cfg.inner_size, h),
    ]
    forward = [Gemm(*gemm[:3], gemm.count * cfg.num_layers) for gemm in layer]
    return forward * (3 if backward else 1) + attention_gemms(b, t, cfg, backward=backward)


def attention_gemms(b: int, t: int, cfg: BackboneConfig, *, backward: bool) -> list[Gemm]:
    """``q k^T`` and ``p v`` over all ``t x t`` pairs (as the kernels compute them, causal or
    not), summed over heads, per layer; backward twice that."""
    return [Gemm(b * t, cfg.hidden_size, t, 2 * cfg.num_layers * (3 if backward else 1))]


def score_gemms(p: int, n: int, hidden: int, *, backward: bool) -> list[Gemm]:
    """``(p, H) @ (H, n)`` logits; backward: gradients of both queries and item vectors."""
    return [Gemm(p, hidden, n, 3 if backward else 1)]
