"""Scores stay cosines over tau when embeddings collapse (all within ~1e-7 of each other).

Gradient-element embeddings of a confident teacher do this: its CE gradients are nearly zero, so
the embedding head's bias dominates and every row is the same unit vector up to rounding. The
Gram form's ``|c - a_j + eps|^2`` is then rounding noise, and unguarded its inverse blew the
InfoNCE loss up to thousands (a bound of ``2 / tau + log(K + 1)`` per side).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from crcd_plugin import CRCDLoss, RelationConfig
from crcd_plugin.kernels import gram_relation_logits

TAU = 0.05


def _collapsed(rows: int, dim: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    base = torch.linspace(-1.0, 1.0, dim)
    return F.normalize(base + scale * torch.randn(rows, dim, generator=generator), dim=-1)


@pytest.mark.parametrize("scale", [1e-6, 1e-7, 3e-8])
def test_gram_scores_of_collapsed_embeddings_stay_within_one_over_tau(scale):
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(20):
        student, anchors = _collapsed(16, 32, scale, g), _collapsed(16, 32, scale, g)
        candidates = _collapsed(16 * 65, 32, scale, g).view(16, 65, 32)
        candidates[:, 0] = anchors  # the bank's positive is the anchor's own row
        worst = max(worst, float(gram_relation_logits(student, anchors, candidates, TAU).abs().max()))
    assert worst <= 1.0 / TAU * (1 + 1e-6)


@pytest.mark.parametrize("negatives", ["bank", "batch"])
def test_infonce_of_collapsed_features_stays_below_its_bound(negatives):
    torch.manual_seed(0)
    num_samples, options = (256, {"num_negatives": 64}) if negatives == "bank" else (None, {})
    config = RelationConfig(embed_dim=32, objective="infonce", **options)
    crcd = CRCDLoss(8, 8, config, negatives=negatives, num_samples=num_samples)
    with torch.no_grad():  # the heads map every feature to (nearly) their bias: a collapsed embedding
        for head in (crcd.embed_student.proj, crcd.embed_teacher.proj):
            head.weight.mul_(1e-7)
    worst = 0.0
    for step in range(6):
        index = torch.arange(32) + 32 * step
        loss = crcd(torch.randn(32, 8), torch.randn(32, 8), index if negatives == "bank" else None)
        worst = max(worst, float(loss))
    num_candidates = 65 if negatives == "bank" else 32
    assert worst <= 2 * (2 / TAU + math.log(num_candidates))
