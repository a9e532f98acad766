"""The one dtype rule of the loss path: relation math runs in fp32 at least."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcasts fp16/bf16 to fp32 and leaves fp32/fp64 alone (fp64 keeps ``gradcheck`` possible)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
