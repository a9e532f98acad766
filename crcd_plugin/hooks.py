"""Feature capture by module path: read the input or output of any submodule without editing the model.

Hooks are registered by dotted path, fire during a normal forward, and the captured tensors are
popped (and forgotten) after each step, so nothing is retained between steps.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> model.add_module("body", nn.Linear(4, 8))
    >>> model.add_module("fc", nn.Linear(8, 3))
    >>> with FeatureCapture(model) as capture:
    ...     _ = capture.add("fc", io="input", name="feature").add("fc", name="logits")
    ...     logits = model(torch.randn(2, 4))
    ...     captured = capture.pop()
    >>> captured["feature"].shape, torch.equal(captured["logits"], logits)
    (torch.Size([2, 8]), True)
    >>> len(model.fc._forward_hooks) + len(model.fc._forward_pre_hooks)
    0
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from crcd_plugin._checks import check_choice

__all__ = [
    "FeatureCapture",
    "Selector",
    "PoolMode",
    "POOL_MODES",
    "unwrap_model",
    "resolve_module",
    "select_tensor",
    "pool_feature",
    "reduce_feature",
    "model_logits",
    "classifier_forward",
]

Selector = Union[int, str, Callable[[Any], torch.Tensor]]
# (model, model input) -> position of the token the model classifies, [B] or one int for all rows.
TokenSelector = Callable[[nn.Module, Any], Union[int, torch.Tensor]]
PoolMode = Literal["avg", "max", "flatten", "mean_tokens", "cls"]
POOL_MODES: Tuple[str, ...] = ("avg", "max", "flatten", "mean_tokens", "cls")
_IO_KINDS: Tuple[str, ...] = ("input", "output")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``).

    Args:
        model: A model, possibly wrapped several times (e.g. ``torch.compile(DDP(model))``).

    Returns:
        The innermost module, whose submodule names are the ones a user writes.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch._dynamo OptimizedModule
        if isinstance(model, wrappers) and isinstance(model.module, nn.Module):
            model = model.module
        elif isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Find a submodule by dotted path, looking through DP/DDP and ``torch.compile`` wrappers.

    The path is tried on the model as given first (so ``"module.fc"`` works on a DDP model) and
    then on the unwrapped model (so ``"fc"`` works too). ``""`` is the unwrapped model itself.

    Args:
        model: The (possibly wrapped) model.
        path: Dotted submodule path such as ``"layer4.1.conv2"`` or ``"fc"``.

    Returns:
        The submodule.

    Raises:
        TypeError: If ``path`` is not a string.
        ValueError: If no submodule has that path; the message lists the closest names.
    """
    if not isinstance(path, str):
        raise TypeError(f"path must be a dotted module path (str), got {type(path).__name__}")
    inner = unwrap_model(model)
    if path == "":
        return inner
    for root in (model, inner):
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    names = [name for name, _ in inner.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    hint = f"closest: {close}" if close else f"available: {names[:20]}" + (" ..." if len(names) > 20 else "")
    raise ValueError(f"no submodule at path {path!r} in {type(inner).__name__}; {hint}")


def select_tensor(obj: Any, select: Optional[Selector] = None) -> torch.Tensor:
    """Pick one tensor out of a module's input or output.

    Args:
        obj: A tensor, tuple/list, dict, or ``ModelOutput``-like object (attribute access).
        select: ``None`` (``obj`` must be a tensor, or a one-element tuple/list), an ``int``
            (position in a tuple/list, or in the values of a mapping), a ``str`` (mapping key,
            else attribute name) or a callable ``obj -> Tensor``.

    Returns:
        The selected tensor.

    Raises:
        TypeError: If the selection does not produce a tensor.
        ValueError: If the key or index does not exist.
    """
    if select is None:
        picked = obj[0] if isinstance(obj, (tuple, list)) and len(obj) == 1 else obj
    elif callable(select):
        picked = select(obj)
    elif isinstance(select, bool) or not isinstance(select, (int, str)):
        raise TypeError(f"select must be None, an int, a str or a callable, got {type(select).__name__}")
    elif isinstance(select, int):
        seq = list(obj.values()) if isinstance(obj, Mapping) else obj
        if not isinstance(seq, (tuple, list)):
            raise TypeError(f"select={select} needs a tuple, list or mapping, got {type(obj).__name__}")
        if not -len(seq) <= select < len(seq):
            raise ValueError(f"select={select} is out of range for a sequence of length {len(seq)}")
        picked = seq[select]
    elif isinstance(obj, Mapping):
        if select not in obj:
            raise ValueError(f"select={select!r} is not a key; keys are {list(obj.keys())}")
        picked = obj[select]
    elif hasattr(obj, select):
        picked = getattr(obj, select)
    else:
        raise ValueError(f"select={select!r}: {type(obj).__name__} has no key or attribute of that name")
    if not isinstance(picked, torch.Tensor):
        raise TypeError(
            f"expected the captured value to be a Tensor after select={select!r}, got {type(picked).__name__}; "
            "pass select= (int index, str key/attribute or callable) to pick one tensor"
        )
    return picked


def pool_feature(x: torch.Tensor, pool: Optional[PoolMode] = None) -> torch.Tensor:
    """Reduce a feature map or token sequence to one vector per sample.

    Shape:
        - ``"avg"`` / ``"max"``: ``[B, C, *spatial] -> [B, C]`` (global pool); ``[B, C]`` unchanged.
        - ``"flatten"``: ``[B, *] -> [B, prod(*)]``.
        - ``"mean_tokens"``: ``[B, T, C] -> [B, C]`` (mean over tokens).
        - ``"cls"``: ``[B, T, C] -> [B, C]`` (token 0).
        - ``None``: unchanged.

    Args:
        x: The captured tensor, batch first.
        pool: One of ``"avg"``, ``"max"``, ``"flatten"``, ``"mean_tokens"``, ``"cls"`` or ``None``.

    Returns:
        The reduced tensor.

    Raises:
        ValueError: If ``pool`` is unknown or the tensor has the wrong rank for it.
    """
    if pool is None:
        return x
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be None or one of {POOL_MODES}, got {pool!r}")
    if x.dim() < 2:
        raise ValueError(f"pool={pool!r} needs a batch-first tensor with at least 2 dims, got shape {tuple(x.shape)}")
    if pool == "flatten":
        return x.flatten(1)
    if pool in ("avg", "max"):
        if x.dim() == 2:
            return x
        spatial = x.flatten(2)  # [B, C, H*W...]
        return spatial.mean(dim=-1) if pool == "avg" else spatial.amax(dim=-1)
    if x.dim() != 3:
        raise ValueError(f"pool={pool!r} expects tokens shaped [B, T, C], got shape {tuple(x.shape)}")
    return x.mean(dim=1) if pool == "mean_tokens" else x[:, 0]


def reduce_feature(x: torch.Tensor, pool: Optional[PoolMode]) -> torch.Tensor:
    """``[B, *] -> [B, D]`` for the CRCD loss: ``pool`` (see :func:`pool_feature`), then flatten."""
    if pool is not None:
        x = pool_feature(x, pool)
    return x.flatten(1) if x.dim() > 2 else x


class _CaptureHook:
    """One hook callable for both directions: a forward pre-hook (input) or forward hook (output)."""

    def __init__(
        self,
        store: Dict[str, torch.Tensor],
        owner: "FeatureCapture",
        name: str,
        io: str,
        select: Optional[Selector],
        pool: Optional[PoolMode],
        detach: bool,
    ) -> None:
        self.store = store
        self.owner = owner
        self.name = name
        self.io = io
        self.select = select
        self.pool = pool
        self.detach = detach

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], *output: Any) -> None:
        if not self.owner.armed:
            return
        if self.io == "output":
            value = output[0]
        else:
            # Positional inputs as a tuple; a keyword-only call exposes the kwargs mapping instead.
            value = args if args or not kwargs else kwargs
            if self.select is None and isinstance(value, Mapping) and len(value) == 1:
                value = next(iter(value.values()))
        tensor = pool_feature(select_tensor(value, self.select), self.pool)
        self.store[self.name] = tensor.detach() if self.detach else tensor


