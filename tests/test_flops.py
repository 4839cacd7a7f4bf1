"""pretrain/flops.py against torch's own FLOP counter on a tiny UniSRec.

torch's counter sees attention only on the math path (taken with attention dropout while
training); the CPU flash-attention kernel used in evaluation goes uncounted by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from adaptors.evaluate import catalogue_vectors_in_blocks
from adaptors.finetune import next_item_loss
from pretrain.flops import (
    adaptor_gemms,
    attention_gemms,
    encoder_gemms,
    score_gemms,
    total_flops,
)
from pretrain.model import BackboneConfig, UniSRec

CFG = BackboneConfig(hidden_size=8, inner_size=12, num_heads=2, num_experts=3, max_seq_len=6)
N, D = 20, 5


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_a_training_step_counts_like_torch_flop_counter():
    torch.manual_seed(0)
    cfg = BackboneConfig(**{**CFG.__dict__, "dropout": 0.5, "attn_dropout": 0.5})
    model = UniSRec(cfg, text_dim=D).train()
    table = F.pad(torch.randn(N, D), (0, 0, 1, 0))
    inputs = torch.randint(1, N + 1, (4, 5))
    targets = torch.randint(1, N + 1, (4, 5))
    targets[0, 3:] = 0  # two positions without a target
    p = int((targets > 0).sum())

    def step():
        next_item_loss(model, inputs, targets, table, 0.07)[0].backward()

    expected = total_flops(
        adaptor_gemms(N, D, cfg, training=True, backward=True)
        + encoder_gemms(4, 5, cfg, backward=True)
        + score_gemms(p, N, cfg.hidden_size, backward=True)
    )
    assert _counted(step) == expected


def test_evaluation_counts_like_torch_flop_counter():
    torch.manual_seed(0)
    model = UniSRec(CFG, text_dim=D).eval()
    table = F.pad(torch.randn(N, D), (0, 0, 1, 0))
    seqs = torch.randint(1, N + 1, (3, 4))

    def evaluate():
        with torch.no_grad():
            items = catalogue_vectors_in_blocks(model, table, item_block=7)  # 3 calls
            model.score(model.encode(seqs, items)[:, -1], items[1:], 0.07)

    expected = total_flops(
        adaptor_gemms(N, D, CFG, training=False, backward=False, calls=3)
        + encoder_gemms(3, 4, CFG, backward=False)
        + score_gemms(3, N, CFG.hidden_size, backward=False)
    )
    unseen = total_flops(attention_gemms(3, 4, CFG, backward=False))
    assert _counted(evaluate) == expected - unseen
