"""The 0.2.0 spellings, mapped onto the current ones: removed in crcd-plugin 0.5.

Every deprecated keyword, attribute and setting of 0.2.0 (``CRCDDistiller``'s weights, ``crcd_options``,
``preset``, ``student_head``/``teacher_head``, a ``DistillSchedule`` object, ``CRCDLoss``'s keywords
and option attributes) is translated here, and only here, with a ``DeprecationWarning`` that names
the new spelling. Deleting this module, and the few lines that call it, removes them.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, TypedDict

from crcd_plugin._checks import check_choice
from crcd_plugin.config import CRCDConfig, RelationConfig
from crcd_plugin.schedule import DistillSchedule

REMOVED_IN = "0.5"
"""The release that removes the 0.2.0 spellings."""

Preset = Literal["default", "reference"]
PRESETS = ("default", "reference")


# 0.2.0 keyword of CRCDDistiller (and its integrations) -> CRCDConfig field.
LEGACY_WEIGHTS: Dict[str, str] = {
    "gamma": "task_weight",
    "alpha": "kd_weight",
    "beta": "feature_weight",
    "kd_temperature": "kd_temperature",
    "gradient_element": "gradient_element",
    "gradient_weight": "gradient_weight",
    "label_smoothing": "label_smoothing",
    "warmup_steps": "warmup_steps",
}
# 0.2.0 CRCDLoss keyword (a ``crcd_options`` key) -> RelationConfig field, where the name changed.
LEGACY_RELATION_NAMES: Dict[str, str] = {
    "head": "embed_head",
    "head_hidden_dim": "embed_hidden_dim",
    "teacher_head_grad": "train_teacher_embedding",
}


def deprecated(old: str, new: str, stacklevel: int = 4) -> None:
    """Warn that the 0.2.0 spelling ``old`` is deprecated in favour of ``new``."""
    warnings.warn(f"{old} is deprecated since crcd-plugin 0.3 and will be removed in {REMOVED_IN}: use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def relation_from_options(
    relation: RelationConfig, options: Mapping[str, Any], owner: str = "crcd_options"
) -> Tuple[RelationConfig, Optional[int]]:
    """``relation`` with 0.2.0 ``CRCDLoss`` keywords (a ``crcd_options`` dict) applied.

    Returns:
        The relation options, and the ``num_samples`` the dict named (``None`` if none).

    Example:
        >>> relation, _ = relation_from_options(RelationConfig(), {"head": "mlp", "teacher_head_grad": True})
        >>> relation.embed_head, relation.train_teacher_embedding
        ('mlp', True)
    """
    if not isinstance(options, Mapping):
        raise TypeError(f"{owner} must be a dict of CRCDLoss keyword arguments, got {type(options).__name__}")
    options = dict(options)
    num_samples = options.pop("num_samples", None)
    preset = options.pop("preset", "default")
    check_choice(f"{owner}['preset']", preset, PRESETS)
    if preset == "reference":
        relation = RelationConfig.reference(**_changed_fields(relation))
    if options.get("num_anchors", 0) is None:
        del options["num_anchors"]  # 0.2.0: None meant the preset's value, not "every sample"
    fields = {f.name for f in dataclasses.fields(RelationConfig)}
    changes = {}
    for key, value in options.items():
        name = LEGACY_RELATION_NAMES.get(key, key)
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3)
            raise TypeError(f"{owner} has an unknown key {key!r}" + (f"; closest RelationConfig fields: {close}"
                                                                     if close else ""))
        changes[name] = value
    return relation.replace(**changes), num_samples


def _changed_fields(config: Any) -> Dict[str, Any]:
    """The fields of a dataclass that differ from its defaults."""
    default = type(config)()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


def config_from_legacy(
    config: Optional[CRCDConfig], legacy: Mapping[str, Any], owner: str = "CRCDDistiller", stacklevel: int = 4,
) -> Tuple[CRCDConfig, Optional[int]]:
    """``config`` with the 0.2.0 keywords in ``legacy`` applied, each with a ``DeprecationWarning``.

    Handles the weights and options of :data:`LEGACY_WEIGHTS`, ``queue_size``, ``crcd_options`` and
    ``preset``; the caller handles its own keywords (classifier paths, a schedule object). ``None``
    values are "not given", as in 0.2.0.

    Returns:
        The configuration, and a ``num_samples`` named in ``crcd_options`` (else ``None``).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     config, _ = config_from_legacy(None, {"alpha": 0.5, "crcd_options": {"embed_dim": 64}})
        >>> config.kd_weight, config.relation.embed_dim
        (0.5, 64)
    """
    if config is None:
        config = CRCDConfig()
    elif not isinstance(config, CRCDConfig):
        raise TypeError(f"{owner}(config=...) must be a crcd_plugin.CRCDConfig, got {type(config).__name__}")
    legacy = dict(legacy)
    relation = config.relation
    preset = legacy.pop("preset", None)
    if preset is not None:
        check_choice("preset", preset, PRESETS)
        deprecated(f"{owner}(preset={preset!r})",
                   "config=CRCDConfig(relation=RelationConfig.reference()) (or CRCDConfig.reference() for the whole "
                   "recipe, which also turns on the step schedule)" if preset == "reference" else "config=CRCDConfig()",
                   stacklevel=stacklevel)
        if preset == "reference":
            relation = RelationConfig.reference(**_changed_fields(relation))
    changes: Dict[str, Any] = {}
    for old, new in LEGACY_WEIGHTS.items():
        value = legacy.pop(old, None)
        if value is None:
            continue
        deprecated(f"{owner}({old}=...)", f"config=CRCDConfig({new}=...)", stacklevel=stacklevel)
        try:
            config.replace(**{new: value})
        except (TypeError, ValueError) as error:
            raise type(error)(f"{old}={value!r} (now CRCDConfig.{new}): {error}") from None
        changes[new] = value
    num_samples = None
    queue_size = legacy.pop("queue_size", None)
    if queue_size is not None:
        deprecated(f"{owner}(queue_size=...)", "config=CRCDConfig(relation=RelationConfig(queue_size=...))",
                   stacklevel=stacklevel)
        try:
            relation = relation.replace(queue_size=queue_size)
        except ValueError as error:
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r} ({error})") from None
    options = legacy.pop("crcd_options", None)
    if options is not None:
        deprecated(f"{owner}(crcd_options=...)", "config=CRCDConfig(relation=RelationConfig(...)) (head -> "
                   "embed_head, teacher_head_grad -> train_teacher_embedding)", stacklevel=stacklevel)
        relation, num_samples = relation_from_options(relation, options)
    if legacy:
        raise TypeError(f"{owner}() got unexpected keyword arguments {sorted(legacy)}")
    return config.replace(relation=relation, **changes), num_samples


class LegacyClassifierNames:
    """0.2.0's names of the distiller's classifier paths (read-only)."""

    student_classifier: str
    teacher_classifier: Optional[str]

    @property
    def student_head(self) -> str:
        """0.2.0 name of ``student_classifier``."""
        return self.student_classifier

    @property
    def teacher_head(self) -> Optional[str]:
        """0.2.0 name of ``teacher_classifier``."""
        return self.teacher_classifier


def renamed_classifier_keywords(
    owner: str, student: Optional[str], teacher: Optional[str], renamed: Mapping[str, Any]
) -> Tuple[Optional[str], Optional[str]]:
    """``(student_classifier, teacher_classifier)`` with the ``student_head`` / ``teacher_head``
    keywords of ``owner`` (Lightning's ``CRCDCallback`` until 0.3) applied, with a warning each."""
    unknown = sorted(set(renamed) - {"student_head", "teacher_head"})
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}")
    names = {"student_classifier": student, "teacher_classifier": teacher}
    for old, new in (("student_head", "student_classifier"), ("teacher_head", "teacher_classifier")):
        if old not in renamed:
            continue
        warnings.warn(f"{owner}({old}=...) is deprecated since crcd-plugin 0.4 and will be removed in {REMOVED_IN}: "
                      f"use {new}= (the name the distiller and the other integrations use)",
                      DeprecationWarning, stacklevel=3)
        if names[new] is not None:
            raise TypeError(f"{owner}: pass {new} or {old} (deprecated), not both")
        names[new] = renamed[old]
    return names["student_classifier"], names["teacher_classifier"]


