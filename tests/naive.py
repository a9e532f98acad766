"""Deliberately naive CRCD, written straight from METHOD.md with loops and the 4-D relation tensor.

Used only as the specification the fast code is tested against.
"""

import torch
import torch.nn.functional as F


def naive_relations(student, anchors, candidates, temperature, eps=1e-6):
    """[B, A, K+1] with explicit loops over samples and anchors."""
    batch, num_anchors = student.shape[0], anchors.shape[0]
    rows = []
    for i in range(batch):
        row = []
        for j in range(num_anchors):
            s_ij = F.normalize(student[i] - anchors[j] + eps, dim=0)  # anchor-student relation
            t_ijk = F.normalize(candidates[i] - anchors[j] + eps, dim=1)  # anchor-teacher relations [K+1, D]
            row.append(t_ijk @ s_ij / temperature)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def naive_nce(logits, z, num_samples, k=None):
    """Reference NCE with probabilities: P = exp(logit) / Z, Pn = 1/N (K = entries - 1 unless given)."""
    k = logits.shape[-1] - 1 if k is None else k
    p = torch.exp(logits) / z
    pn = 1.0 / num_samples
    log_d1 = torch.log(p[..., 0] / (p[..., 0] + k * pn))
    log_d0 = torch.log(k * pn / (p[..., 1:] + k * pn))
    rows = logits[..., 0].numel()
    return -(log_d1.sum() + log_d0.sum()) / rows


def naive_z(logits, num_samples):
    return torch.exp(logits).mean() * num_samples


def naive_infonce(logits):
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long))
