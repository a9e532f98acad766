"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the student and the frozen teacher.

The student is sharded by the user as in any FSDP2 loop; the distiller then leaves it unwrapped and
keeps the small CRCD heads and memories replicated beside it. This file holds what FSDP2 does not
give: a per-block shard of a frozen teacher, sharded checkpoints of the whole distiller with
``torch.distributed.checkpoint``, and the check that refuses integrations not supported under FSDP2.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Type, Union, cast

import torch
import torch.distributed as dist
from torch import nn

from .distributed import world_size
from .sharded_memory import ShardedMemoryBank

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

# The distiller sits above this module (it calls in from its contract): it is typed as Any here so
# that no import, not even for type checking, climbs back up.
CRCDDistiller = Any

__all__ = [
    "is_fully_sharded",
    "is_sharded_parameter",
    "shard_teacher",
    "sharded_state_dict",
    "save_sharded_checkpoint",
    "load_sharded_checkpoint",
    "check_fsdp_integration",
    "student_gradient_sync",
    "reshard",
    "clear_dtensor_caches",
]

# Submodules of a teacher to shard one by one: dotted paths or module types (or one type).
Blocks = Union[Sequence[Union[str, Type[nn.Module]]], Type[nn.Module]]

# Integrations and whether each runs with an FSDP2-sharded student (docs/distributed.md, "FSDP2").
_SUPPORTED = ("loop",)
_REFUSED = {
    "hf": "CRCDTrainer averages the CRCD heads' gradients when accelerate syncs a DDP student and saves "
          "crcd_state_dict() from rank 0; neither is done for accelerate's FSDP2 plugin yet",
    "lightning": "CRCDCallback distils the LightningModule itself and adds the CRCD heads to its optimizer; "
                 "FSDPStrategy / ModelParallelStrategy shard that module and build the optimizer over its shards",
    "timm": "CRCDDistillationTask.prepare_distributed() wraps the student in DDP",
}


def is_sharded_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed by FSDP2 (a ``DTensor``; FSDP2 reduces its gradient itself)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or to any of its submodules."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(sub, FSDPModule) for sub in module.modules())


def _fsdp_mesh(module: nn.Module) -> Optional["DeviceMesh"]:
    """The mesh of the first sharded parameter of ``module``, if any."""
    for param in module.parameters():
        if is_sharded_parameter(param):
            return param.device_mesh  # type: ignore[attr-defined]
    return None


