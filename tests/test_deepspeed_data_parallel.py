"""Under real DeepSpeed ZeRO-2 and ZeRO-3 on two gloo ranks, one optimizer step on a split
global batch moves every parameter exactly as one process's gradient on the whole batch says.

ZeRO-3 partitions the parameters themselves: the loss must reach them only through module
calls (DeepSpeed gathers a module's parameters in its forward hook), never by reading a
``.weight`` directly.

The model, batch and loss are those of ``test_gathered_negatives.py``; the optimizer is SGD
with lr 1, so the parameter update *is* the (rank-averaged) gradient.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_gathered_negatives import (
    ROWS,
    WORLD,
    batch_of,
    build,
    free_port,
    loss_config,
    one_process,
)

from pretrain.gather import Gather
from pretrain.losses import pretrain_loss

pytestmark = pytest.mark.slow
ITEM_DROP = 1.0  # force the item-drop view so the seq-seq term is exercised


def zero_worker(stage: int, rank: int, port: int, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    model, *tables = build()
    before = [p.detach().clone() for p in model.parameters()]
    half = len(ROWS) // WORLD
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        config={
            "train_micro_batch_size_per_gpu": half,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # plain SGD: the update is the gradient
            "gradient_clipping": 0.0,  # DeepSpeed's default (1.0) would rescale it
        },
    )
    engine.eval()  # no dropout or gate noise, so both ranks compute exact values
    out = pretrain_loss(
        engine,
        batch_of(slice(rank * half, (rank + 1) * half)),
        *tables,
        loss_config(ITEM_DROP),
        step=4,
        seed=9,
        gather=Gather.from_dist(),
    )
    engine.backward(out["loss"])
    engine.step()
    params = list(engine.module.parameters())
    # Under ZeRO-3 each rank holds a slice of every parameter: gather them to read them.
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        update = [(b - p.detach()).numpy().copy() for b, p in zip(before, params, strict=True)]
    queue.put((rank, out["seq_item"], out["seq_seq"], update))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_step_on_two_ranks_equals_one_process_gradient(stage):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=zero_worker, args=(stage, rank, port, queue)) for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    results = {rank: rest for rank, *rest in (queue.get(timeout=240) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    _, metrics, grads = one_process(ITEM_DROP)
    assert any(np.abs(g).max() > 1e-3 for g in grads)
    for rank in range(WORLD):
        seq_item, seq_seq, update = results[rank]
        assert seq_item == pytest.approx(metrics["seq_item"], abs=1e-5)
        assert seq_seq == pytest.approx(metrics["seq_seq"], abs=1e-5)
        for expected, got in zip(grads, update, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
