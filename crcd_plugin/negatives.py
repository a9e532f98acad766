"""Sources of negatives: where one side of ``CRCDLoss`` takes its anchors, positives and candidates.

A source is an ``nn.Module`` holding its own buffers. Each step it turns the other network's
current embeddings into one :class:`Candidates` record, and after the step it writes that
network's rows (gathered from every rank under ``torch.distributed``). ``CRCDLoss`` holds one
source per side and never looks inside: a new source of negatives is one class.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import torch
from torch import nn

from crcd_plugin._checks import check_positive_int
from crcd_plugin.config import DEFAULT_BANK_NEGATIVES, REFERENCE_NUM_NEGATIVES, RelationConfig
from crcd_plugin.distributed import gather_rows, world_size
from crcd_plugin.memory import FeatureQueue, MemoryBank, skip_random_unit_rows
from crcd_plugin.sharded_memory import ShardedMemoryBank

__all__ = ["Bank", "Candidates", "InBatch", "NegativeSource", "Queue", "ShardedBank", "Step", "build_sources"]


@dataclass
class Step:
    """What ``CRCDLoss`` tells a source about the current step.

    Args:
        index: ``[B]`` int64 dataset indices, or None (sources with ``needs_index`` get them).
        anchor_positions: ``[A]`` batch positions of this step's anchors.
        mask_self_anchor: Also return the masks of entries whose candidate is the anchor's own sample.
        current_rows: The batch's own rows must be the given embeddings (which then carry the
            gradient that trains the other network's embedding head), never stored rows.
        draw: What :meth:`NegativeSource.prepare` drew for the step, shared by both sides.
    """

    index: Optional[torch.Tensor]
    anchor_positions: torch.Tensor
    mask_self_anchor: bool = False
    current_rows: bool = False
    draw: Any = None


@dataclass
class Candidates:
    """One side's anchors and candidates for one step, in one of three positive layouts.

    - per sample: ``candidates [B, K+1, d]``, the positive first; ``mask [B, A, K+1]``.
    - shared, in-batch: ``candidates [M, d]`` with ``M = B`` and sample ``b``'s positive candidate
      ``b``; ``positives`` None; ``mask [A, M]``.
    - shared, positives apart: ``candidates [M, d]`` are negatives of every sample, ``positives
      [B, d]``; ``mask [A, M]`` and ``positive_mask [B, A]`` (rows dropped).

    Masks are ``True`` where an entry is left out (``self_anchor="mask"``); None keeps everything.
    """

    anchors: Optional[torch.Tensor]
    candidates: torch.Tensor
    positives: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    positive_mask: Optional[torch.Tensor] = None


class NegativeSource(nn.Module):
    """Base of the sources of negatives: override :meth:`candidates`, and :meth:`write_rows` for a
    source that keeps rows.

    Attributes:
        kind: The source's name (``CRCDLoss.negatives``).
        noise_size: NCE's ``N``, the size of the set negatives are drawn from (noise ``Pn = 1/N``).
        needs_index: ``forward`` must be given the dataset ``index``.
        index_bound: Indices must lie in ``[0, index_bound)`` (checked where checks are on).
        stores_rows: The source keeps rows, so ``CRCDLoss.fill_memory`` can warm it up.
        min_batch: The fewest samples a batch may have.
    """

    kind: str = "custom"
    noise_size: int = 1
    needs_index: bool = False
    index_bound: Optional[int] = None
    stores_rows: bool = False
    min_batch: int = 1

    def prepare(self, step: Step) -> Step:
        """Draws shared by both sides, made once per step on the student side's source."""
        return step

    def candidates(self, embeddings: torch.Tensor, step: Step) -> Candidates:
        """Anchors and candidates for the side scored against ``embeddings [B, d]`` (the other
        network's current embeddings, detached unless ``step.current_rows``)."""
        raise NotImplementedError

    def check_batch(self, batch: int) -> None:
        """Raise ``ValueError`` if a batch of ``batch`` samples per rank does not fit the source."""

    @torch.no_grad()
    def write_rows(
        self, embeddings: torch.Tensor, index: Optional[torch.Tensor], valid: torch.Tensor, first_write: bool
    ) -> None:
        """Store this step's rows ``[B, d]`` (``valid [B]`` False: leave that row's slot alone);
        ``first_write``: a warm-up write of the row itself. Sources without state do nothing."""


class InBatch(NegativeSource):
    """The other samples of the batch: anchors, positive and negatives are the current
    embeddings (``K = B - 1``); no state.

    Example:
        >>> rows = torch.randn(4, 8)
        >>> InBatch().candidates(rows, Step(None, torch.arange(2))).candidates.shape
        torch.Size([4, 8])
    """

    kind, min_batch = "batch", 2

    def candidates(self, embeddings: torch.Tensor, step: Step) -> Candidates:
        mask = None
        if step.mask_self_anchor:  # candidate m is sample m: one [A, B] mask for the batch
            samples = torch.arange(embeddings.shape[0], device=embeddings.device)
            mask = step.anchor_positions[:, None] == samples[None, :]
        return Candidates(embeddings[step.anchor_positions], embeddings, mask=mask)


