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
