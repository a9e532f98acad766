"""0.2.0's named settings (``preset="default"`` / ``"reference"``) and its ``CRCDLoss`` keywords.

Defaults are decided in :mod:`crcd_plugin.config` now (``RelationConfig``, ``RelationConfig.reference()``);
this module maps the 0.2.0 spellings onto it, with a ``DeprecationWarning`` that names the new one.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Literal, Mapping, Optional, TypedDict

from crcd_plugin._checks import check_choice
from crcd_plugin.config import RelationConfig

Preset = Literal["default", "reference"]
PRESETS = ("default", "reference")

_DISTILLER_PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {"warmup_steps": 0},
    "reference": {"warmup_steps": 0},
}


def distiller_preset(preset: str) -> Dict[str, Any]:
    """``CRCDDistiller`` settings of ``preset`` (a copy)."""
    check_choice("preset", preset, PRESETS)
    return dict(_DISTILLER_PRESETS[preset])


def default_negatives(preset: str, num_samples: Optional[int], queue_size: Optional[int]) -> str:
    """0.2.0's rule for where negatives come from when ``negatives`` is not given (what the
    distiller's and the HF integration's 0.2.0 paths still call; ``RelationConfig.resolved_negatives``
    is the rule of ``CRCDLoss``).

    A memory bank when the dataset size is known (the reference), a queue when a queue size is
    given, else the other samples of the batch (no state, no index, no cold start). The reference
    preset has no index-free mode of its own: without ``num_samples`` it still asks for a bank.
    """
    if num_samples is not None or (preset == "reference" and queue_size is None):
        return "bank"
    return "queue" if queue_size is not None else "batch"


class LegacyLossKeywords(TypedDict, total=False):
    """0.2.0's ``CRCDLoss`` keywords, as that version typed them (deprecated)."""

    embed_dim: int
    head: Literal["linear", "mlp", "identity"]
    head_hidden_dim: Optional[int]
    queue_size: Optional[int]
    num_negatives: Optional[int]
    temperature: float
    objective: Optional[Literal["nce", "infonce"]]
    momentum: float
    memory_init: Optional[Literal["first_write", "cold"]]
    num_anchors: Optional[int]
    self_anchor: Literal["keep", "mask"]
    symmetric: bool
    teacher_head_grad: bool
    anchored: bool
    eps: float
    on_nonfinite: Literal["raise", "skip"]
    check_index: bool
    backend: str
    chunk_size: Optional[int]
    preset: Preset
    shard_memory: bool
    share_negatives: bool


# 0.2.0 CRCDLoss keyword -> RelationConfig field (the spelling the deprecation warning names).
LEGACY_LOSS_KEYWORDS = {
    "embed_dim": "embed_dim",
    "head": "embed_head",
    "head_hidden_dim": "embed_hidden_dim",
    "queue_size": "queue_size",
    "num_negatives": "num_negatives",
    "temperature": "temperature",
    "objective": "objective",
    "momentum": "momentum",
    "memory_init": "memory_init",
    "num_anchors": "num_anchors",
    "self_anchor": "self_anchor",
    "symmetric": "symmetric",
    "teacher_head_grad": "train_teacher_embedding",
    "anchored": "anchored",
    "eps": "eps",
    "on_nonfinite": "on_nonfinite",
    "check_index": "check_index",
    "backend": "backend",
    "chunk_size": "chunk_size",
    "shard_memory": "shard_memory",
    "share_negatives": "share_negatives",
}


def legacy_relation_config(config: Optional[RelationConfig], keywords: Mapping[str, Any]) -> RelationConfig:
    """``config`` (default ``RelationConfig()``) with 0.2.0 ``CRCDLoss`` keywords applied over it.

    ``preset="reference"`` starts from ``RelationConfig.reference()`` (fields of ``config`` left at
    their defaults take the reference values). Each keyword warns once, naming its new spelling.
    """
    keywords = dict(keywords)
    unknown = sorted(set(keywords) - set(LEGACY_LOSS_KEYWORDS) - {"preset"})
    if unknown:
        raise TypeError(f"CRCDLoss got unexpected keyword arguments {unknown}; options go in RelationConfig")
    if config is not None and not isinstance(config, RelationConfig):
        raise TypeError(f"config must be a RelationConfig, got {type(config).__name__}")
    config = RelationConfig() if config is None else config
    if not keywords:
        return config
    preset = keywords.pop("preset", None)
    spellings = [f"{name}= -> RelationConfig({LEGACY_LOSS_KEYWORDS[name]}=)" for name in keywords]
    if preset is not None:
        check_choice("preset", preset, PRESETS)
        spellings.append(f"preset={preset!r} -> RelationConfig{'.reference()' if preset == 'reference' else '()'}")
        if preset == "reference":
            defaults = RelationConfig()
            fields = LEGACY_LOSS_KEYWORDS.values()
            changed = {f: getattr(config, f) for f in fields if getattr(config, f) != getattr(defaults, f)}
            config = RelationConfig.reference(**changed)
    warnings.warn(
        "CRCDLoss keywords of 0.2.0 are deprecated; pass a RelationConfig: " + ", ".join(spellings),
        DeprecationWarning,
        stacklevel=3,
    )
    if keywords.get("num_anchors", 0) is None:  # 0.2.0: None took the preset's value
        del keywords["num_anchors"]
    return config.replace(**{LEGACY_LOSS_KEYWORDS[name]: value for name, value in keywords.items()})


def legacy_attribute(config: RelationConfig, teacher_rows: Any, name: str) -> Any:
    """0.2.0's option attributes of ``CRCDLoss`` (``crcd.num_anchors``, ...), read from the config
    and the student side's source (``teacher_rows``); ``AttributeError`` for any other name."""
    if name == "num_negatives":
        return getattr(teacher_rows, "num_negatives", None)
    if name == "noise_size":
        return teacher_rows.noise_size
    if name == "memory_init":
        return config.resolved_memory_init()
    if name in LEGACY_LOSS_KEYWORDS and name not in ("queue_size", "head", "head_hidden_dim"):
        return getattr(config, LEGACY_LOSS_KEYWORDS[name])
    raise AttributeError(name)