class Queue(FeatureQueue, NegativeSource):
    """The last ``size`` embeddings (:class:`~crcd_plugin.memory.FeatureQueue`): anchors and
    positives are the current embeddings, the ``K`` negatives queue rows drawn uniformly (all of
    them when ``K = Q``), shared by the batch.

    Example:
        >>> queue = Queue(16, 8, num_negatives=5)
        >>> queue.candidates(torch.randn(4, 8), Step(None, torch.arange(4))).candidates.shape
        torch.Size([5, 8])
    """

    kind, stores_rows = "queue", True

    def __init__(self, size: int, dim: int, num_negatives: Optional[int] = None) -> None:
        super().__init__(size, dim)
        self.num_negatives = min(size, REFERENCE_NUM_NEGATIVES) if num_negatives is None else num_negatives
        check_positive_int("num_negatives", self.num_negatives)
        self.noise_size = size

    def check_batch(self, batch: int) -> None:
        if batch * world_size() > self.size:
            raise ValueError(
                f"a batch of {batch} on each of {world_size()} rank(s) does not fit a queue of queue_size={self.size}"
            )

    def candidates(self, embeddings: torch.Tensor, step: Step) -> Candidates:
        queue, anchor_positions = self.weight, step.anchor_positions
        if self.num_negatives != queue.shape[0]:
            negatives = queue[torch.randint(queue.shape[0], (self.num_negatives,), device=queue.device)]
        else:  # a copy: the queue is written after this forward, before backward reads it
            negatives = queue.clone()
        positive_mask = None
        if step.mask_self_anchor:  # queue rows are never an anchor's sample; the positive can be
            samples = torch.arange(embeddings.shape[0], device=embeddings.device)
            positive_mask = samples[:, None] == anchor_positions[None, :]
        return Candidates(embeddings[anchor_positions], negatives, embeddings, positive_mask=positive_mask)

    @torch.no_grad()
    def write_rows(
        self, embeddings: torch.Tensor, index: Optional[torch.Tensor], valid: torch.Tensor, first_write: bool
    ) -> None:
        embeddings, valid = gather_rows(embeddings, valid)
        self.enqueue(embeddings, valid)


class _BankSource(NegativeSource):
    """Reads and writes of a memory bank through its slots (see ``MemoryBank.slots``)."""

    kind, needs_index, stores_rows = "bank", True, True
    num_negatives: int
    share_negatives: bool

    def _setup(self, num_negatives: Optional[int], share_negatives: bool) -> None:
        self.num_negatives = DEFAULT_BANK_NEGATIVES if num_negatives is None else num_negatives
        check_positive_int("num_negatives", self.num_negatives)
        self.share_negatives = bool(share_negatives)
        self.noise_size = self.index_bound = cast(Any, self).num_samples

    def prepare(self, step: Step) -> Step:
        # One draw for both sides: their banks are written together, so these slots address both.
        assert step.index is not None  # CRCDLoss checks it for sources with needs_index
        shape = (self.num_negatives,) if self.share_negatives else (step.index.shape[0], self.num_negatives)
        bank = cast(Any, self)  # a MemoryBank or ShardedMemoryBank: slots, sample, read, write, update
        return dataclasses.replace(step, draw=(bank.slots(step.index), bank.sample(step.index, shape)))

    def candidates(self, embeddings: torch.Tensor, step: Step) -> Candidates:
        positive_slots, negative_slots = step.draw
        anchor_positions = step.anchor_positions
        anchor_slots = positive_slots[anchor_positions]  # [A]
        read = cast(Any, self).read
        if self.share_negatives:  # negatives [K] shared by the batch, positives [B] apart
            if step.current_rows:
                positives = embeddings
                negatives = read(negative_slots, embeddings.detach()).to(embeddings.dtype)
            else:  # one read (a collective for a sharded bank) serves positives, anchors and negatives
                rows = read(torch.cat([positive_slots, negative_slots]), embeddings)
                positives, negatives = rows[: embeddings.shape[0]], rows[embeddings.shape[0] :]
            if not step.mask_self_anchor:
                return Candidates(positives[anchor_positions], negatives, positives)
            mask = anchor_slots[:, None] == negative_slots[None, :]  # [A, K]
            positive_mask = positive_slots[:, None] == anchor_slots[None, :]  # [B, A]
            return Candidates(positives[anchor_positions], negatives, positives, mask, positive_mask)
        slots = torch.cat([positive_slots[:, None], negative_slots], dim=1)  # [B, K+1]
        if step.current_rows:
            negatives = read(slots[:, 1:], embeddings.detach()).to(embeddings.dtype)
            candidates = torch.cat([embeddings[:, None, :], negatives], dim=1)
            anchors = embeddings[anchor_positions]
        else:  # anchors are the positives' rows: one read serves both
            candidates = read(slots, embeddings)
            anchors = candidates[anchor_positions, 0]
        mask = slots[:, None, :] == anchor_slots[None, :, None] if step.mask_self_anchor else None
        return Candidates(anchors, candidates, mask=mask)

    @torch.no_grad()
    def write_rows(
        self, embeddings: torch.Tensor, index: Optional[torch.Tensor], valid: torch.Tensor, first_write: bool
    ) -> None:
        assert index is not None
        # Every rank applies every rank's rows, so the memory stays identical everywhere.
        embeddings, index, valid = gather_rows(embeddings, index, valid)
        bank = cast(Any, self)
        (bank.write if first_write else bank.update)(index, embeddings, valid)