def _default_mesh(device: torch.device) -> "DeviceMesh":
    """Every rank of the default group; a module still on the meta device gets the CUDA or CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device.type == "meta" else device.type
    return init_device_mesh(kind, (world_size(),))


def _blocks(teacher: nn.Module, blocks: Blocks) -> List[nn.Module]:
    """The modules ``blocks`` names: dotted paths, or module types (outermost matches, in order)."""
    specs = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]
    if not specs:
        raise ValueError("blocks must name at least one module (a dotted path or a module type)")
    types = tuple(spec for spec in specs if isinstance(spec, type))
    bad = [spec for spec in specs if not isinstance(spec, (str, type))]
    if bad:
        raise TypeError(f"blocks must hold dotted module paths (str) or nn.Module types, got {bad!r}")
    chosen: List[nn.Module] = [teacher.get_submodule(spec) for spec in specs if isinstance(spec, str)]
    if types:
        inside: set = set()
        for _, module in teacher.named_modules():
            if module is teacher or id(module) in inside or not isinstance(module, types):
                continue
            assert isinstance(module, nn.Module)
            chosen.append(module)
            inside.update(id(sub) for sub in module.modules())
    if not chosen:
        raise ValueError(f"blocks {specs!r} match no submodule of the teacher")
    if any(module is teacher for module in chosen):
        raise ValueError("blocks must name submodules of the teacher, not the teacher itself (it is sharded last)")
    return chosen


def shard_teacher(
    teacher: nn.Module,
    blocks: Blocks,
    *,
    mesh: Optional["DeviceMesh"] = None,
    offload: bool = False,
    prefetch: bool = True,
    mp_policy: Optional[Any] = None,
) -> nn.Module:
    """Shard a frozen teacher block by block with FSDP2, for forwards under ``torch.no_grad()``.

    Each block in ``blocks`` becomes its own ``fully_shard`` unit, then the teacher's root holds what
    is left (embeddings, final norm, classifier). At rest each rank holds ``1/W`` of every
    parameter; a forward gathers one block at a time and frees it right after it ran
    (``reshard_after_forward=True``, also for the root, which FSDP2 otherwise keeps gathered for a
    backward that a teacher never runs), so the peak is the shards plus about one or two gathered
    blocks (``prefetch`` gathers the next block while the current one runs). With ``offload`` the
    shards live in host memory (``CPUOffloadPolicy``) and are copied to the device block by block.
    The teacher is frozen (``requires_grad_(False)``) and put in eval mode first. Its outputs are
    the unsharded teacher's: FSDP2 changes where parameters live, not the arithmetic.

    Every rank must run the teacher's forward in the same steps (the distiller does: it runs the
    teacher on every distilling step). The features of the teacher's classifier are captured by the
    distiller's hooks as usual; the gradient element's closed form gathers the classifier weight
    when it is sharded.

    Args:
        teacher: The trained teacher, on its device (``cuda:<local_rank>`` or CPU), not sharded yet;
            or built on the meta device, so that no rank ever holds it whole: then materialise the
            shards after this call (``teacher.to_empty(device=...)``) and load its weights, e.g.
            with ``torch.distributed.checkpoint`` or ``set_model_state_dict(...,
            StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))``.
        blocks: Which submodules to shard one by one: dotted paths (``"blocks.0"``, ...) or module
            types (``Block``, ``LlamaDecoderLayer``: every outermost match, in forward order).
        mesh: A 1-D ``DeviceMesh``; default: every rank of the default group, on the teacher's device type.
        offload: Keep the shards in host memory (``CPUOffloadPolicy(pin_memory=True)`` on CUDA).
        prefetch: Gather block ``i+1`` while block ``i`` runs (the order of ``blocks``).
        mp_policy: An FSDP2 ``MixedPrecisionPolicy`` (e.g. ``param_dtype=torch.bfloat16``); default:
            the parameters' dtype.

    Returns:
        ``teacher`` itself, sharded in place (``fully_shard`` changes module classes, not objects,
        so hooks and paths given before or after stay valid).

    Example:
        >>> teacher = shard_teacher(teacher, blocks=[Block])  # doctest: +SKIP
        >>> distiller = CRCDDistiller(student, teacher, "head", "head", config)  # doctest: +SKIP
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_teacher needs torch.distributed.init_process_group() first")
    if is_fully_sharded(teacher):
        raise ValueError("teacher is already sharded with fully_shard; pass the unsharded teacher")
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    chosen = _blocks(teacher, blocks)
    teacher.requires_grad_(False)
    teacher.eval()
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    mesh = mesh if mesh is not None else _default_mesh(device)
    options: Dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": True,
        "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy(),
    }
    for block in chosen:
        fully_shard(block, **options)
    fully_shard(teacher, **options)  # explicit reshard_after_forward: the root frees its share too
    if prefetch and len(chosen) > 1:
        for block, following in zip(chosen, chosen[1:]):
            block.set_modules_to_forward_prefetch([following])  # type: ignore[operator]
    return teacher


