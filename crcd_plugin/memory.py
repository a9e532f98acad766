"""Where anchors and negatives come from: a memory bank (one row per training sample) or a FIFO queue.

All state lives in buffers, so it follows ``.to()`` and round-trips through ``state_dict``; updates
are in-place, index-based and never read a value back to the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin._checks import check_positive_int


def _random_unit_rows(rows: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim), dim=-1)


class MemoryBank(nn.Module):
    """Momentum memory of embeddings, one unit-norm row per training sample.

    ``update`` sets ``M[i] <- normalize(m * M[i] + (1 - m) * v_i)`` for the batch's dataset
    indices. Rows start as random unit vectors.

    Args:
        num_samples: Number of rows ``N`` (the training-set size).
        dim: Embedding size ``d``.
        momentum: Weight ``m`` of the old row in the update (reference: 0.5).

    Example:
        >>> bank = MemoryBank(100, 8)
        >>> bank.update(torch.tensor([3, 7]), torch.randn(2, 8))
        >>> bank.gather(torch.tensor([[3, 7]])).shape
        torch.Size([1, 2, 8])
    """

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        check_positive_int("num_samples", num_samples)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("weight", _random_unit_rows(num_samples, dim))

    @property
    def num_samples(self) -> int:
        return self.weight.shape[0]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows for ``index`` of any shape: ``[*]`` -> ``[*, d]``."""
        return self.weight[index]

    @torch.no_grad()
    def update(self, index: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Momentum update of rows ``index [B]`` with ``values [B, d]``; rows where ``valid [B]`` is
        False keep their old content (used to keep non-finite features out of the memory).

        With repeated indices (a sample twice in a batch, or on two ranks), the last occurrence wins.
        Every duplicate writes that same row, so the result does not depend on the order in which
        the device applies the writes, and ranks stay identical.
        """
        positions = torch.arange(index.shape[0], device=index.device)
        last = torch.where(index[:, None] == index[None, :], positions, -1).amax(1)  # [B]
        old = self.weight[index]
        new = F.normalize(self.momentum * old + (1.0 - self.momentum) * values.to(old.dtype), dim=-1)[last]
        if valid is not None:
            new = torch.where(valid[last][:, None], new, old)
        self.weight.index_copy_(0, index, new)


class FeatureQueue(nn.Module):
    """FIFO queue of the most recent ``size`` embeddings, for negatives that need no dataset index.

    Starts filled with random unit vectors; ``enqueue`` overwrites the oldest rows and wraps around.

    Args:
        size: Number of rows ``Q``.
        dim: Embedding size ``d``.

    Example:
        >>> queue = FeatureQueue(4, 8)
        >>> queue.enqueue(torch.randn(3, 8)); queue.enqueue(torch.randn(3, 8))
        >>> int(queue.pointer)
        2
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        check_positive_int("queue_size", size)
        self.register_buffer("weight", _random_unit_rows(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def enqueue(self, values: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Writes ``values [B, d]`` (``B <= Q``) over the oldest rows; rows where ``valid [B]`` is
        False leave the slot's old content in place (the pointer still advances)."""
        batch = values.shape[0]
        if batch > self.size:
            raise ValueError(f"batch of {batch} does not fit a queue of queue_size={self.size}")
        slots = (self.pointer + torch.arange(batch, device=self.weight.device)) % self.size
        new = values.to(self.weight.dtype)
        if valid is not None:
            new = torch.where(valid[:, None], new, self.weight[slots])
        self.weight.index_copy_(0, slots, new)
        self.pointer.copy_((self.pointer + batch) % self.size)


def in_batch_candidate_index(batch: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Candidate positions for in-batch negatives: row ``i`` is ``[i, 0, .., i-1, i+1, .., B-1]``.

    Shape:
        -> ``[B, B]`` (index 0 = the positive, then the ``B - 1`` other samples).
    """
    rows = torch.arange(batch, device=device)[:, None]
    others = torch.arange(batch - 1, device=device)[None, :]
    return torch.cat([rows, others + (others >= rows).long()], dim=1)
