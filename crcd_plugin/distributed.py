"""Keeping CRCD state identical on every rank under ``torch.distributed`` (DDP, ``accelerate``).

Memories and queues are buffers that DDP does not synchronise (its buffer broadcast would overwrite
every rank's updates with rank 0's), so ``CRCDLoss`` gathers what each rank writes and applies the
same update everywhere. Ranks may hold batches of different sizes (an uneven last batch): gathers
exchange the sizes first and pad, so every rank ends with the same rows in rank order. The sharded
memory bank fetches its rows from their owners with :func:`fetch_rows`.
"""

from __future__ import annotations

import weakref
from typing import Dict, Iterable, List, Optional, Sequence, cast

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    # torch.distributed.nn binds ``group.WORLD`` as a default argument of its functions when it is
    # first imported. Imported after ``init_process_group`` (DistributedDataParallel's constructor
    # imports it through torch._dynamo), those defaults hold the default process group for good:
    # ``destroy_process_group()`` then cannot free it, gloo's worker threads outlive the program,
    # and one that drops a finished collective's tensors while the interpreter shuts down aborts
    # the process ("terminate called without an active exception"). Imported here, before any
    # group exists, the defaults are None.
    import torch.distributed.nn  # noqa: F401

__all__ = [
    "world_size",
    "rank",
    "batch_sizes",
    "gather_rows",
    "average",
    "average_gradients",
    "broadcast_state",
    "fetch_rows",
]


def world_size() -> int:
    """Number of ranks of the default process group, 1 when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default process group, 0 when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


# One gloo group per default group, for exchanging host integers (batch sizes) without a
# device-to-host sync: on NCCL, reading sizes gathered on the GPU would wait for the device queue.
# Weakly keyed, so that no reference outlives ``destroy_process_group`` (a process group freed at
# interpreter exit can abort the process).
_HOST_GROUPS: "weakref.WeakKeyDictionary[dist.ProcessGroup, dist.ProcessGroup]" = weakref.WeakKeyDictionary()


def _host_group() -> Optional[dist.ProcessGroup]:
    """Group that takes CPU tensors: ``None`` (the default group) when it runs gloo, else a gloo group.

    Created on first use; every rank reaches that use at the same point of the same step, which
    ``new_group`` requires.
    """
    if "gloo" in str(dist.get_backend()).lower():
        return None
    world = cast(dist.ProcessGroup, dist.group.WORLD)
    group = _HOST_GROUPS.get(world)
    if group is None:
        group = _HOST_GROUPS[world] = cast(dist.ProcessGroup, dist.new_group(backend="gloo"))
    return group


def batch_sizes(batch: int) -> List[int]:
    """Every rank's ``batch`` (host ints, rank order); ``[batch]`` when not distributed.

    Exchanged over a CPU (gloo) group, so it never waits on the device.
    """
    if world_size() == 1:
        return [batch]
    mine = torch.tensor([batch], dtype=torch.long)
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine, group=_host_group())
    return [int(part) for part in parts]


def _all_gather_padded(tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """All ranks' rows of ``tensor`` concatenated in rank order; ``sizes[r]`` rows come from rank ``r``."""
    # Gloo has no all_gather for bool tensors: flags travel as uint8.
    payload = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
    longest = max(sizes)
    if payload.shape[0] < longest:
        pad = payload.new_zeros((longest - payload.shape[0], *payload.shape[1:]))
        payload = torch.cat([payload, pad])
    parts = [torch.empty_like(payload) for _ in sizes]
    dist.all_gather(parts, payload)
    merged = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    return merged.bool() if tensor.dtype == torch.bool else merged


