"""The held-out pretraining loss: the training objective, in eval mode, on held-out users.

The shard job writes each pretraining domain's held-out users to ``heldout-<domain>.tar``
(``shards.heldout_fraction``). Every rank streams its part of each domain's held-out shard
(:class:`sharding.stream.ShardStream`, filler batches keep the ranks in step) and computes
:func:`pretrain.losses.pretrain_loss` with negatives gathered from all ranks, exactly as in
training but without dropout and with a fixed augmentation seed, so two evaluations of the
same weights give the same number. A domain's batches hold only that domain's sequences
(in-domain negatives).

    heldout_loss_<domain>   mean over the domain's next-item targets of L_si (+ lam * L_ss)
    heldout_loss            the same mean over every domain's targets together
"""

from __future__ import annotations

import torch

from pretrain.config import PretrainConfig
from pretrain.gather import Gather

HELDOUT_AUGMENT_STEP = -1  # a step number training never uses: fixed augmentation draws


def heldout_losses(
    engine,
    heldout: dict,
    text_table: torch.Tensor,
    worddrop_table: torch.Tensor,
    cfg: PretrainConfig,
    gather: Gather,
    device: torch.device,
) -> dict[str, float]:
    """``{"heldout_loss": x, "heldout_loss_<domain>": y, ...}`` for ``heldout``
    (``{domain: [ShardSpec]}``, from :meth:`sharding.dataset.Dataset.heldout_specs`); empty
    when nothing is held out. Runs on every rank (collectives); leaves the engine in eval
    mode (the caller switches back to train)."""
    from pretrain.losses import pretrain_loss
    from sharding.stream import ShardStream

    engine.eval()
    out: dict[str, float] = {}
    total_loss, total_targets = 0.0, 0
    with torch.no_grad():
        for domain in sorted(heldout):
            stream = ShardStream(
                heldout[domain],
                batch_size=cfg.data.batch_size,
                rank=gather.rank,
                world_size=gather.world_size,
                num_workers=0,
                seed=cfg.seed,
                shuffle_buffer=1,  # file order: the same batches at every evaluation
            )
            loss_sum, targets = 0.0, 0
            for batch in stream.epoch(0):
                batch = {k: v.to(device) for k, v in batch.items()}
                result = pretrain_loss(
                    engine,
                    batch,
                    text_table,
                    worddrop_table,
                    cfg.loss,
                    step=HELDOUT_AUGMENT_STEP,
                    seed=cfg.seed,
                    gather=gather,
                )
                batch_loss = result["seq_item"] + cfg.loss.lam * result["seq_seq"]
                loss_sum += batch_loss * result["queries"]
                targets += result["queries"]
            if targets:
                out[f"heldout_loss_{domain}"] = loss_sum / targets
                total_loss, total_targets = total_loss + loss_sum, total_targets + targets
    if total_targets:
        out["heldout_loss"] = total_loss / total_targets
    return out
