"""Batches as the distiller and the teacher cache read them: ``(input, target[, index])`` or dicts."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch


def to_device(value: Any, device: Optional[torch.device]) -> Any:
    """``value`` (a tensor, or a dict/tuple/list of them; ``None`` kept) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    return value


def split_batch(
    batch: Any, *, target_key: str = "labels", index_key: str = "index", owner: str = "the loader"
) -> Tuple[Any, torch.Tensor, Optional[torch.Tensor]]:
    """``(input, target, index)`` of a batch: an ``(input, target[, index])`` tuple/list, or a dict
    holding ``target_key`` (and ``index_key``) whose other entries are the input (keyword inputs,
    the Hugging Face convention). ``index`` is ``None`` when the batch has none.

    Raises:
        TypeError: For any other batch; the message names ``owner`` and the keys it looked for.
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    if isinstance(batch, Mapping) and target_key in batch:
        inputs = {k: v for k, v in batch.items() if k not in (target_key, index_key)}
        return inputs, batch[target_key], batch.get(index_key)
    raise TypeError(
        f"{owner} must yield (input, target, index) tuples or dicts with {target_key!r} and {index_key!r}, "
        f"got a {type(batch).__name__}"
    )


def check_batch(x: Any, target: Any, index: Any) -> None:
    """A step's ``target`` and ``index`` are tensors of the input's batch size (``index`` ``[B]`` or None)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"target must be a Tensor of class indices [B] or probabilities [B, C], got {type(target).__name__}"
        )
    if index is not None and not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be None or a LongTensor of dataset indices [B], got {type(index).__name__}")
    if isinstance(x, Mapping):
        x = next((v for v in x.values() if isinstance(v, torch.Tensor)), None)
    batch = x.shape[0] if isinstance(x, torch.Tensor) else None
    if batch is not None and target.shape[0] != batch:
        raise ValueError(f"target has batch size {target.shape[0]} but input has {batch}")
    if index is not None and (index.dim() != 1 or index.shape[0] != target.shape[0]):
        raise ValueError(f"index must be [B={target.shape[0]}] (one dataset index per sample), "
                         f"got shape {tuple(index.shape)}")


def require_bank_index(index: Any, bank: bool) -> None:
    """A memory ``bank`` reads and writes rows by dataset index: a step must give it."""
    if index is None and bank:
        raise ValueError(
            "index (dataset indices of the batch, LongTensor [B]) is required with memory-bank negatives "
            "(num_samples was given); drop num_samples to use a queue instead"
        )