def gather_rows(*tensors: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """Concatenate each tensor's rows from all ranks, in rank order (identity when not distributed).

    Ranks may have different row counts (an uneven last batch): the counts are exchanged first,
    rows are padded to the longest for the ``all_gather`` and trimmed after, so every rank returns
    the same tensors. All ``tensors`` of one call must have the same number of rows.

    Args:
        tensors: Row tensors of this rank, all ``[B, *]``.
        sizes: Every rank's ``B`` if already known (from :func:`batch_sizes`); exchanged otherwise.

    Returns:
        One tensor per input, ``[sum of B over ranks, *]``.

    Shape:
        each ``[B_r, *]`` on rank ``r`` -> ``[B_0 + ... + B_{W-1}, *]`` on every rank.

    Example:
        >>> gather_rows(torch.ones(2, 3))[0].shape   # not distributed: unchanged
        torch.Size([2, 3])
    """
    if world_size() == 1:
        return list(tensors)
    rows = {tensor.shape[0] for tensor in tensors}
    if len(rows) > 1:
        raise ValueError(f"gather_rows needs tensors with the same number of rows, got {sorted(rows)}")
    if sizes is None:
        sizes = batch_sizes(rows.pop())
    return [_all_gather_padded(tensor, sizes) for tensor in tensors]


def average(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (identity when not distributed)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / world_size()


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of ``parameters`` over ranks, in place (no-op when not distributed).

    For trainable modules that live outside the DDP-wrapped model (the CRCD embedding heads: the
    frozen teacher must not be wrapped, and heads are not part of the student's checkpoint). Call
    it after every ``backward()`` and before ``optimizer.step()``. Under gradient accumulation it
    may run after each micro-batch: averaging is linear, so the sum of averaged micro-batch
    gradients equals the average of the summed ones. Every rank must call it with the same
    parameters in the same order; parameters without a gradient on this rank contribute zeros.
    Gradients of one dtype and device travel in one flat ``all_reduce`` (one message, not one per
    tensor).

    Args:
        parameters: The parameters whose gradients to average; frozen ones are skipped.

    Example:
        >>> head = torch.nn.Linear(4, 2)
        >>> head(torch.randn(3, 4)).sum().backward()
        >>> average_gradients(head.parameters())   # not distributed: gradients unchanged
    """
    if world_size() == 1:
        return
    buckets: Dict[tuple, List[torch.Tensor]] = {}
    for param in parameters:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        buckets.setdefault((param.grad.dtype, param.grad.device), []).append(param.grad)
    for grads in buckets.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        flat.div_(world_size())
        for grad, part in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(part.view_as(grad))


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``module`` to every rank, in place.

    What DDP does for the model it wraps, for modules it does not wrap (the CRCD heads, memories
    and NCE constants), so that every rank starts from the same state whatever its random seed.
    Submodules whose ``rank_local_state`` attribute is True (a sharded memory bank, whose rows
    differ by design) are left alone. No-op when not distributed.

    Args:
        module: The module to synchronise; every rank must call this with the same structure.
        src: The rank whose state wins.
    """
    if world_size() == 1:
        return
    skipped = [prefix for prefix, sub in module.named_modules() if getattr(sub, "rank_local_state", False)]

    def kept(name: str) -> bool:
        return not any(name == prefix or name.startswith(prefix + ".") for prefix in skipped)

    tensors: List[torch.Tensor] = [t for name, t in module.named_parameters() if kept(name)]
    tensors += [t for name, t in module.named_buffers() if kept(name)]
    with torch.no_grad():
        for tensor in tensors:
            # Gloo cannot broadcast bool tensors: flags travel as uint8.
            payload = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
            dist.broadcast(payload, src)
            if payload is not tensor:
                tensor.copy_(payload.bool())


def fetch_rows(shard: torch.Tensor, index: torch.Tensor, rows_per_rank: int) -> torch.Tensor:
    """Rows ``index`` of a table split across ranks, each rank holding ``rows_per_rank`` rows.

    Rank ``r`` holds global rows ``[r * rows_per_rank, (r + 1) * rows_per_rank)`` as ``shard``
    (the last rank may hold fewer). Collective: every rank calls it in the same step, each with
    its own ``index`` (any shape, any size). The requests are gathered, every owner sends each
    requester exactly the rows it asked for (``all_to_all``, one message per pair of ranks, so a
    row crosses the network once per request), and the result is exactly the stored values. One
    device-to-host read of the per-owner row counts, which ``all_to_all`` needs.

    Args:
        shard: This rank's rows ``[R_r, d]``.
        index: Global row indices ``[*]`` (int64, on ``shard``'s device).
        rows_per_rank: ``R``, the rows of every shard but possibly the last.

    Returns:
        ``[*, d]``: the requested rows, in ``index`` order.
    """
    me, ranks = rank(), world_size()
    flat = index.reshape(-1)
    if ranks == 1:
        return shard[flat].view(*index.shape, shard.shape[1])
    # Everyone's requests, so that each owner knows what to send to whom.
    sizes = batch_sizes(flat.shape[0])
    requests = _all_gather_padded(flat, sizes)  # [sum(sizes)]
    requester = torch.repeat_interleave(
        torch.arange(ranks, device=flat.device), torch.tensor(sizes, device=flat.device)
    )
    owner = requests // rows_per_rank
    # Outgoing: the requests this rank owns. Requests are in rank order, so a stable sort that
    # puts owned ones first keeps them grouped by requester, each group in its request order.
    mine = owner == me
    send_order = torch.argsort((~mine).to(torch.uint8), stable=True)
    counts = torch.stack(
        [
            torch.bincount(requester[mine], minlength=ranks),  # rows this rank sends to each rank
            torch.bincount(owner[requester == me], minlength=ranks),  # rows this rank receives from each
        ]
    )
    send_counts, recv_counts = counts.tolist()  # the one host read
    outgoing = send_order[: int(sum(send_counts))]
    payload = shard[requests[outgoing] - me * rows_per_rank]  # [sum(send_counts), d]
    received = payload.new_empty((int(sum(recv_counts)), shard.shape[1]))
    dist.all_to_all_single(received, payload, recv_counts, send_counts)
    # Received rows arrive grouped by owner, each group in this rank's request order.
    my_owner = flat // rows_per_rank
    arrival = torch.argsort(my_owner, stable=True)  # request position of each received row
    rows = torch.empty_like(received)
    rows[arrival] = received
    return rows.view(*index.shape, shard.shape[1])
