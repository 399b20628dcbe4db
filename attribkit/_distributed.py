"""Reductions of fitted statistics over a ``torch.distributed`` process group.

Every estimator that fits across processes goes through one ``Reducer``
(API.md section 6): each rank streams its own shard of the data, sums its
sufficient statistics, and calls the reducer once per pass; afterwards every
rank holds the statistics of the union of the shards. Only
``torch.distributed`` collectives are used; with one process (or
``config.distributed=False``) every method is a no-op, so single-process code
pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import ComputeConfig

__all__ = ["Reducer", "reducer"]


class Reducer:
    """Collectives over the default process group, or no-ops when inactive.

    Attributes
    ----------
    active : bool
        Whether statistics are reduced (an initialised group of > 1 rank).
    rank, world_size : int
        This process's rank and the number of ranks (0 and 1 when inactive).
    """

    def __init__(self, active: bool):
        self.active = active
        self.rank = dist.get_rank() if active else 0
        self.world_size = dist.get_world_size() if active else 1

    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) each tensor in place."""
        if not self.active:
            return
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def sum_int(self, value: int, device: torch.device) -> int:
        """The sum over ranks of a Python integer (an example count, say)."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s."""
        if self.active:
            dist.broadcast(tensor, src=src)


def reducer(config: ComputeConfig, owner: str = "fit") -> Reducer:
    """The reducer ``config.distributed`` asks for at this moment.

    ``"auto"``: active when ``torch.distributed`` is available, initialised
    and has more than one rank. ``True``: a process group must be
    initialised (``RuntimeError`` otherwise). ``False``: never active.
    """
    setting = config.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if setting is True and not initialised:
        raise RuntimeError(
            f"{owner}: ComputeConfig(distributed=True) needs an initialised torch.distributed "
            "process group (torch.distributed.init_process_group, or run under torchrun). "
            "None is initialised; use distributed='auto' or False for a single process."
        )
    if setting is False or not initialised:
        return Reducer(False)
    return Reducer(dist.get_world_size() > 1)
