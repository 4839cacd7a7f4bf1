"""Two gloo processes sharing negatives match one process on the same global batch.

The global batch, split by rows between two ranks (``.`` = padding):

    rank 0   [1 2 3 4 . .]    rank 1   [9 10 2 11 12 .]
             [5 2 6 . . .]             [13 9 . . . .]
             [7 8 . . . .]             [. . . . . .]    <- filler row

Rank 0 holds 8 distinct items, rank 1 holds 6 (a ragged gather); item 2 is on both ranks and
must be one candidate, not two. The first row of each rank belongs to one user (sibling
windows): its items are not negatives for the other rank's row either. After DeepSpeed-style gradient averaging, loss and every
gradient must equal the single-process ones.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.config import LossConfig
from pretrain.gather import Gather
from pretrain.losses import pretrain_loss
from pretrain.model import BackboneConfig, UniSRec

ROWS = [[1, 2, 3, 4], [5, 2, 6], [7, 8], [9, 10, 2, 11, 12], [13, 9], []]
USERS = [0, 1, 2, 0, 3, -1]
WORLD = 2
TEXT_DIM = 8
NUM_ITEMS = 13
MODES = {"item-drop": 1.0, "word-drop": 0.0}  # item_drop_prob forcing each augmentation


class DetachedGather(Gather):
    """A plain ``dist.all_gather`` with this rank's slice put back: no cross-rank gradient."""

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.detach().contiguous(), group=self.group)
        parts[self.rank] = x
        return torch.cat(parts)


def build() -> tuple[UniSRec, torch.Tensor, torch.Tensor]:
    """The same model and text tables in every process."""
    torch.manual_seed(0)
    cfg = BackboneConfig(hidden_size=16, num_heads=2, inner_size=24, max_seq_len=6, num_experts=3)
    model = UniSRec(cfg, TEXT_DIM).eval()  # no dropout or gate noise; gradients still on
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(NUM_ITEMS + 1, TEXT_DIM, generator=gen)
    table[0] = 0.0
    return model, table, table + 0.3 * torch.randn(table.shape, generator=gen)


def batch_of(rows: slice) -> dict[str, torch.Tensor]:
    picked = ROWS[rows]
    return {
        "items": torch.tensor([r + [0] * (6 - len(r)) for r in picked]),
        "lengths": torch.tensor([len(r) for r in picked]),
        "sample_id": torch.arange(len(ROWS))[rows],
        "user": torch.tensor(USERS)[rows],
    }


def loss_config(item_drop_prob: float) -> LossConfig:
    return LossConfig(temperature=0.07, lam=0.5, item_drop_batch_prob=item_drop_prob)


def loss_and_grads(
    model: UniSRec, batch: dict, tables: tuple, gather: Gather, item_drop_prob: float
) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    model.zero_grad()
    out = pretrain_loss(
        model, batch, *tables, loss_config(item_drop_prob), step=4, seed=9, gather=gather
    )
    out["loss"].backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    metrics = {k: out[k] for k in ("seq_item", "seq_seq", "queries")}
    return out["loss"].detach(), metrics, grads


def unwaited_collectives() -> int:
    """Asynchronous (functional) collectives started in this process and never waited for."""
    return torch._C._distributed_c10d._get_work_registry_size()


def worker(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model, *tables = build()
        half = len(ROWS) // WORLD
        batch = batch_of(slice(rank * half, (rank + 1) * half))
        results = {}
        for gather_cls in (Gather, DetachedGather):
            for mode, p in MODES.items():
                loss, metrics, grads = loss_and_grads(
                    model, batch, tables, gather_cls.from_dist(), p
                )
                results["unwaited", gather_cls.__name__, mode] = unwaited_collectives()
                # What DDP/DeepSpeed do: average over ranks.
                for t in (loss, *grads):
                    dist.all_reduce(t)
                    t /= WORLD
                results[gather_cls.__name__, mode] = (
                    loss.item(),
                    metrics,
                    [g.numpy().copy() for g in grads],
                )
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results() -> dict:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, queue)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def one_process(item_drop_prob: float) -> tuple[float, dict, list[np.ndarray]]:
    model, *tables = build()
    loss, metrics, grads = loss_and_grads(
        model, batch_of(slice(None)), tables, Gather.single(), item_drop_prob
    )
    return loss.item(), metrics, [g.numpy().copy() for g in grads]


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_match_one_process(two_rank_results, mode):
    loss, metrics, grads = one_process(MODES[mode])
    assert metrics["queries"] == 3 + 2 + 1 + 4 + 1
    for rank in range(WORLD):
        r_loss, r_metrics, r_grads = two_rank_results[rank]["Gather", mode]
        assert r_loss == pytest.approx(loss, abs=1e-5)
        assert r_metrics["queries"] == metrics["queries"]
        assert r_metrics["seq_item"] == pytest.approx(metrics["seq_item"], abs=1e-5)
        assert r_metrics["seq_seq"] == pytest.approx(metrics["seq_seq"], abs=1e-5)
        assert any(np.abs(g).max() > 1e-3 for g in grads)
        for expected, got in zip(grads, r_grads, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gather_without_autograd_gets_gradients_wrong(two_rank_results, mode):
    loss, _, grads = one_process(MODES[mode])
    d_loss, _, d_grads = two_rank_results[0]["DetachedGather", mode]
    assert d_loss == pytest.approx(loss, abs=1e-5)  # the forward pass is the same...
    worst = max(np.abs(a - b).max() for a, b in zip(grads, d_grads, strict=True))
    assert worst > 1e-3  # ...but the cross-rank gradient terms are missing


@pytest.mark.parametrize("mode", MODES)
def test_the_losses_wait_for_every_collective_they_start(two_rank_results, mode):
    """A gathered tensor nobody reads is a collective nobody waits for: its output stays in
    torch's work registry while gloo may still write it. After a loss and its backward pass
    nothing may be left there."""
    for rank in range(WORLD):
        assert two_rank_results[rank]["unwaited", "Gather", mode] == 0