class FeatureCapture:
    """Capture inputs or outputs of submodules by dotted path during a normal forward.

    Hooks are registered by :meth:`add` and removed by :meth:`remove` or on leaving a ``with``
    block (also when the forward raises). Each forward overwrites the captured tensor of its hook;
    :meth:`pop` returns the captured tensors and forgets them, so memory does not grow and no
    autograd graph is kept alive between steps. If a module runs several times in one forward,
    the last call wins.

    A capture that lives as long as the model (registered once, as ``CRCDDistiller`` does) can be
    disarmed: with ``armed=False`` its hooks return at once, and :meth:`recording` arms it for one
    block, so forwards outside that block keep nothing alive.

    Args:
        model: The model to observe. DP/DDP (``.module``) and ``torch.compile`` (``._orig_mod``)
            wrappers are looked through when resolving paths.
        armed: Whether the hooks record (see :meth:`recording`).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> with FeatureCapture(model) as capture:
        ...     _ = capture.add("0", pool="avg")
        ...     _ = model(torch.randn(2, 3, 8, 8))
        ...     capture.pop()["0"].shape
        torch.Size([2, 4])
    """

    def __init__(self, model: nn.Module, *, armed: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.armed = armed
        self._store: Dict[str, torch.Tensor] = {}
        self._handles: List[RemovableHandle] = []
        self._names: List[str] = []

    def add(
        self,
        path: str,
        *,
        io: Literal["input", "output"] = "output",
        select: Optional[Selector] = None,
        pool: Optional[PoolMode] = None,
        detach: bool = False,
        name: Optional[str] = None,
    ) -> "FeatureCapture":
        """Register a hook on the submodule at ``path``.

        Args:
            path: Dotted submodule path (``""`` for the model itself).
            io: ``"input"`` captures the module's input (positional args, as a tuple), ``"output"``
                its output.
            select: Which tensor to keep from a tuple/dict/``ModelOutput``: an ``int`` index, a
                ``str`` key or attribute, or a callable. ``None`` keeps a lone tensor (for inputs:
                the single positional argument).
            pool: Optional reduction, see :func:`pool_feature`.
            detach: Store ``tensor.detach()`` instead of the graph-connected tensor.
            name: Key under which :meth:`pop` returns the tensor; defaults to ``path``.

        Returns:
            ``self``, so calls can be chained.

        Raises:
            ValueError: If the path does not exist, ``io``/``pool`` is unknown or ``name`` is taken.
        """
        check_choice("io", io, _IO_KINDS)
        if pool is not None and pool not in POOL_MODES:
            raise ValueError(f"pool must be None or one of {POOL_MODES}, got {pool!r}")
        key = path if name is None else name
        if key in self._names:
            raise ValueError(f"a capture named {key!r} already exists; pass a distinct name=")
        module = resolve_module(self.model, path)
        hook = _CaptureHook(self._store, self, key, io, select, pool, detach)
        if io == "input":
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=True)
        self._handles.append(handle)
        self._names.append(key)
        return self

    @property
    def names(self) -> List[str]:
        """Keys of the registered captures, in registration order."""
        return list(self._names)

    def pop(self) -> Dict[str, torch.Tensor]:
        """Return the tensors captured since the last pop and forget them.

        Returns:
            ``{name: tensor}`` for every capture whose module ran; missing names did not run.
        """
        captured = dict(self._store)
        self._store.clear()
        return captured

    def clear(self) -> None:
        """Forget captured tensors without returning them (the hooks stay registered)."""
        self._store.clear()

    def remove(self) -> None:
        """Remove every hook and forget captured tensors. Safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._names.clear()
        self._store.clear()

    @contextlib.contextmanager
    def recording(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Arm the hooks for the block and forget what was captured on leaving it (also on errors).

        Yields:
            The live store: read it (or :meth:`pop` it) inside the block.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3))
            >>> capture = FeatureCapture(model, armed=False).add("0", io="input", name="x")
            >>> with capture.recording():
            ...     _ = model(torch.randn(2, 4))
            ...     capture.pop()["x"].shape
            torch.Size([2, 4])
            >>> _ = model(torch.randn(2, 4)); len(capture.pop())   # disarmed: nothing kept
            0
        """
        self._store.clear()
        armed, self.armed = self.armed, True
        try:
            yield self._store
        finally:
            self.armed = armed
            self._store.clear()

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(unwrap_model(self.model)).__name__}, names={self._names})"


