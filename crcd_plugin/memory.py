"""The stores behind the bank and queue sources of negatives: a memory bank (one row per training
sample) and a FIFO queue (``crcd_plugin.negatives`` wraps them as sources).

All state lives in buffers, so it follows ``.to()`` and round-trips through ``state_dict``; updates
are in-place, index-based and never wait for a value from the device.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin._checks import check_choice, check_positive_int
from crcd_plugin.kernels.relation import in_batch_candidate_index

__all__ = ["FeatureQueue", "MemoryBank", "in_batch_candidate_index", "last_occurrence"]

_logger = logging.getLogger(__name__)


def _random_unit_rows(rows: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim), dim=-1)


def skip_random_unit_rows(rows: int, dim: int, chunk: int = 1 << 20) -> None:
    """Advance the global random stream as :func:`_random_unit_rows` would, keeping nothing.

    Drawn in chunks (of a multiple of 16 values, so that the stream is the one a single draw of
    ``rows * dim`` values takes), so at most ``chunk`` values are held at a time.
    """
    total = rows * dim
    for start in range(0, total, chunk):
        torch.randn(min(chunk, total - start))


MEMORY_INITS = ("first_write", "cold")
# Uniform integers are drawn from [0, 2**62) and reduced modulo the number of rows: the bias is
# below rows / 2**62, and the draw is the same whether the range is known on the host (every row
# written) or only on the device (some rows never written), so results never depend on which
# branch ran (see MemoryBank.sample).
_DRAW_RANGE = 2**62


def last_occurrence(index: torch.Tensor, num_rows: Optional[int] = None) -> torch.Tensor:
    """Position of the last occurrence of each entry's value: ``[B]`` -> ``[B]`` (no host sync).

    With ``num_rows`` (the values are row indices in ``[0, num_rows)``), one scatter-max into a
    ``[num_rows]`` table replaces the ``[B, B]`` comparison: the same result, about 10x faster at
    ``B = 256`` on CPU (a per-step cost of every bank write).

    Example:
        >>> last_occurrence(torch.tensor([7, 2, 7]))
        tensor([2, 1, 2])
        >>> last_occurrence(torch.tensor([7, 2, 7]), num_rows=10)
        tensor([2, 1, 2])
    """
    positions = torch.arange(index.shape[0], device=index.device)
    if num_rows is not None:
        table = torch.full((num_rows,), -1, dtype=positions.dtype, device=index.device)
        return table.scatter_reduce_(0, index, positions, "amax")[index]
    return torch.where(index[:, None] == index[None, :], positions, -1).amax(1)


class MemoryBank(nn.Module):
    """Momentum memory of embeddings, one unit-norm row per training sample.

    A row's first write stores the embedding itself, ``M[i] <- normalize(v_i)``; later writes blend,
    ``M[i] <- normalize(m * M[i] + (1 - m) * v_i)``. The ``seen`` buffer marks the rows written so
    far, and a never-written row is never used as a sample: readers address rows through *slots*
    (:meth:`slots`, :meth:`sample`, :meth:`read`), where a batch row not yet written reads the
    batch's current embedding instead of its random initial content, and negatives are drawn
    uniformly among written rows (plus the batch's own unwritten rows, read the same way).

    ``init="cold"`` is the reference (CRD/CRCD code): every row counts as written from the start,
    so random rows act as samples and the first write blends 50/50 with noise. That needs many
    writes per row to wash out; in short runs it throws the relational gain away (see
    ``docs/method.md``).

    ``weight`` and ``seen`` are buffers: they follow ``.to()`` and round-trip through
    ``state_dict``. A state dict saved before ``seen`` existed loads with every row treated as
    written (those banks were cold, so that is how their rows were used). A cold bank keeps every
    row marked written, also after loading a checkpoint of a ``"first_write"`` bank.

    Args:
        num_samples: Number of rows ``N`` (the training-set size).
        dim: Embedding size ``d``.
        momentum: Weight ``m`` of the old row in the update (reference: 0.5).
        init: ``"first_write"`` (rows are right from their first write) or ``"cold"`` (random rows
            count as samples, the reference).

    Example:
        >>> bank = MemoryBank(100, 8)
        >>> index, values = torch.tensor([3, 7]), F.normalize(torch.randn(2, 8), dim=1)
        >>> bank.update(index, values)
        >>> torch.allclose(bank.gather(index), values), bank.seen[[3, 7, 5]].tolist()
        (True, [True, True, False])
    """

    weight: torch.Tensor
    seen: torch.Tensor

    def __init__(
        self, num_samples: int, dim: int, momentum: float = 0.5, init: Literal["first_write", "cold"] = "first_write"
    ) -> None:
        super().__init__()
        check_positive_int("num_samples", num_samples)
        check_choice("init", init, MEMORY_INITS)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.init = init
        # Random rows in both modes: the same random-number stream either way, and never read as a
        # sample in "first_write" mode.
        self.register_buffer("weight", _random_unit_rows(num_samples, dim))
        self.register_buffer("seen", torch.full((num_samples,), init == "cold"))
        # Host-side knowledge that every row is written, which turns slots into plain row indices.
        # It is learnt without a host sync (see _check_all_seen) and only ever makes reads cheaper:
        # results are the same with it on or off.
        self._all_seen = init == "cold"
        self._rows_since_check = 0
        self._pending_check: Optional[Tuple[torch.Tensor, Any]] = None

    @property
    def num_samples(self) -> int:
        return self.weight.shape[0]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Stored rows for ``index`` of any shape, ``[*]`` -> ``[*, d]``, written or not."""
        return self.weight[index]

    # ------------------------------------------------------------------ reading through slots
    def slots(self, index: torch.Tensor) -> torch.Tensor:
        """Slot of each batch sample: its row ``index[b]`` once written, else ``N + p`` with ``p``
        the position of the last occurrence of ``index[b]`` in the batch (whose current embedding
        :meth:`read` then returns). Equal slots mean the same sample.

        Shape:
            index ``[B]`` -> ``[B]``.
        """
        if self._all_seen:
            return index
        return torch.where(self.seen[index], index, self.num_samples + last_occurrence(index, self.num_samples))

    def sample(self, index: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        """Slots of negatives drawn uniformly, with replacement, among the written rows and the
        batch's unwritten samples (each once, however often it repeats in the batch).

        No host sync: while some row is unwritten, the ``u``-th drawable slot is looked up in the
        drawable slots listed in order (a stable sort of the flags, on the device). Once every row
        is written that is the same draw reduced to ``[0, N)``, so the negatives are identical
        whichever path runs. A cold bank draws ``torch.randint(N)``, as the reference does.

        Shape:
            index ``[B]``, ``shape`` e.g. ``(B, K)`` -> slots of ``shape``.
        """
        if self.init == "cold":  # the reference's draw, the same random stream as before the flags
            return torch.randint(self.num_samples, shape, device=self.weight.device)
        draws = torch.randint(_DRAW_RANGE, shape, device=self.weight.device)
        if self._all_seen:
            return draws % self.num_samples
        first_of_sample = last_occurrence(index, self.num_samples) == torch.arange(index.shape[0], device=index.device)
        unwritten = ~self.seen[index] & first_of_sample
        drawable = torch.cat([self.seen, unwritten])  # [N + B]; at least one True, as B >= 1
        # A stable sort lists the drawable slots first, in slot order: faster than a CDF search.
        order = torch.argsort(drawable.logical_not().to(torch.uint8), stable=True)
        return order[draws % drawable.sum()]

    def read(self, slots: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Rows for ``slots`` (from :meth:`slots` / :meth:`sample` with the same bank state):
        stored rows, or ``current[p]`` for slot ``N + p``.

        Shape:
            slots ``[*]``, current ``[B, d]`` (this step's embeddings) -> ``[*, d]``.
        """
        if self._all_seen:
            return self.weight[slots]
        current = current.to(self.weight.dtype)
        if self.num_samples <= 2 * slots.numel():
            # Copying the bank once costs less than two gathers and a where over the rows read.
            return torch.cat([self.weight, current])[slots]
        stored = slots < self.num_samples
        rows = self.weight[slots.clamp(max=self.num_samples - 1)]
        fresh = current[(slots - self.num_samples).clamp(min=0)]
        return torch.where(stored[..., None], rows, fresh)

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def update(self, index: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Write rows ``index [B]`` with ``values [B, d]``: a row's first write stores the value
        (normalised), later ones the momentum blend. Rows where ``valid [B]`` is False keep their
        old content and flag (used to keep non-finite features out of the memory).

        With repeated indices (a sample twice in a batch, or on two ranks), the last occurrence wins.
        Every duplicate writes that same row, so the result does not depend on the order in which
        the device applies the writes, and ranks stay identical.
        """
        self._write(index, values, valid, blend=True)

    @torch.no_grad()
    def write(self, index: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Like :meth:`update`, but every row is written as a first write (the value itself): for a
        warm-up pass that fills the memory before training."""
        self._write(index, values, valid, blend=False)

    def _write(self, index: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor], blend: bool) -> None:
        last = last_occurrence(index, self.num_samples)
        old = self.weight[index]
        values = values.to(old.dtype)
        new = F.normalize(values, dim=-1)
        seen = self.seen[index]
        if blend:
            blended = F.normalize(self.momentum * old + (1.0 - self.momentum) * values, dim=-1)
            new = torch.where(seen[:, None], blended, new)
        new = new[last]
        written = torch.ones_like(seen) if valid is None else valid[last]
        if valid is not None:
            new = torch.where(written[:, None], new, old)
        self.weight.index_copy_(0, index, new)
        self.seen.index_copy_(0, index, seen | written)
        self._rows_since_check += index.shape[0]
        self._check_all_seen()

    def _check_all_seen(self) -> None:
        """Learn on the host, without a sync, that every row is written.

        At most once per ``N`` rows written, ``seen.all()`` is read: directly on CPU; on an
        accelerator it is copied to the host asynchronously and read on a later write, once the
        copy has landed. Until then reads take the slot path, which gives the same results.
        """
        if self._all_seen:
            return
        if self._pending_check is not None:
            flag, event = self._pending_check
            if not event.query():
                return
            self._pending_check = None
            self._all_seen = bool(flag)
        if self._rows_since_check < self.num_samples:
            return
        self._rows_since_check = 0
        flag = self.seen.all()
        if flag.device.type == "cpu":
            self._all_seen = bool(flag)  # no device to wait for
            return
        try:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.Event(device=flag.device)
            event.record()
        except (RuntimeError, TypeError):  # a device without pinned memory or events: keep the slot path
            return
        self._pending_check = (host, event)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "seen"
        if key not in state_dict and prefix + "weight" in state_dict:
            # A checkpoint from before the seen flags: its bank was cold, every row was in use.
            _logger.info("%s: state dict without seen flags, treating every memory row as written", key)
            state_dict[key] = torch.ones_like(self.seen)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.init == "cold":
            self.seen.fill_(True)  # cold means every row is a sample, whatever the checkpoint says
        # One sync when a checkpoint is loaded, not per step.
        self._all_seen = bool(self.seen.all())
        self._rows_since_check = 0
        self._pending_check = None


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

    weight: torch.Tensor
    pointer: torch.Tensor

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