class Bank(MemoryBank, _BankSource):
    """A memory bank (:class:`~crcd_plugin.memory.MemoryBank`, one row per training sample):
    anchors and positives are the batch's rows, the ``K`` negatives drawn uniformly per sample
    (or once for the batch with ``share_negatives``). Needs the dataset ``index``.

    Example:
        >>> bank = Bank(100, 8, num_negatives=5)
        >>> step = bank.prepare(Step(torch.arange(4), torch.arange(4)))
        >>> bank.candidates(torch.randn(4, 8), step).candidates.shape
        torch.Size([4, 6, 8])
    """

    def __init__(
        self,
        num_samples: int,
        dim: int,
        num_negatives: Optional[int] = None,
        momentum: float = 0.5,
        init: str = "first_write",
        share_negatives: bool = False,
    ) -> None:
        super().__init__(num_samples, dim, momentum, init)  # type: ignore[arg-type]
        self._setup(num_negatives, share_negatives)


class ShardedBank(ShardedMemoryBank, _BankSource):
    """:class:`Bank` whose rows are split across the ranks
    (:class:`~crcd_plugin.sharded_memory.ShardedMemoryBank`; cold rows only)."""

    def __init__(
        self, num_samples: int, dim: int, num_negatives: Optional[int] = None, momentum: float = 0.5,
        share_negatives: bool = False,
    ) -> None:
        super().__init__(num_samples, dim, momentum)
        self._setup(num_negatives, share_negatives)


SourceSpec = Union[None, str, NegativeSource, "tuple[NegativeSource, NegativeSource]"]


def build_sources(
    spec: SourceSpec, config: RelationConfig, num_samples: Optional[int], both_sides: bool = True
) -> tuple[NegativeSource, Optional[NegativeSource]]:
    """The (student side's, teacher side's) sources: from a name (or ``config.negatives``), or a
    ready source (the teacher side gets a copy of it) or pair of sources, used as they are.

    ``both_sides=False`` (a one-sided loss) makes no teacher-side source: ``None``. A named one is
    still drawn from the global random stream as if it were made, so that a seed gives the same
    run whether or not the loss is symmetric, and as it did before the side was dropped.
    """
    if isinstance(spec, NegativeSource):
        return spec, copy.deepcopy(spec) if both_sides else None
    if isinstance(spec, tuple):
        return spec[0], spec[1] if both_sides else None
    kind = spec or config.resolved_negatives(num_samples)
    first = _named_source(kind, config, num_samples)
    if both_sides:
        return first, _named_source(kind, config, num_samples)
    skip_random_unit_rows(_random_rows(first), config.embed_dim)
    return first, None


def _random_rows(source: NegativeSource) -> int:
    """Rows of random initial values a named source drew when it was made (a bank's or queue's)."""
    return int(source.weight.shape[0]) if isinstance(source, (Bank, Queue)) else 0


def _named_source(kind: str, config: RelationConfig, num_samples: Optional[int]) -> NegativeSource:
    dim, num_negatives = config.embed_dim, config.num_negatives
    if kind != "bank" and (config.share_negatives or config.shard_memory):
        option = "share_negatives" if config.share_negatives else "shard_memory"
        raise ValueError(f'{option}=True draws from or splits the memory bank: it needs negatives="bank", got {kind!r}')
    if kind == "bank":
        if num_samples is None:
            raise ValueError('negatives="bank" needs num_samples (the training-set size)')
        check_positive_int("num_samples", num_samples)
        if config.shard_memory:
            if config.resolved_memory_init() != "cold":
                raise ValueError('shard_memory=True supports memory_init="cold" only (the default with it)')
            return ShardedBank(num_samples, dim, num_negatives, config.momentum, config.share_negatives)
        init = config.resolved_memory_init()
        return Bank(num_samples, dim, num_negatives, config.momentum, init, config.share_negatives)
    if kind == "queue":
        if config.queue_size is None:
            raise ValueError('negatives="queue" needs queue_size')
        return Queue(config.queue_size, dim, num_negatives)
    if kind == "batch":
        if num_negatives is not None:
            raise ValueError('negatives="batch" uses the other B - 1 samples; leave num_negatives=None')
        return InBatch()
    raise ValueError(f"negatives must be one of ('bank', 'queue', 'batch') or a NegativeSource, got {kind!r}")