def check_fsdp_integration(
    integration: str, model: Optional[nn.Module] = None, *, sharding: Optional[str] = None
) -> None:
    """Raise a clear error where ``integration`` would run a sharded student, which it does not support.

    The integrations call it once, where they take the student. Supported with FSDP2: a plain loop
    (``torchrun``) with :meth:`CRCDDistiller.prepare_distributed` and :meth:`sync_gradients`
    (``integration="loop"`` never raises).

    Args:
        integration: ``"hf"``, ``"lightning"``, ``"timm"`` or ``"loop"``.
        model: The student as the integration got it; refused if ``fully_shard`` was applied in it.
        sharding: What the framework was configured to shard with, if anything (e.g.
            ``"FSDPStrategy"``, ``"accelerate FSDP plugin"``); refused when given.

    Raises:
        NotImplementedError: For a sharded student (or a sharding framework) under a refused
            integration; the message names it and says what to use instead.
        ValueError: For an unknown ``integration``.
    """
    if integration not in _REFUSED and integration not in _SUPPORTED:
        raise ValueError(f"integration must be one of {sorted([*_REFUSED, *_SUPPORTED])}, got {integration!r}")
    if integration not in _REFUSED:
        return
    how = sharding or ("fully_shard" if model is not None and is_fully_sharded(model) else None)
    if how is not None:
        raise NotImplementedError(
            f"crcd-plugin does not support a student sharded with {how} under the {integration!r} integration: "
            f"{_REFUSED[integration]}. Use a torchrun loop with CRCDDistiller (docs/distributed.md, 'FSDP2')."
        )


# ---------------------------------------------------------------------- checkpoints
def _rank_local_prefixes(distiller: CRCDDistiller) -> List[str]:
    """``crcd_state_dict`` prefixes of the modules whose rows differ by rank (sharded banks)."""
    prefixes = []
    for name in ("crcd_feature", "crcd_gradient"):
        loss = getattr(distiller, name, None)
        if loss is None:
            continue
        for sub_name, sub in loss.named_modules():
            if getattr(sub, "rank_local_state", False):
                prefixes.append(f"{name}.{sub_name}." if sub_name else f"{name}.")
    return prefixes


def _bank_of(distiller: CRCDDistiller, prefix: str) -> ShardedMemoryBank:
    return cast(ShardedMemoryBank, distiller.get_submodule(prefix.rstrip(".")))