def distiller_arguments(
    student_classifier: str, teacher_classifier: Optional[str], config: Optional[CRCDConfig], schedule: Any,
    legacy: Dict[str, Any],
) -> Tuple[str, Optional[str], CRCDConfig, Optional[int]]:
    """``CRCDDistiller``'s arguments with its 0.2.0 keywords applied (``student_head``/``teacher_head``,
    the weights, ``crcd_options``, ``preset``, a ``DistillSchedule`` object): the classifier paths,
    the configuration and a ``num_samples`` named in ``crcd_options``."""
    for old, new in (("student_head", "student_classifier"), ("teacher_head", "teacher_classifier")):
        if old in legacy:
            deprecated(f"CRCDDistiller({old}=...)", f"{new}= (the classifier's path; the embedding head is "
                       "RelationConfig.embed_head)", stacklevel=4)
            path = legacy.pop(old)
            student_classifier, teacher_classifier = (
                (path, teacher_classifier) if old == "student_head" else (student_classifier, path)
            )
    resolved, num_samples = config_from_legacy(config, legacy, stacklevel=5)
    if schedule is not None:
        if not isinstance(schedule, DistillSchedule):
            raise TypeError(f"schedule must be a DistillSchedule or None, got {type(schedule).__name__}")
        deprecated("CRCDDistiller(schedule=DistillSchedule(...))",
                   "config=CRCDConfig(schedule=kind, schedule_until=..., schedule_start=...) with total_steps=",
                   stacklevel=4)
        resolved = resolved.replace(schedule=schedule.kind, schedule_until=schedule.until,
                                    schedule_start=schedule.start)
    return student_classifier, teacher_classifier, resolved, num_samples


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