def model_logits(output: Any, select: Optional[Selector] = None) -> torch.Tensor:
    """The logits in a model's output: ``select`` (see :func:`select_tensor`), else a tensor or ``.logits``.

    Raises:
        TypeError: If ``select`` is ``None`` and the output is neither a tensor nor carries ``.logits``.
    """
    if select is not None:
        return select_tensor(output, select)
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model output is a {type(output).__name__} without a .logits tensor; "
            "pass output_select= (int index, str key/attribute or callable)"
        )
    return logits


def classifier_forward(
    capture: FeatureCapture,
    model: nn.Module,
    x: Any,
    *,
    role: str,
    path: str,
    output_select: Optional[Selector] = None,
    feature_token: Optional[TokenSelector] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward ``model`` once; return (classifier input, classifier output, model logits).

    ``capture`` observes ``model`` with two captures, ``"feature"`` (the classifier's input) and
    ``"head_logits"`` (its output). ``x`` is a tensor or a dict of keyword inputs. When the
    classifier saw every token (``[B, T, D] -> [B, T, C]``) and the model kept one per row,
    ``feature_token(unwrapped model, x)`` gives the kept position.

    Raises:
        ValueError: If the classifier did not run; the message names ``role`` and ``path``.
    """
    with capture.recording() as captured:
        output = model(**x) if isinstance(x, Mapping) else model(x)
        if len(captured) != 2:
            raise ValueError(f"the {role} classifier {path!r} did not run during the {role}'s forward")
        feature, head_logits = captured["feature"], captured["head_logits"]
    logits = model_logits(output, output_select)
    if feature_token is not None and head_logits.dim() == logits.dim() + 1:
        position = feature_token(unwrap_model(model), x)
        if isinstance(position, torch.Tensor):
            position = position.to(feature.device)
        rows = torch.arange(feature.shape[0], device=feature.device)
        feature, head_logits = feature[rows, position], head_logits[rows, position]
    return feature, head_logits, logits