def _crcd_to_global(distiller: CRCDDistiller, mesh: Optional["DeviceMesh"]) -> Dict[str, Any]:
    """``crcd_state_dict()`` with every sharded bank's rows as a ``DTensor`` over all ``N`` rows.

    Replicated state (heads, replicated memories, ``Z``, schedule) is the same plain tensor on every
    rank, which ``torch.distributed.checkpoint`` saves once; a bank's shard becomes ``Shard(0)`` of
    the whole table, so a checkpoint holds each row once and loads into any split.
    """
    state = distiller.crcd_state_dict()
    prefixes = _rank_local_prefixes(distiller)
    if not prefixes or world_size() == 1:
        return state
    from torch.distributed.tensor import DTensor, Shard

    for prefix in prefixes:
        bank = _bank_of(distiller, prefix)
        if mesh is None:
            mesh = _default_mesh(next(iter(bank.buffers())).device)
        for key in [k for k in state if k.startswith(prefix)]:
            local = state[key]
            shape = torch.Size((bank.total_rows, *local.shape[1:]))
            stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
            state[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
    return state


def sharded_state_dict(distiller: CRCDDistiller, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """The distiller's training state as ``torch.distributed.checkpoint`` saves it.

    ``{"student": ..., "crcd": ..., "optimizer": ...}``: the student's sharded state dict
    (``get_model_state_dict``: ``DTensor`` shards under FSDP2, no wrapper prefixes), the CRCD state
    (:meth:`CRCDDistiller.crcd_state_dict`, a sharded bank as one ``DTensor``) and, with
    ``optimizer``, its state keyed by the distiller's parameter names. The
    frozen teacher is not saved. Collective under FSDP2: call it on every rank.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: Dict[str, Any] = {
        "student": get_model_state_dict(distiller.student),
        "crcd": _crcd_to_global(distiller, _fsdp_mesh(distiller.student)),
    }
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(distiller, optimizer)
    return state


def save_sharded_checkpoint(
    distiller: CRCDDistiller, checkpoint_id: str, optimizer: Optional[torch.optim.Optimizer] = None
) -> None:
    """Save :func:`sharded_state_dict` with ``torch.distributed.checkpoint`` (every rank writes its shards).

    Call on every rank, with the same ``checkpoint_id`` (a directory every rank can write to). Each
    parameter shard and bank row is written once; replicated CRCD state is written by one rank.

    Args:
        distiller: The distiller, student sharded with FSDP2 (DDP or unwrapped students work too).
        checkpoint_id: The checkpoint directory.
        optimizer: The optimizer over ``distiller.parameters()`` or ``distiller.trainable_module.parameters()``.
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state_dict(distiller, optimizer), checkpoint_id=checkpoint_id)


def load_sharded_checkpoint(
    distiller: CRCDDistiller, checkpoint_id: str, optimizer: Optional[torch.optim.Optimizer] = None
) -> None:
    """Restore what :func:`save_sharded_checkpoint` wrote, in place (student, CRCD state, optimizer).

    The distiller must be built as when saving (same student sharding calls, same CRCD options, the
    CRCD losses built, e.g. by ``example_input=``) and the optimizer created, on every rank. The
    world size may differ from the saving run's: FSDP2 shards and sharded bank rows are read for the
    current split. Random generators are not saved (as with ``crcd_state_dict``).

    Raises:
        ValueError: From :meth:`CRCDDistiller.load_crcd_state_dict` when the CRCD state does not
            match the distiller's options (key and shape named).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = sharded_state_dict(distiller, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(distiller.student, state["student"])
    distiller.load_crcd_state_dict(_to_local(state["crcd"]))
    if optimizer is not None:
        set_optimizer_state_dict(distiller, optimizer, state["optimizer"])


def _to_local(state: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value.to_local() if is_sharded_parameter(value) else value for key, value in state.items()}


@contextlib.contextmanager
def student_gradient_sync(student: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP2's ``set_requires_gradient_sync(enabled)`` on ``student`` for the block, restored after.

    What ``DistributedDataParallel.no_sync()`` is to DDP (``enabled=False``: gradients accumulate
    unreduced until a synced backward). A no-op for a student that is not sharded.
    """
    from_fsdp = _fsdp_roots(student)
    for module in from_fsdp:
        module.set_requires_gradient_sync(enabled, recurse=True)  # type: ignore[operator]
    try:
        yield
    finally:
        for module in from_fsdp:
            module.set_requires_gradient_sync(True, recurse=True)  # type: ignore[operator]


def _fsdp_roots(module: nn.Module) -> List[nn.Module]:
    """The outermost ``fully_shard`` modules in ``module`` (``module`` itself if it was sharded)."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    roots: List[nn.Module] = []
    inside: set = set()
    for sub in module.modules():
        if isinstance(sub, FSDPModule) and id(sub) not in inside:
            roots.append(sub)
            inside.update(id(m) for m in sub.modules())
    return roots


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every ``fully_shard`` unit in ``module`` (no-op if none).

    FSDP2 keeps a root's parameters gathered after a forward that had no backward (a dry run, an
    evaluation pass); ``module.parameters()`` then yields the gathered tensors, and an optimizer
    built from them would update copies that FSDP2 discards.
    """
    if not is_fully_sharded(module):
        return
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def clear_dtensor_caches() -> None:
    """Empty DTensor's global caches, which hold device meshes and so the process groups they use.

    FSDP2's parameters are ``DTensor``\\ s; DTensor caches sharding and redistribution plans keyed by
    specs that hold the ``DeviceMesh``, which holds its process groups (one cache in C++). While they
    do, ``destroy_process_group()`` cannot free the default group and gloo's worker threads outlive
    it, which can abort the process at interpreter exit (docs/distributed.md, "Ending a run").
    :meth:`CRCDDistiller.release_distributed` calls this. The caches refill on the next use. A no-op
    when DTensor was never imported.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import _collective_utils, _redistribute
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()  # the Python and the C++ fast-path caches
    _redistribute.clear_redistribute_planner_cache()
    _redistribute._gen_transform_infos.cache_clear()
    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()
    ShardingPropagator._propagate_tensor_meta_cached.cache_clear()
