"""NCE's normalising constant as the kernels and the objectives share it (the bottom of the math).

The eager objectives (:mod:`crcd_plugin.functional`), the chunked reducer and the Triton kernel
all fix, keep and subtract ``log Z`` the same way; it lives here so that the kernels need nothing
from a layer above them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["keep_or_fix_log_z", "nce_log_normalizer_from_parts", "nce_shift"]


def nce_log_normalizer_from_parts(part_lse: torch.Tensor, num_scores: int, noise_size: int) -> torch.Tensor:
    """``log Z`` as :func:`_nce_log_normalizer` gives it, from the log-sum-exps of disjoint parts of
    the scores (chunks of candidates, or rows), ``num_scores`` scores in all."""
    return torch.logsumexp(part_lse.reshape(-1), 0) - math.log(num_scores) + math.log(noise_size)


def keep_or_fix_log_z(log_z: torch.Tensor, z_ready: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The stored ``log Z`` once it is fixed, else this batch's; a non-finite batch never fixes it."""
    return torch.where(z_ready | ~torch.isfinite(fresh), log_z, fresh)


def nce_shift(log_z: torch.Tensor, num_negatives: int, noise_size: int) -> torch.Tensor:
    """``log(Z K / N)``, what NCE subtracts from every score."""
    # log K as a tensor op: K = B - 1 for in-batch negatives, and compile must not specialise on B.
    return log_z + torch.log(log_z.new_full((), num_negatives)) - math.log(noise_size)
