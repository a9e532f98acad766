"""A memory bank split across ranks, for datasets whose bank would not fit on every GPU twice.

ImageNet's bank is 1.28M x 128 fp32 = 655 MB per side on every rank when replicated; sharded, each
of ``W`` ranks holds ``1/W`` of the rows and fetches the rows it reads from their owners.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, cast

import torch
from torch import nn

from crcd_plugin._checks import check_positive_int
from crcd_plugin.distributed import fetch_rows, rank, world_size
from crcd_plugin.memory import MemoryBank

__all__ = ["ShardedMemoryBank"]


class ShardedMemoryBank(nn.Module):
    """:class:`~crcd_plugin.memory.MemoryBank` whose rows are split across the ranks of the job.

    Rank ``r`` owns the contiguous rows ``[r * R, (r + 1) * R)``, ``R = ceil(N / W)``, held as an
    ordinary ``MemoryBank`` (``self.shard``), so the update rule is the replicated bank's, row for
    row. ``gather`` is a collective that fetches rows from their owners (exact values, see
    :func:`~crcd_plugin.distributed.fetch_rows`); ``update`` takes the rows of *all* ranks (as
    ``CRCDLoss`` gathers them) and each rank writes the ones it owns. For the same draws the loss
    and the stored rows equal the replicated bank's. Not distributed, it is one shard holding all
    rows and behaves as ``MemoryBank``.

    Every rank must call ``gather`` and ``update`` in the same order (``CRCDLoss`` does). Build it
    after ``torch.distributed.init_process_group``: the split is fixed at construction. Its
    ``state_dict`` holds this rank's shard only: save it from every rank and resume with the same
    world size; a replicated bank's ``weight`` (all ``N`` rows) also loads, each rank keeping its
    slice. Costs: each ``gather`` and ``update`` reads a few small counts to the host (a device
    sync), and a fetch moves each requested row across the network once.

    Args:
        num_samples: Number of rows ``N`` (the training-set size), at least the world size.
        dim: Embedding size ``d``.
        momentum: Weight ``m`` of the old row in the update (reference: 0.5).

    Example:
        >>> bank = ShardedMemoryBank(100, 8)   # not distributed: one shard of 100 rows
        >>> bank.update(torch.tensor([3, 7]), torch.randn(2, 8))
        >>> bank.gather(torch.tensor([[3, 7]])).shape
        torch.Size([1, 2, 8])
    """

    # Rows differ between ranks by design: broadcast_state must leave them alone.
    rank_local_state = True

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        check_positive_int("num_samples", num_samples)
        self.world_size, self.rank = world_size(), rank()
        if num_samples < self.world_size:
            raise ValueError(f"a sharded bank needs num_samples >= world size {self.world_size}, got {num_samples}")
        self.total_rows = num_samples
        self.rows_per_rank = math.ceil(num_samples / self.world_size)
        self.start = min(self.rank * self.rows_per_rank, num_samples)
        self.stop = min(self.start + self.rows_per_rank, num_samples)
        if self.stop == self.start:
            raise ValueError(
                f"num_samples={num_samples} leaves rank {self.rank} of {self.world_size} without rows; "
                "use the replicated bank for so small a dataset"
            )
        # The reference's cold rows: the first-write slots of MemoryBank need every rank's flags.
        self.shard = MemoryBank(self.stop - self.start, dim, momentum, init="cold")

    @property
    def num_samples(self) -> int:
        return self.total_rows

    @property
    def momentum(self) -> float:
        return self.shard.momentum

    def _check_world(self) -> None:
        if world_size() != self.world_size:
            raise RuntimeError(
                f"this ShardedMemoryBank was split for world size {self.world_size} but the job now has "
                f"{world_size()} ranks; build it after torch.distributed.init_process_group"
            )

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows for global ``index`` of any shape: ``[*]`` -> ``[*, d]`` (collective)."""
        self._check_world()
        return fetch_rows(cast(torch.Tensor, self.shard.weight), index, self.rows_per_rank)

    # The slot interface of MemoryBank, for a cold bank: slots are rows, draws uniform over all rows.
    def slots(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def sample(self, index: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        return torch.randint(self.total_rows, shape, device=index.device)

    def read(self, slots: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return self.gather(slots)

    @torch.no_grad()
    def update(self, index: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Momentum update of global rows ``index [B]`` with ``values [B, d]``, as ``MemoryBank.update``.

        ``index`` holds every rank's rows (the same on all ranks); each rank writes those it owns,
        in batch order, so duplicates resolve as in the replicated bank (the last one wins).
        """
        self._check_world()
        owned = torch.nonzero((index >= self.start) & (index < self.stop)).squeeze(1)  # batch order
        if owned.numel() == 0:
            return
        self.shard.update(index[owned] - self.start, values[owned], None if valid is None else valid[owned])

    @torch.no_grad()
    def write(self, index: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Like :meth:`update`, every row written as a first write (``MemoryBank.write``; warm-up)."""
        self._check_world()
        owned = torch.nonzero((index >= self.start) & (index < self.stop)).squeeze(1)  # batch order
        if owned.numel() == 0:
            return
        self.shard.write(index[owned] - self.start, values[owned], None if valid is None else valid[owned])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A replicated bank's checkpoint (``weight`` with all N rows): keep this rank's slice.
        seen = state_dict.pop(prefix + "seen", None)
        if seen is not None and seen.shape == (self.total_rows,):
            state_dict[prefix + "shard.seen"] = seen[self.start : self.stop]
        elif seen is not None:
            state_dict[prefix + "seen"] = seen
        full = state_dict.pop(prefix + "weight", None)
        if full is not None and full.dim() == 2 and full.shape[0] == self.total_rows:
            state_dict[prefix + "shard.weight"] = full[self.start : self.stop]
        elif full is not None:
            state_dict[prefix + "weight"] = full  # reported as unexpected by load_state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.total_rows}, rows={self.start}..{self.stop - 1} on rank {self.rank} "
            f"of {self.world_size}"
        )
