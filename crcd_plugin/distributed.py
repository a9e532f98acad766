"""Keeping CRCD state identical on every rank under ``torch.distributed`` (DDP).

Memories and queues are buffers that DDP does not synchronise (its buffer broadcast would overwrite
every rank's updates with rank 0's), so ``CRCDLoss`` gathers what each rank writes and applies the
same update everywhere. Requires the same batch size on every rank (``DistributedSampler`` pads to
equal sizes by default).
"""

from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of ranks of the default process group, 1 when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_rows(*tensors: torch.Tensor) -> List[torch.Tensor]:
    """Concatenate each tensor's rows from all ranks, in rank order (identity when not distributed).

    Shape:
        each ``[B, *]`` -> ``[world_size * B, *]``.
    """
    if world_size() == 1:
        return list(tensors)
    gathered = []
    for tensor in tensors:
        # Gloo has no all_gather for bool tensors: flags travel as uint8.
        payload = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
        parts = [torch.empty_like(payload) for _ in range(world_size())]
        dist.all_gather(parts, payload)
        merged = torch.cat(parts)
        gathered.append(merged.bool() if tensor.dtype == torch.bool else merged)
    return gathered


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
    """
    if world_size() == 1:
        return
    for param in parameters:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad.div_(world_size())
