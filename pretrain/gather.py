"""Collectives the contrastive losses need, for one process or a torch.distributed group.

The losses share negatives across ranks: each rank scores its own queries against keys from
every rank. Gathering must carry autograd, so that a key's gradient from other ranks' queries
flows back to the rank that computed it; a plain ``dist.all_gather`` drops those terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol


@dataclass(frozen=True)
class Gather:
    """The process group the losses gather over. ``Gather.single()`` is one process."""

    world_size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> Gather:
        """One process: every collective is the identity."""
        return cls()

    @classmethod
    def from_dist(cls, group: dist.ProcessGroup | None = None) -> Gather:
        """The initialised torch.distributed group (default: the world)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        group = group or dist.group.WORLD
        return cls(dist.get_world_size(group), dist.get_rank(group), group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(n, ...)``, same n on every rank -> ``(world * n, ...)`` in rank order.

        Differentiable: the gradient of each rank's slice, summed over all ranks, flows back
        to the rank that owns it.
        """
        if self.world_size == 1:
            return x
        return funcol.all_gather_single(x.contiguous(), 0, self.group)

    def all_gather_ragged(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``(n_rank, ...)``, n may differ per rank -> (``(world * n_max, ...)``, valid mask).

        Each rank's rows are padded with zeros to the largest ``n`` first; the mask
        ``(world * n_max,)`` bool marks real rows. Differentiable like :meth:`all_gather`.
        The mask is built from every rank's ``n`` (one small blocking gather), so the only
        asynchronous collective is the one whose result the caller uses.
        """
        n = x.shape[0]
        if self.world_size == 1:
            return x, torch.ones(n, dtype=torch.bool, device=x.device)
        counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([n], device=x.device), group=self.group)
        counts = torch.cat(counts)  # (world,)
        n_max = int(counts.max())
        padded = torch.cat([x, x.new_zeros((n_max - n, *x.shape[1:]))])
        valid = torch.arange(n_max, device=x.device).unsqueeze(0) < counts.unsqueeze(1)
        return self.all_gather(padded), valid.reshape(-1)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks, detached (for counts and logged metrics)."""
        x = x.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x
