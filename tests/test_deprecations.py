"""0.2.0's CRCDLoss keywords keep working, warn with the new spelling, and give the same loss."""

import pytest
import torch
from conftest import V020_RELATION

from crcd_plugin import CRCDLoss
from crcd_plugin._compat import LEGACY_LOSS_KEYWORDS
from crcd_plugin.config import RelationConfig

DS, DT, B, N = 10, 12, 8, 40
# One 0.2.0 keyword each, with a value other than its default (and any 0.2.0 keyword it needs).
LEGACY = {
    "embed_dim": (16, {}),
    "head": ("mlp", {}),
    "head_hidden_dim": (20, {"head": "mlp"}),
    "queue_size": (64, {}),
    "num_negatives": (7, {}),
    "temperature": (0.2, {}),
    "objective": ("nce", {}),
    "momentum": (0.8, {}),
    "memory_init": ("cold", {}),
    "num_anchors": (3, {}),
    "self_anchor": ("mask", {}),
    "symmetric": (True, {}),
    "teacher_head_grad": (True, {}),
    "anchored": (False, {}),
    "eps": (1e-5, {}),
    "on_nonfinite": ("skip", {}),
    "check_index": (False, {}),
    "backend": ("naive", {}),
    "chunk_size": (3, {}),
    "shard_memory": (True, {"memory_init": "cold"}),
    "share_negatives": (True, {}),
}


def _loss_and_state(crcd):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(0)
    loss = crcd(torch.randn(B, DS, generator=g), torch.randn(B, DT, generator=g), torch.arange(B))
    return loss.detach(), {key: value.clone() for key, value in crcd.state_dict().items()}


def test_every_0_2_0_keyword_is_covered():
    assert set(LEGACY) == set(LEGACY_LOSS_KEYWORDS)


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_a_0_2_0_keyword_warns_with_its_new_spelling_and_gives_the_same_loss(name):
    value, extra = LEGACY[name]
    field = LEGACY_LOSS_KEYWORDS[name]
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=rf"{name}= -> RelationConfig\({field}=\)"):
        old = CRCDLoss(DS, DT, negatives="bank", num_samples=N, **{name: value}, **extra)
    torch.manual_seed(0)
    config = RelationConfig(**{field: value}, **{LEGACY_LOSS_KEYWORDS[key]: v for key, v in extra.items()})
    new = CRCDLoss(DS, DT, config, negatives="bank", num_samples=N)
    (old_loss, old_state), (new_loss, new_state) = _loss_and_state(old), _loss_and_state(new)
    torch.testing.assert_close(old_loss, new_loss, rtol=0, atol=0)
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(old_state[key], new_state[key]) for key in old_state)


def test_legacy_keywords_override_the_config_they_come_with():
    with pytest.warns(DeprecationWarning, match="temperature"):
        crcd = CRCDLoss(DS, DT, RelationConfig(temperature=0.2, embed_dim=8), temperature=0.1)
    assert crcd.config.temperature == 0.1 and crcd.config.embed_dim == 8


def test_preset_reference_is_relation_config_reference():
    with pytest.warns(DeprecationWarning, match=r"preset='reference' -> RelationConfig.reference\(\)"):
        old = CRCDLoss(DS, DT, preset="reference", num_samples=N)
    assert old.config == RelationConfig.reference()
    assert (old.negatives, old.objective, old.memory_teacher.init) == ("bank", "nce", "cold")


def test_return_parts_warns_and_equals_forward_parts():
    # 0.2.0's anchors (every sample, no random draw) and both sides, as the three calls are compared bitwise
    crcd = CRCDLoss(DS, DT, RelationConfig(**dict(V020_RELATION, embed_dim=8)), negatives="batch")
    crcd.eval()
    features = torch.randn(B, DS), torch.randn(B, DT)
    with pytest.warns(DeprecationWarning, match="forward_parts"):
        old = crcd(*features, return_parts=True)
    new = crcd.forward_parts(*features)
    assert old.keys() == new.keys() == {"loss", "student_loss", "teacher_loss"}
    assert all(torch.equal(old[key], new[key]) for key in old)
    assert torch.equal(crcd(*features), new["loss"])


def test_the_new_api_emits_no_deprecation_warning(recwarn):
    crcd = CRCDLoss(DS, DT, RelationConfig(embed_dim=8), negatives="bank", num_samples=N)
    crcd.forward_parts(torch.randn(B, DS), torch.randn(B, DT), torch.arange(B))
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_functional_nce_takes_0_2_0_num_samples_with_a_warning():
    from crcd_plugin import functional

    logits = torch.randn(4, 6)
    with pytest.warns(DeprecationWarning, match="noise_size"):
        old_z = functional.nce_log_normalizer(logits, num_samples=100)
    torch.testing.assert_close(old_z, functional.nce_log_normalizer(logits, 100))
    with pytest.warns(DeprecationWarning, match="noise_size"):
        old = functional.nce_loss(logits, old_z, num_samples=100)
    torch.testing.assert_close(old, functional.nce_loss(logits, old_z, noise_size=100))


class _Net(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU())
        self.fc = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"warmup_steps": -1}, ValueError, "warmup_steps must be an int >= 0"),
        ({"queue_size": 0}, ValueError, "queue_size must be a positive int"),
        ({"crcd_options": [("embed_dim", 8)]}, TypeError, "crcd_options must be a dict"),
    ],
)
def test_bad_0_2_0_distiller_keywords_warn_then_raise_at_construction(options, error, match):
    from crcd_plugin import CRCDDistiller

    with pytest.warns(DeprecationWarning, match="deprecated"), pytest.raises(error, match=match):
        CRCDDistiller(_Net(6), _Net(10), **options)
