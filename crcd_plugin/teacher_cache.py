"""A teacher cache: everything the teacher side of CRCD needs per sample, built once, read by index.

Per sample the cache holds the teacher's feature (the input of its classifier, reduced to ``[D]``),
its classifier output and its logits; for an ``nn.Linear`` classifier the weight and bias (the
gradient element is then the closed form on the stored logits), for any other classifier the
per-sample gradient element itself. :class:`CRCDDistiller` takes a :class:`TeacherCache` in the
teacher's place and never runs a teacher (docs/teacher-cache.md).

On disk a cache is a directory: one raw binary file per field (``<field>.bin``, rows in dataset
order, memory-mapped for reading), ``classifier.pt`` for a linear classifier, and
``metadata.json``, written last by an atomic rename: a directory without it is an unfinished
build and cannot be opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from ._batches import split_batch, to_device
from ._version import __version__
from .distributed import rank, world_size
from .gradients import teacher_gradient_element
from .hooks import POOL_MODES, PoolMode, Selector, TokenSelector, resolve_module
from .teacher import LiveTeacher, Teacher, TeacherRows, _RowsByIndex

__all__ = ["TeacherCache", "CachedTeacher", "CachedRows", "FORMAT_VERSION", "STORAGE_DTYPES", "as_teacher"]

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the on-disk layout; a cache of another format (or library version) must be rebuilt."""

STORAGE_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
METADATA_NAME = "metadata.json"
CLASSIFIER_NAME = "classifier.pt"
_FORMAT_NAME = "crcd-teacher-cache"
# Fields of every cache, and the one only a non-linear classifier needs.
_ROW_FIELDS = ("feature", "head_logits", "logits")
_INDEX_DTYPES = {"targets": torch.int64, "written": torch.uint8}
_GRADIENT = "gradient"
_ALL_FIELDS = (*_ROW_FIELDS, *_INDEX_DTYPES, _GRADIENT)

PathLike = Union[str, "os.PathLike[str]"]


def _library_version() -> str:
    return __version__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _storage_dtype(dtype: Any, argument: str = "dtype") -> torch.dtype:
    """``dtype`` as one of the three storage dtypes (a ``torch.dtype`` or its name)."""
    resolved = STORAGE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in STORAGE_DTYPES.values():
        raise ValueError(f"{argument} must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype!r}")
    return resolved  # type: ignore[return-value]


