"""A source of negatives written here, in under 60 lines, plugs into CRCDLoss and trains."""

import torch
import torch.nn.functional as F

from crcd_plugin import CRCDLoss
from crcd_plugin.config import RelationConfig
from crcd_plugin.negatives import Candidates, NegativeSource, Step


class OtherClassBank(NegativeSource):
    """Class-aware negatives: the K stored rows of the most recent samples of *other* classes.

    Anchors and positives are the current embeddings; row ``m`` of the store remembers its class,
    and a stored row of a sample's own class is masked out of that sample's candidates.
    """

    kind, needs_index, stores_rows = "other-class", True, True

    def __init__(self, labels: torch.Tensor, dim: int, size: int = 16) -> None:
        super().__init__()
        self.noise_size = size
        self.register_buffer("labels", labels)  # [N] class of every training sample
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("row_labels", torch.full((size,), -1))

    def candidates(self, embeddings: torch.Tensor, step: Step) -> Candidates:
        # Per-sample candidates [B, K+1, d]: the positive first, then the store.
        batch = embeddings.shape[0]
        stored = self.rows[None].expand(batch, -1, -1)
        candidates = torch.cat([embeddings[:, None], stored], dim=1)
        same_class = self.labels[step.index][:, None] == self.row_labels[None, :]  # [B, K]
        mask = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), same_class], dim=1)
        mask = mask[:, None, :].expand(-1, step.anchor_positions.shape[0], -1)  # [B, A, K+1]
        return Candidates(embeddings[step.anchor_positions], candidates, mask=mask)

    @torch.no_grad()
    def write_rows(self, embeddings, index, valid, first_write) -> None:
        batch = embeddings.shape[0]
        self.rows = torch.cat([self.rows[batch:], embeddings])
        self.row_labels = torch.cat([self.row_labels[batch:], self.labels[index]])


def test_a_source_written_in_a_test_file_plugs_into_crcd_loss_and_trains_a_step():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (40,))
    sources = (OtherClassBank(labels, 8), OtherClassBank(labels, 8))
    crcd = CRCDLoss(10, 12, RelationConfig(embed_dim=8, objective="infonce"), negatives=sources)
    optimizer = torch.optim.SGD(crcd.parameters(), lr=0.1)
    student, teacher, index = torch.randn(8, 10), torch.randn(8, 12), torch.arange(8)
    before = crcd.embed_student.proj.weight.detach().clone()
    loss = crcd(student, teacher, index)
    loss.backward()
    optimizer.step()
    assert loss.shape == () and torch.isfinite(loss)
    assert crcd.negatives == "other-class"
    assert not torch.equal(crcd.embed_student.proj.weight, before)
    assert torch.equal(crcd.memory_teacher.row_labels[-8:], labels[:8])  # the source wrote its rows
    assert "memory_teacher.rows" in crcd.state_dict()
