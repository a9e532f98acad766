"""Embedding heads: project a feature to the contrastive space and L2-normalise it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from crcd_plugin._checks import check_choice
from crcd_plugin._dtypes import at_least_fp32

HEAD_KINDS = ("linear", "mlp", "identity")


class EmbedHead(nn.Module):
    """``normalize(head(x))`` with ``head`` a Linear, a two-layer MLP or the identity.

    The output is at least fp32, so that the loss core runs in fp32 under autocast.

    Args:
        in_dim: Feature size.
        out_dim: Embedding size (must equal ``in_dim`` for ``"identity"``).
        kind: ``"linear"``, ``"mlp"`` or ``"identity"``.
        hidden_dim: Width of the MLP's hidden layer (default: ``max(in_dim, out_dim)``).

    Shape:
        ``[B, in_dim]`` -> ``[B, out_dim]``, unit rows.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden_dim: Optional[int] = None) -> None:
        super().__init__()
        check_choice("embed_head", kind, HEAD_KINDS)
        if kind == "identity" and in_dim != out_dim:
            raise ValueError(
                f'embed_head="identity" (0.2.0: head="identity") needs the feature size to equal embed_dim, '
                f"got {in_dim} and {out_dim}"
            )
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            hidden = hidden_dim or max(in_dim, out_dim)
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        else:
            self.proj = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(at_least_fp32(self.proj(x)), dim=-1)