def _check_device_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """A storage dtype the device cannot take is an error before any row moves."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"device {device} does not support bfloat16, the dtype this teacher cache is stored in: "
            "read it onto the CPU (device='cpu') or rebuild the cache with dtype=torch.float16 or torch.float32"
        )


class CachedRows(NamedTuple):
    """One batch of teacher rows from a cache, float32 on the reader's device.

    ``gradient`` is the per-sample gradient element ``dCE_b / df_b`` (no ``1/B``) of a cache built
    for a non-linear classifier, ``None`` for a linear one (the distiller computes the closed form).
    """

    feature: torch.Tensor  # [B, D]
    head_logits: torch.Tensor  # [B, *head row shape], usually [B, C]
    logits: torch.Tensor  # [B, C]
    gradient: Optional[torch.Tensor]  # [B, D] or None


class TeacherCache:
    """The teacher's per-sample outputs, stored once and read by dataset index.

    Build it with :meth:`build` (one pass of the teacher over an indexed loader, optionally
    sharded over ``torchrun`` ranks), open an existing one with :meth:`open`, and pass it to
    :class:`~crcd_plugin.CRCDDistiller` in the teacher's place. Rows are read from memory-mapped
    files: only the rows a batch asks for are paged in.

    Exactness: on deterministic inputs (no augmentation, the teacher in eval mode) the distiller's
    losses and gradients equal the live teacher's; with fp32 storage the rows are bitwise what the
    teacher gave at build time. With augmentation the cache holds one fixed view per sample.

    Example:
        >>> cache = TeacherCache.build("cache/", teacher, loader, "fc", num_samples=50000)  # doctest: +SKIP
        >>> cache = TeacherCache.open("cache/", teacher=teacher)                           # doctest: +SKIP
        >>> feature, head_logits, logits = cache.rows(torch.tensor([0, 7]))                # doctest: +SKIP
    """

    needs_index = True
    """A cache is read by dataset index: every batch must carry it (as for a :class:`~crcd_plugin.teacher.Teacher`)."""

    def __init__(self, path: PathLike, metadata: Dict[str, Any]) -> None:
        """Use :meth:`open` or :meth:`build`; this takes metadata already checked by :meth:`open`."""
        self.path = Path(path)
        self._metadata = metadata
        self._num_samples = int(metadata["num_samples"])
        self._dtype = STORAGE_DTYPES[metadata["dtype"]]
        self._fields = {
            name: _map_field(self.path, name, spec, self._num_samples) for name, spec in metadata["fields"].items()
        }

    def __getstate__(self) -> Dict[str, Any]:
        # Pickled (deepcopy, spawn) as its path and metadata: the copy maps the same files again
        # instead of carrying the rows.
        return {"path": str(self.path), "metadata": self._metadata}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["path"], state["metadata"])  # type: ignore[misc]

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self._num_samples

    @property
    def feature_dim(self) -> int:
        """``D``, the size of the stored (reduced) teacher feature."""
        return int(self._metadata["fields"]["feature"]["shape"][0])

    @property
    def num_classes(self) -> int:
        """``C``, the size of the teacher's logits."""
        return int(self._metadata["fields"]["logits"]["shape"][-1])

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of feature, logits and gradient rows (reads are upcast to float32)."""
        return self._dtype

    @property
    def classifier(self) -> str:
        """Dotted path of the teacher's classifier the cache was built at."""
        return str(self._metadata["classifier"])

    @property
    def classifier_path(self) -> str:
        """:attr:`classifier`, under the name a :class:`~crcd_plugin.teacher.Teacher` gives it."""
        return self.classifier

    @property
    def fingerprint(self) -> str:
        """:meth:`fingerprint_of` the teacher the cache was built from."""
        return str(self._metadata["fingerprint"])

    @property
    def linear(self) -> bool:
        """Whether the classifier was an ``nn.Linear`` on ``[B, D]`` features (the gradient element is
        then computed from the stored logits and weight; otherwise it is stored per sample)."""
        return self._metadata["gradient"] == "linear"

    @property
    def label_smoothing(self) -> float:
        """The CE label smoothing a stored gradient element was computed with (non-linear classifiers)."""
        return float(self._metadata["label_smoothing"])

    @property
    def metadata(self) -> Dict[str, Any]:
        """A copy of ``metadata.json``."""
        return json.loads(json.dumps(self._metadata))

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}, num_samples={len(self)}, feature_dim={self.feature_dim}, "
                f"num_classes={self.num_classes}, dtype={_dtype_name(self.dtype)}, classifier={self.classifier!r})")

    # ------------------------------------------------------------------ reading
    def check_index(self, index: Any, argument: str = "index") -> torch.Tensor:
        """``index`` as a CPU int64 ``[B]`` tensor, every entry in ``[0, len(self))``.

        The rows live in host files, so the index is read on the host: keep it on the CPU (as a
        ``DataLoader`` yields it) to avoid a device sync.

        Raises:
            TypeError: If ``index`` is not an integer tensor.
            ValueError: If it is not 1-D or an entry is out of range.
        """
        if (not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex()
                or index.dtype == torch.bool):
            got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
            raise TypeError(f"{argument} must be an integer tensor of dataset indices [B], got {got}")
        if index.dim() != 1:
            raise ValueError(f"{argument} must be 1-D [B], got shape {tuple(index.shape)}")
        index = index.detach().to("cpu", torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._num_samples):
            raise ValueError(
                f"{argument} must hold dataset indices in [0, {self._num_samples}) (the cache's num_samples), "
                f"got values from {int(index.min())} to {int(index.max())}"
            )
        return index

    def _read(self, name: str, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        rows = self._fields[name][index]  # [B, *row]: a copy of just these rows
        return rows.to(device, non_blocking=True).float()  # moved in the storage dtype, upcast there

    def rows(
        self, index: torch.Tensor, device: Optional[Union[str, torch.device]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's rows of the samples ``index``, float32 on ``device`` (default: the CPU).

        Shape:
            index ``[B]`` -> feature ``[B, D]``, head_logits ``[B, C]`` (the classifier's output
            row, whatever its shape), logits ``[B, C]``.

        Raises:
            TypeError, ValueError: On a bad ``index`` (see :meth:`check_index`), or a storage dtype
                the device cannot take (bfloat16 on a CUDA device without bfloat16 support).
        """
        index = self.check_index(index)
        target = self._device(device)
        return (self._read("feature", index, target), self._read("head_logits", index, target),
                self._read("logits", index, target))

    def gradient_rows(self, index: torch.Tensor, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Per-sample gradient elements ``dCE_b / df_b`` ``[B, D]`` (float32), for a non-linear classifier.

        Raises:
            ValueError: For a linear classifier's cache, which stores no gradient element.
        """
        if _GRADIENT not in self._fields:
            raise ValueError("this cache was built for an nn.Linear classifier and stores no gradient element; "
                             "compute it from rows() and linear_classifier()")
        return self._read(_GRADIENT, self.check_index(index), self._device(device))

    def targets(self, index: torch.Tensor) -> torch.Tensor:
        """The class indices the cache was built with, int64 ``[B]`` on the CPU."""
        return self._fields["targets"][self.check_index(index)]

    def linear_classifier(self) -> Optional[nn.Linear]:
        """The teacher's ``nn.Linear`` classifier rebuilt from the stored weight (frozen, eval), else ``None``."""
        if not self.linear:
            return None
        state = torch.load(self.path / CLASSIFIER_NAME, map_location="cpu", weights_only=True)
        weight, bias = state["weight"], state.get("bias")
        # skip_init: no random initialisation, so reading a cache leaves the global RNG (which
        # seeds the CRCD heads next) exactly where a live teacher would.
        head = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                  dtype=weight.dtype)
        head.load_state_dict(state)
        return head.requires_grad_(False).eval()

    def _device(self, device: Optional[Union[str, torch.device]]) -> torch.device:
        resolved = torch.device("cpu") if device is None else torch.device(device)
        _check_device_dtype(self._dtype, resolved)
        return resolved

    # ------------------------------------------------------------------ fingerprint
    @staticmethod
    def fingerprint_of(teacher: nn.Module) -> str:
        """A stable hash of ``teacher.state_dict()``: sha256 over every entry's name, shape, dtype and bytes.

        Example:
            >>> import copy
            >>> head = nn.Linear(2, 2)
            >>> same = copy.deepcopy(head)
            >>> TeacherCache.fingerprint_of(head) == TeacherCache.fingerprint_of(same)
            True
            >>> with torch.no_grad():
            ...     _ = same.bias.add_(1e-6)
            >>> TeacherCache.fingerprint_of(head) == TeacherCache.fingerprint_of(same)
            False
        """
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        digest = hashlib.sha256()
        for name, value in teacher.state_dict().items():
            digest.update(name.encode())
            if isinstance(value, torch.Tensor):
                tensor = value.detach().to("cpu").contiguous().reshape(-1)
                digest.update(f"|{tuple(value.shape)}|{value.dtype}|".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
            else:  # extra state: its repr is what can be compared
                digest.update(f"|{value!r}|".encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: PathLike,
        *,
        teacher: Optional[nn.Module] = None,
        num_samples: Optional[int] = None,
        classifier: Optional[str] = None,
    ) -> "TeacherCache":
        """Open a finished cache, checking its metadata, its files and what the caller expects of it.

        Args:
            path: The cache directory.
            teacher: If given, the cache must have been built from this teacher (its fingerprint).
            num_samples: If given, the dataset size the cache must have.
            classifier: If given, the classifier path the cache must have been built at.

        Returns:
            The cache.

        Raises:
            FileNotFoundError: No ``metadata.json`` (a missing or unfinished build), or a missing field file.
            ValueError: Another format or library version (rebuild it), a truncated file, a row
                never written, or a cache built for another ``teacher``, ``num_samples`` or
                ``classifier``; the message names the argument and what was expected.
        """
        path = Path(path)
        metadata_path = path / METADATA_NAME
        if not metadata_path.is_file():
            raise FileNotFoundError(
                f"no {METADATA_NAME} in {str(path)!r}: the teacher cache is missing or its build did not finish; "
                "build it with TeacherCache.build(...)"
            )
        try:
            metadata = json.loads(metadata_path.read_text())
        except (OSError, ValueError) as error:
            message = f"{metadata_path} is not a teacher cache's metadata ({error}); rebuild the cache"
            raise ValueError(message) from None
        if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT_NAME:
            raise ValueError(f"{metadata_path} is not a crcd-plugin teacher cache's metadata; rebuild the cache")
        _check_versions(metadata, path)
        _storage_dtype(metadata.get("dtype"), f"the cache's dtype ({metadata_path})")
        cache = cls(path, metadata)
        unwritten = torch.nonzero(cache._fields["written"] == 0).flatten()
        if unwritten.numel():
            raise ValueError(f"teacher cache {str(path)!r} has rows that were never written (e.g. "
                             f"{unwritten[:5].tolist()}); rebuild it")
        return cache.expect(num_samples=num_samples, classifier=classifier, teacher=teacher)

    def expect(
        self,
        *,
        num_samples: Optional[int] = None,
        classifier: Optional[str] = None,
        teacher: Optional[nn.Module] = None,
        classifier_argument: str = "classifier",
    ) -> "TeacherCache":
        """Check that the cache was built for this dataset size, classifier path and teacher (each
        only if given); a ``ValueError`` names the argument (``classifier_argument`` for the path).

        Returns:
            ``self``.
        """
        where = f"the teacher cache {str(self.path)!r}"
        if num_samples is not None and num_samples != len(self):
            raise ValueError(f"num_samples={num_samples} but {where} holds {len(self)} rows: it was built for a "
                             "dataset of another size")
        if classifier is not None and classifier != self.classifier:
            raise ValueError(f"{classifier_argument}={classifier!r} but {where} was built at the teacher's "
                             f"{self.classifier!r}: leave {classifier_argument} out or pass {self.classifier!r}")
        if teacher is not None and self.fingerprint_of(teacher) != self.fingerprint:
            raise ValueError(f"teacher: the cache {str(self.path)!r} was built from another teacher (fingerprint "
                             f"{self.fingerprint[:12]}..., this teacher's differs); rebuild it for this teacher")
        return self

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        path: PathLike,
        teacher: nn.Module,
        loader: Iterable[Any],
        classifier: str = "fc",
        *,
        num_samples: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
        teacher_transform: Optional[Callable[[Any], Any]] = None,
        feature_pool: Optional[PoolMode] = None,
        output_select: Optional[Selector] = None,
        feature_token: Optional[TokenSelector] = None,
        label_smoothing: float = 0.0,
        progress: bool = False,
        target_key: str = "labels",
        index_key: str = "index",
    ) -> "TeacherCache":
        """Run the teacher once over ``loader`` and write its per-sample rows to ``path``.

        The teacher runs in eval mode under no grad (its mode is restored afterwards), through
        ``teacher_transform``, exactly as :class:`~crcd_plugin.CRCDDistiller` runs a live teacher.
        Under ``torch.distributed`` every rank runs its own ``loader`` (give it a
        ``DistributedSampler``) and writes its rows into the shared files; rank 0 checks that
        every row was written and writes ``metadata.json`` last. A build that fails leaves no
        ``metadata.json``, so it cannot be opened as complete; an earlier cache at ``path`` is
        invalidated before anything is written.

        Args:
            path: Directory to write (created; a directory on a filesystem every rank sees).
            teacher: The trained teacher.
            loader: Batches ``(input, target, index)``, or dicts holding ``target_key`` and
                ``index_key`` whose other entries are the input (keyword inputs). Targets are
                class indices ``[B]``; every index in ``[0, num_samples)`` must occur.
            classifier: Dotted path of the teacher's classifier; its input is the feature.
            num_samples: The dataset size ``N`` (rows of the cache).
            dtype: Storage dtype of feature, logits and gradient rows: ``torch.float32`` (reads
                are bitwise the teacher's), ``torch.float16`` or ``torch.bfloat16`` (half the size).
            device: Where the teacher runs; default: its parameters' device.
            teacher_transform: Map from a batch's input to the teacher's (as the distiller's).
            feature_pool: Reduction of a classifier input that is not ``[B, D]`` (see
                :func:`~crcd_plugin.hooks.pool_feature`); the stored feature is ``[N, D]``.
            output_select: How to get logits from the teacher's output (as the distiller's).
            feature_token: Token selector of decoder-only classifiers (as the distiller's).
            label_smoothing: The CE label smoothing of the stored gradient element; only a
                non-linear classifier has one, and the distiller's ``config.label_smoothing``
                must then equal it.
            progress: Log the progress (``logging.INFO``) every 100 batches.
            target_key: Key of the targets in dict batches.
            index_key: Key of the dataset indices in dict batches.

        Returns:
            The cache, opened.

        Raises:
            TypeError, ValueError: On bad arguments or batches (nothing is then marked complete).
        """
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int (the dataset size), got {num_samples!r}")
        dtype = _storage_dtype(dtype)
        if feature_pool is not None and feature_pool not in POOL_MODES:
            raise ValueError(f"feature_pool must be None or a pool mode of pool_feature, got {feature_pool!r}")
        if teacher_transform is not None and not callable(teacher_transform):
            raise TypeError(f"teacher_transform must be a callable input -> input, got {teacher_transform!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        head = resolve_module(teacher, classifier)
        if device is None:
            device = next(iter(teacher.parameters()), torch.zeros(())).device
        path = Path(path)
        world, me = world_size(), rank()
        if me == 0:
            _clear(path)
        _barrier(world)
        builder = _Builder(path, head, num_samples, dtype, label_smoothing)
        was_training = teacher.training
        # The distiller's own live teacher path: the rows are what a step would see.
        live = LiveTeacher(teacher, classifier, feature_pool=feature_pool, output_select=output_select,
                           feature_token=feature_token, transform=teacher_transform)
        failure: Optional[BaseException] = None
        try:
            for step, batch in enumerate(loader):
                x, target, index = split_batch(batch, target_key=target_key, index_key=index_key,
                                               owner="TeacherCache.build's loader")
                x, target = to_device(x, torch.device(device)), to_device(target, torch.device(device))
                builder.add(index, target, live.rows(x), live.reduce)
                if progress and step % 100 == 0:
                    _logger.info("teacher cache: batch %d, %d rows written on rank %d", step, builder.count, me)
        except Exception as error:  # every rank must still reach the collectives below
            failure = error
        finally:
            live.remove_hooks()
            teacher.train(was_training)
            builder.close()
        summary = builder.summary(failure)
        summaries = _gather_objects(summary, world)
        status: Optional[str] = None
        if me == 0:
            try:
                _finish(path, summaries, builder, head, classifier, cls.fingerprint_of(teacher), num_samples,
                        dtype, label_smoothing, feature_pool, world)
            except Exception as error:
                status = f"{type(error).__name__}: {error}"
                if failure is None:
                    failure = error
        status = _broadcast_object(status, world)
        if failure is not None:
            raise failure
        if status is not None:
            raise ValueError(f"the teacher cache build failed on rank 0: {status}")
        return cls.open(path)


class _Builder:
    """Writes one rank's rows into the field files with positioned writes (no shared mapping needed)."""

    def __init__(self, path: Path, head: nn.Module, num_samples: int, dtype: torch.dtype, smoothing: float) -> None:
        self.path, self.head, self.num_samples, self.dtype, self.smoothing = path, head, num_samples, dtype, smoothing
        self.shapes: Dict[str, List[int]] = {}
        self.linear: Optional[bool] = None
        self.count = 0
        self._files: Dict[str, int] = {}

    def add(self, index: Any, target: Any, rows: TeacherRows, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        feature = rows.feature
        if index is None:
            raise ValueError("TeacherCache.build needs the dataset index of every sample: batches of "
                             "(input, target, index), or dicts with an index entry")
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dim() != 1:
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"TeacherCache.build needs class-index targets [B] (int), got {got}")
        batch = feature.shape[0]
        if (not isinstance(index, torch.Tensor) or index.dim() != 1 or index.shape[0] != batch
                or target.shape[0] != batch):
            got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
            raise ValueError(f"index must be a LongTensor [B={batch}] and target [B={batch}] for a batch of {batch}, "
                             f"got index {got} and target {tuple(target.shape)}")
        index = _check_range(index, self.num_samples)
        if self.linear is None:
            self.linear = type(self.head) is nn.Linear and feature.dim() == 2
        fields = {"feature": rows.reduced, "head_logits": rows.head_logits, "logits": rows.logits}
        if not self.linear:
            gradient = teacher_gradient_element(self.head, feature, target, label_smoothing=self.smoothing,
                                                reduction="sum")
            if gradient is None:
                raise RuntimeError("TeacherCache.build cannot compute a non-linear classifier's gradient element "
                                   "inside torch.inference_mode(); build it outside inference mode")
            fields[_GRADIENT] = reduce(gradient)
        stored = {name: value.detach().to(self.dtype) for name, value in fields.items()}
        for name, values in stored.items():  # every field checked before any is written
            _check_finite(name, fields[name], values)
        for name, values in stored.items():
            self._write(name, index, values)
        self._write("targets", index, target.detach().to(torch.int64))
        self._write("written", index, torch.ones(batch, dtype=torch.uint8))
        self.count += batch

    def _write(self, name: str, index: torch.Tensor, rows: torch.Tensor) -> None:
        shape = list(rows.shape[1:])
        if self.shapes.setdefault(name, shape) != shape:
            raise ValueError(f"the teacher's {name} rows changed shape from {self.shapes[name]} to {shape} between "
                             "batches; a cache needs one row shape (pass feature_pool= for variable-size features)")
        if name not in self._files:
            self._files[name] = os.open(self.path / f"{name}.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        data = rows.to("cpu").contiguous()
        row_bytes = data[0].numel() * data.element_size()
        raw = data.reshape(data.shape[0], -1).view(torch.uint8).numpy()  # [B, row_bytes]
        order = torch.argsort(index).tolist()
        sorted_index = [int(index[i]) for i in order]
        start = 0
        while start < len(order):  # one write per run of consecutive indices
            end = start + 1
            while end < len(order) and sorted_index[end] == sorted_index[end - 1] + 1:
                end += 1
            chunk = raw[order[start:end]].tobytes()
            os.pwrite(self._files[name], chunk, sorted_index[start] * row_bytes)
            start = end

    def close(self) -> None:
        for fd in self._files.values():
            os.fsync(fd)
            os.close(fd)
        self._files.clear()

    def summary(self, failure: Optional[BaseException]) -> Dict[str, Any]:
        return {"shapes": self.shapes, "linear": self.linear, "count": self.count,
                "failure": None if failure is None else f"{type(failure).__name__}: {failure}"}


def _check_finite(name: str, value: torch.Tensor, stored: torch.Tensor) -> None:
    """Rows that are not finite as stored would read back as ``inf``/NaN and train on NaN silently."""
    if bool(torch.isfinite(stored).all()):
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"the teacher gave non-finite {name} values (inf or NaN) for this batch: a cache of them "
                         "would train on NaN; check the teacher and its input")
    dtype = _dtype_name(stored.dtype)
    raise ValueError(
        f"the teacher's {name} rows reach {float(value.abs().max()):.4g}, beyond the largest {dtype} "
        f"({torch.finfo(stored.dtype).max:.4g}): stored as {dtype} they would read back as inf; build the cache "
        "with dtype=torch.bfloat16 (the float32 range) or dtype=torch.float32"
    )


def _check_range(index: torch.Tensor, num_samples: int) -> torch.Tensor:
    if index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor of dataset indices [B], got {index.dtype}")
    index = index.to("cpu", torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
        raise ValueError(f"index must hold dataset indices in [0, num_samples={num_samples}), got values from "
                         f"{int(index.min())} to {int(index.max())}")
    return index


def _clear(path: Path) -> None:
    """Invalidate an earlier cache at ``path`` (metadata first) and create the directory."""
    path.mkdir(parents=True, exist_ok=True)
    for name in (METADATA_NAME, CLASSIFIER_NAME, *(f"{field}.bin" for field in _ALL_FIELDS)):
        (path / name).unlink(missing_ok=True)


def _finish(path: Path, summaries: List[Dict[str, Any]], builder: _Builder, head: nn.Module, classifier: str,
            fingerprint: str, num_samples: int, dtype: torch.dtype, smoothing: float, pool: Optional[PoolMode],
            world: int) -> None:
    """Rank 0: check every rank's pass and every row, then write the classifier and ``metadata.json`` (last)."""
    for rank_, summary in enumerate(summaries):
        if summary["failure"] is not None:
            raise RuntimeError(f"rank {rank_} failed while building the teacher cache: {summary['failure']}")
    built = [s for s in summaries if s["count"]]
    if not built:
        raise ValueError("the loader yielded no batches: nothing to cache")
    shapes, linear = built[0]["shapes"], built[0]["linear"]
    if any(s["shapes"] != shapes or s["linear"] != linear for s in built):
        raise ValueError(f"ranks saw different row shapes: {[s['shapes'] for s in built]}")
    fields = {name: {"dtype": _dtype_name(dtype), "shape": shape} for name, shape in shapes.items()
              if name not in _INDEX_DTYPES}
    fields.update({name: {"dtype": _dtype_name(field_dtype), "shape": []}
                   for name, field_dtype in _INDEX_DTYPES.items()})
    # The written flags first: rows never written at the end of the set leave every file short.
    flags = (path / "written.bin").read_bytes()[:num_samples]
    written = torch.zeros(num_samples, dtype=torch.uint8)
    written[: len(flags)] = torch.frombuffer(bytearray(flags), dtype=torch.uint8) if flags else written[:0]
    missing = torch.nonzero(written == 0).flatten()
    if missing.numel():
        raise ValueError(f"{missing.numel()} of num_samples={num_samples} rows were never written (e.g. "
                         f"{missing[:5].tolist()}): the loader must yield every index in [0, num_samples)")
    for name, spec in fields.items():
        _check_size(path, name, spec, num_samples, "the loader must yield every index in [0, num_samples)")
    if linear:
        assert isinstance(head, nn.Linear)
        torch.save({k: v.detach().to("cpu").clone() for k, v in head.state_dict().items()}, path / CLASSIFIER_NAME)
    metadata = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "num_samples": num_samples,
        "dtype": _dtype_name(dtype),
        "classifier": classifier,
        "fingerprint": fingerprint,
        "gradient": "linear" if linear else "stored",
        "label_smoothing": float(smoothing),
        "feature_pool": pool,
        "world_size": world,
        "fields": fields,
    }
    temporary = path / (METADATA_NAME + ".tmp")
    with open(temporary, "w") as stream:
        json.dump(metadata, stream, indent=2)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path / METADATA_NAME)  # atomic: a reader sees no metadata or all of it


def _check_versions(metadata: Dict[str, Any], path: Path) -> None:
    # The library version is checked too, not only the format: what a row *means* (which tensor
    # is the feature, how it is reduced, the gradient element's convention) is the library's, and
    # can change in a release that keeps the file layout. Rebuilding is one teacher pass; a stale
    # cache would distil silently wrong.
    found = (metadata.get("format_version"), metadata.get("library_version"))
    expected = (FORMAT_VERSION, _library_version())
    if found != expected:
        raise ValueError(
            f"teacher cache {str(path)!r} was built by crcd-plugin {found[1]} (format {found[0]}); this is "
            f"crcd-plugin {expected[1]} (format {expected[0]}): rebuild it with TeacherCache.build(...)"
        )


def _field_bytes(spec: Dict[str, Any], num_samples: int) -> Tuple[torch.dtype, int]:
    dtype = getattr(torch, spec["dtype"])
    numel = num_samples
    for size in spec["shape"]:
        numel *= int(size)
    return dtype, numel


def _check_size(path: Path, name: str, spec: Dict[str, Any], num_samples: int, hint: str) -> None:
    file = path / f"{name}.bin"
    dtype, numel = _field_bytes(spec, num_samples)
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if not file.is_file():
        raise FileNotFoundError(f"teacher cache file {str(file)!r} is missing: {hint}")
    actual = file.stat().st_size
    if actual != expected:
        raise ValueError(f"teacher cache file {str(file)!r} has {actual} bytes, expected {expected} "
                         f"({num_samples} rows of {spec['shape']} {spec['dtype']}): truncated or not this "
                         f"cache's; {hint}")


def _map_field(path: Path, name: str, spec: Dict[str, Any], num_samples: int) -> torch.Tensor:
    """The field's file as a read-only-in-effect memory map ``[N, *row]`` (size checked first: a short
    file would fault on access instead)."""
    _check_size(path, name, spec, num_samples, "rebuild the cache")
    dtype, numel = _field_bytes(spec, num_samples)
    flat = torch.from_file(str(path / f"{name}.bin"), shared=False, size=numel, dtype=dtype)
    return flat.view(num_samples, *spec["shape"])


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _gather_objects(value: Any, world: int) -> List[Any]:
    if world == 1:
        return [value]
    values: List[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def _broadcast_object(value: Any, world: int) -> Any:
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CachedTeacher(_RowsByIndex):
    """A :class:`TeacherCache` as a :class:`~crcd_plugin.teacher.Teacher`: rows by index on the module's device.

    It has no trainable parameters; a linear classifier rebuilt from the cache moves with
    ``.to()`` but is not part of the ``state_dict``: it is the cache's, so a checkpoint never
    carries one cache's classifier into a distiller that reads another (:meth:`claim_state`).
    A non-persistent buffer marks the device the rows are read onto.

    Args:
        cache: The cache.
    """

    _device_marker: torch.Tensor

    def __init__(self, cache: TeacherCache) -> None:
        super().__init__()
        self.cache = cache
        self._set_classifier(cache.linear_classifier())
        self.classifier_path, self.num_rows, self.feature_dim = cache.classifier, len(cache), cache.feature_dim
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_marker.device

    def expect(self, *, classifier: Optional[str], transform: Any, label_smoothing: float,
               num_samples: Optional[int], gradient: bool = False) -> None:
        """Check a distiller's arguments against the cache (dataset size, classifier path, build options)."""
        cache = self.cache
        cache.expect(num_samples=num_samples, classifier=classifier, classifier_argument="teacher_classifier")
        if transform is not None:
            raise ValueError("teacher_transform applies when a cache is built (TeacherCache.build(teacher_transform="
                             "...)), not to a distiller that reads one")
        if gradient and not cache.linear and label_smoothing != cache.label_smoothing:
            raise ValueError(f"config.label_smoothing={label_smoothing} but the cache's gradient element was "
                             f"computed with label_smoothing={cache.label_smoothing}: rebuild it with the config's")

    def claim_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Take this teacher's keys out of a ``state_dict`` about to be loaded, refusing another cache's.

        Checkpoints of 0.3 hold the cached classifier (``<prefix>classifier.*``); one that equals
        this cache's is dropped, one that differs is another teacher's and a ``ValueError``.
        """
        keys = [key for key in state_dict if key.startswith(prefix)]
        classifier = self.classifier
        own = {} if classifier is None else classifier.state_dict()
        for key in keys:
            name = key[len(prefix):].split(".", 1)
            value = own.get(name[1]) if name[0] == "classifier" and len(name) == 2 else None
            saved = state_dict[key]
            if (value is None or not isinstance(saved, torch.Tensor) or saved.shape != value.shape
                    or not torch.equal(saved.to(value.device, value.dtype), value)):
                raise ValueError(
                    f"the state dict's {key!r} is not the classifier of the teacher cache {str(self.cache.path)!r} "
                    "this distiller reads: a checkpoint made on another teacher (or cache); load it into a "
                    "distiller reading that teacher's cache, or leave the teacher's keys out"
                )
            del state_dict[key]

    def check_batch(self, index: Optional[torch.Tensor], target: torch.Tensor, gradient: bool) -> None:
        """Check a step's ``index`` and ``target`` against the cache, on the host, before anything runs.

        Args:
            index: Dataset indices ``[B]`` of the batch (required).
            target: The step's targets ``[B]`` (class indices) or ``[B, C]`` (probabilities).
            gradient: Whether the gradient element is needed (a stored one is then read).

        Raises:
            ValueError: On a missing or bad ``index``, on class targets that differ from the
                build's (a dataset whose indices do not match the cache's), and on probability
                targets where the stored gradient element needs class indices.
        """
        if index is None:
            raise ValueError("index (the dataset indices of the batch, LongTensor [B]) is required when the "
                             "distiller reads a TeacherCache, whatever the source of negatives")
        rows = self.cache.check_index(index)
        if rows.shape[0] != target.shape[0]:
            raise ValueError(f"index has {rows.shape[0]} entries but the batch has {target.shape[0]} samples")
        _check_device_dtype(self.cache.dtype, self.device)
        if target.is_floating_point():
            if gradient and not self.cache.linear:
                raise ValueError("the cache stores the gradient element of class-index targets: probability "
                                 "targets (mixup, soft labels) need a live teacher or gradient_element=False")
        else:
            self._check_targets(self.cache._fields["targets"][rows], target)

    def forward(self, index: torch.Tensor, gradient: bool) -> CachedRows:
        """The rows of ``index``, float32 on the module's device; the batch was checked by :meth:`check_batch`.

        Args:
            index: Dataset indices ``[B]`` of the batch, checked.
            gradient: Whether the gradient element is needed (a stored one is then read).
        """
        rows, device = index.detach().to("cpu", torch.int64), self.device
        read = self.cache._read
        gradients = read(_GRADIENT, rows, device) if gradient and not self.cache.linear else None
        return CachedRows(read("feature", rows, device), read("head_logits", rows, device),
                          read("logits", rows, device), gradients)

    def rows(self, input: Any, index: Optional[torch.Tensor], *, gradient: bool = False) -> TeacherRows:
        assert index is not None, "a cached teacher's batch is checked before its rows are read"
        read = self(index, gradient)
        return TeacherRows(read.feature, read.head_logits, read.logits, read.feature, read.gradient)

    def targets(self, index: torch.Tensor) -> torch.Tensor:
        return self.cache.targets(index)

    @staticmethod
    def _check_targets(expected: torch.Tensor, target: torch.Tensor) -> None:
        # CPU: a ValueError naming the rows; an accelerator: a device-side assert (no host sync).
        if target.device.type != "cpu":
            matches = (expected.to(target.device, non_blocking=True) == target).all()
            torch._assert_async(matches, "the batch's targets differ from the teacher cache's at the same indices")
            return
        differ = torch.nonzero(expected != target.long()).flatten()
        if differ.numel():
            raise ValueError(
                f"target differs from the teacher cache's targets at batch rows {differ[:10].tolist()}: the "
                "batch's index does not address the samples the cache was built from (another dataset order?)"
            )

    def extra_repr(self) -> str:
        return repr(self.cache)


def as_teacher(
    teacher: Union[nn.Module, TeacherCache, Teacher], classifier: Optional[str], config: Any,
    num_samples: Optional[int], **live: Any,
) -> Teacher:
    """The :class:`~crcd_plugin.teacher.Teacher` a distiller asks: a cache's or a ready one (checked against
    the distiller's arguments), or a model run live (``live``: ``LiveTeacher``'s keyword arguments)."""
    if isinstance(teacher, TeacherCache):
        teacher = CachedTeacher(teacher)
    if isinstance(teacher, Teacher):
        teacher.expect(classifier=classifier, transform=live["transform"], label_smoothing=config.label_smoothing,
                       num_samples=num_samples, gradient=config.gradient_element)
        return teacher
    return LiveTeacher(teacher, "fc" if classifier is None else classifier, **live)
