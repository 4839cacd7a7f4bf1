"""Pretraining under fault and bad-input drills (issue 10).

* a rank with fewer real batches in an epoch is fed filler batches; an all-filler batch used
  to have width 1 and crash the loss (``items needs at least 2 columns``). It must run the
  collectives with zero contribution, so the ranks stay in step:

      rank 0   [1 2 3 4 . .]    rank 1   [. .]    <- all filler: lengths 0
               [5 2 6 . . .]             [. .]
               [7 8 . . . .]             [. .]

  and the two ranks together must equal one process on rank 0's rows.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.gather import Gather
from pretrain.losses import pretrain_loss
from pretrain.model import BackboneConfig, UniSRec
from sharding.stream import pad_batch

ROWS = [[1, 2, 3, 4], [5, 2, 6], [7, 8]]
TEXT_DIM = 8
NUM_ITEMS = 8


def _build() -> tuple[UniSRec, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = BackboneConfig(hidden_size=16, num_heads=2, inner_size=24, max_seq_len=6, num_experts=3)
    model = UniSRec(cfg, TEXT_DIM).eval()
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(NUM_ITEMS + 1, TEXT_DIM, generator=gen)
    table[0] = 0.0
    return model, table, table + 0.3 * torch.randn(table.shape, generator=gen)


def _real_batch() -> dict[str, torch.Tensor]:
    rows = [{"items": r, "sample_id": i, "domain_id": 0} for i, r in enumerate(ROWS)]
    return pad_batch(rows, len(ROWS))


def _loss_and_grads(batch: dict, gather: Gather) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model, *tables = _build()
    out = pretrain_loss(
        model, batch, *tables, lam=0.5, temperature=0.07, step=3, seed=5, gather=gather
    )
    out["loss"].backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return out["loss"].detach(), grads


def test_an_all_filler_batch_has_an_input_and_a_target_column():
    filler = pad_batch([], 4)
    assert filler["items"].shape == (4, 2)
    assert filler["lengths"].tolist() == [0, 0, 0, 0]


def test_an_all_filler_batch_contributes_zero_loss_on_one_process():
    loss, grads = _loss_and_grads(pad_batch([], 3), Gather.single())
    assert loss.item() == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def _worker(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        batch = _real_batch() if rank == 0 else pad_batch([], len(ROWS))
        loss, grads = _loss_and_grads(batch, Gather.from_dist())
        for t in (loss, *grads):  # what DeepSpeed does: average over ranks
            dist.all_reduce(t)
            t /= 2
        queue.put((rank, loss.item(), [g.numpy().copy() for g in grads]))
    except Exception as err:
        queue.put((rank, f"{type(err).__name__}: {err}", None))
    finally:
        dist.destroy_process_group()


def test_a_rank_on_filler_rows_stays_in_step_and_adds_nothing():
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = {
            rank: (loss, grads) for rank, loss, grads in (queue.get(timeout=120) for _ in procs)
        }
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(grads is not None for _, grads in results.values()), results

    loss, grads = _loss_and_grads(_real_batch(), Gather.single())
    for rank in range(2):
        r_loss, r_grads = results[rank]
        assert r_loss == pytest.approx(loss.item(), abs=1e-5)
        for expected, got in zip(grads, r_grads, strict=True):
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)
