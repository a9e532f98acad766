"""``CRCDLoss``: embedding heads, anchors and negatives (bank, queue or batch) and the objective."""

from __future__ import annotations

from typing import Dict, Literal, Optional, TypedDict, Union, cast

import torch
from torch import nn

from crcd_plugin._checks import check_choice, check_positive_int
from crcd_plugin.distributed import average, gather_rows, world_size
from crcd_plugin.heads import EmbedHead
from crcd_plugin.kernels.fused import BACKENDS, resolve_backend, run_relation_loss_core, run_shared_relation_loss_core
from crcd_plugin.memory import MEMORY_INITS, FeatureQueue, MemoryBank, in_batch_candidate_index
from crcd_plugin.presets import (
    PRESETS,
    REFERENCE_NUM_NEGATIVES,
    Preset,
    default_negatives,
    default_objective,
    loss_preset,
)
from crcd_plugin.sharded_memory import ShardedMemoryBank

NEGATIVE_MODES = ("bank", "queue", "batch")
OBJECTIVES = ("nce", "infonce")
SELF_ANCHOR_MODES = ("keep", "mask")
NONFINITE_MODES = ("raise", "skip")
DEFAULT_BANK_NEGATIVES = REFERENCE_NUM_NEGATIVES

NegativeMode = Literal["bank", "queue", "batch"]
Objective = Literal["nce", "infonce"]
# The memory kinds: a bank for negatives="bank" (sharded or not), a queue for "queue".
Bank = Union[MemoryBank, ShardedMemoryBank]
Memory = Union[MemoryBank, ShardedMemoryBank, FeatureQueue]


class _CoreOptions(TypedDict):
    """The keyword options ``forward`` passes to the loss cores."""

    temperature: float
    eps: float
    objective: str
    num_samples: int
    chunk_size: Optional[int]


class CRCDLoss(nn.Module):
    """Complementary relation contrastive loss between a student and a teacher feature.

    Each student embedding ``v_i`` is described by its relations ``normalize(v_i - a_j + eps)`` to
    anchors ``a_j`` taken from the teacher's side (the teacher memory rows of the batch); the loss
    makes it agree with the teacher's relation of the same sample (the positive) and disagree with
    the teacher's relations of other samples (the negatives). The teacher side is the mirror image
    and is on by default (``symmetric=True``). With ``anchored=False`` the relations are dropped and
    the loss is CRD (Tian et al., 2020), for ablations and baselines.

    ``preset`` picks the settings an argument left at ``None`` takes: ``"default"`` (bounded
    gradients and work, safe to add to any loop) or ``"reference"`` (the authors' code). They
    differ where there is no memory bank (``objective`` InfoNCE vs NCE), in ``num_anchors``
    (at most 500 vs all ``B``) and in the bank's ``memory_init`` (first write vs the reference's
    cold start); docs/reliability.md has the measurements. Arguments passed explicitly always win.

    Where anchors and candidates come from (``negatives``; by default a bank when ``num_samples``
    is given, a queue when ``queue_size`` is, else the batch):

    - ``"bank"`` (the reference): one memory row per training sample on each side, updated with
      momentum; anchors ``M[index_j]``, positive ``M[index_i]``, ``K`` negatives drawn uniformly
      from the ``num_samples`` rows. Needs ``index`` (dataset indices). By default
      (``memory_init="first_write"``) a row's first write stores the embedding itself, a batch
      row never written yet reads the current embedding, and negatives are drawn only among
      written rows (and the batch's own): no random row ever acts as a sample. ``"cold"`` is the
      reference: random rows are samples from the start and the first write blends with them.
      :meth:`fill_memory` writes real rows before training, for users who can afford one pass.
    - ``"queue"``: no dataset index; anchors and positive are the other network's current
      embeddings (detached), negatives ``num_negatives`` rows drawn uniformly from the last
      ``queue_size`` embeddings.
    - ``"batch"``: no state; anchors as for the queue, negatives the other ``B - 1`` samples.

    The memory and queue are updated, and the NCE constant ``Z`` is fixed, in training mode only.
    Under ``torch.distributed`` every rank applies the rows of all ranks (gathered, also when batch
    sizes differ between ranks) and the mean ``Z``, so the state stays identical on every rank
    (docs/distributed.md).
    The teacher feature is always treated as a constant (detached); gradients reach the student
    feature and the student embedding head, and the teacher embedding head through the teacher-side
    loss (``symmetric=True``) or, with ``teacher_head_grad=True``, through the current teacher
    embeddings that the student-side loss reads. With ``symmetric=False`` and
    ``teacher_head_grad=False`` the teacher head gets no gradient: it stays a fixed random
    projection of the teacher feature (measured on MNIST-1D, training it gave no gain; see
    ``docs/method.md``). The loss core runs in fp32, also under autocast.

    Args:
        student_dim: Student feature size ``Ds``.
        teacher_dim: Teacher feature size ``Dt``.
        embed_dim: Size ``d`` of the contrastive embedding.
        head: Embedding head, ``"linear"``, ``"mlp"`` or ``"identity"`` (needs ``Ds = Dt = d``).
        head_hidden_dim: Hidden width of the ``"mlp"`` head.
        negatives: ``"bank"``, ``"queue"`` or ``"batch"`` (see above); ``None`` picks from
            ``num_samples`` / ``queue_size`` (the reference preset always asks for a bank).
        num_samples: Training-set size ``N``; required for ``"bank"``.
        queue_size: Queue length ``Q``; required for ``"queue"``.
        num_negatives: ``K``. Bank: default 500 (the reference). Queue: default
            ``min(Q, 500)`` rows, drawn uniformly each step (``K = Q`` uses the whole queue).
            Batch: must stay ``None`` (``K = B - 1``).
        temperature: ``tau`` of the scores (reference 0.05).
        objective: ``"nce"`` (the reference, CRD's NCE with ``Z`` fixed on the first batch) or
            ``"infonce"`` (cross-entropy over the ``K+1`` scores). ``None``: ``"nce"`` with a
            bank or ``preset="reference"``, else ``"infonce"`` (bounded gradients for any ``K``).
        momentum: Bank update momentum ``m`` (reference 0.5).
        memory_init: Bank: ``"first_write"`` (rows are right from their first write, see above) or
            ``"cold"`` (the reference: random rows act as samples until washed out by momentum).
            ``None``: ``"first_write"``, or ``"cold"`` with ``preset="reference"`` or
            ``shard_memory=True`` (which supports only that for now).
        num_anchors: Use a random subset of ``A`` of the batch's anchors each step when the batch
            has more; ``None`` takes the preset's (default 500, reference all ``B``).
        self_anchor: ``"keep"`` (the reference) keeps entries whose candidate is the anchor's own
            sample (their relation is the constant ``eps`` direction); ``"mask"`` drops them, and
            drops the whole row when it is the positive that coincides with its anchor.
        symmetric: Add the teacher-side loss (reference: True).
        teacher_head_grad: Let the student-side loss train the teacher embedding head through the
            current batch's teacher embeddings: they are the anchors and positives (bank: instead
            of the batch's memory rows; batch: also the negatives), no longer detached. Reference:
            False.
        anchored: False gives CRD (no anchors, scores ``<c, v> / tau``).
        eps: Shift added to every coordinate of each relation vector (reference 1e-6).
        on_nonfinite: ``"raise"`` checks that embeddings are finite and raises ``ValueError``
            (one device-to-host sync per call); ``"skip"`` never syncs and leaves memory and queue
            rows of non-finite samples untouched, so stored state is never poisoned (the loss
            itself is then non-finite, for ``GradScaler`` or the caller to skip).
        check_index: Bank mode: check that ``index`` is within ``[0, num_samples)`` (shares the
            one sync with ``on_nonfinite="raise"``). With both off, ``forward`` never syncs.
        backend: Relation kernel: ``"auto"`` (compiled on CUDA, eager elsewhere), ``"eager"``,
            ``"compile"``, ``"naive"`` (the reference formulation, for checks only) or ``"triton"``
            (flash-style, never stores the scores; CUDA, ``anchored=True``,
            ``self_anchor="keep"``, fp32, ``D <= 256``, else eager with a warning).
        chunk_size: Score the ``K+1`` candidates in chunks of this many, recomputing each chunk in
            backward: peak memory ``O(B * A * chunk_size)`` instead of ``O(B * A * (K+1))`` for
            about one more forward of time (two with NCE). Runs the eager kernels. ``None``: one
            chunk.
        preset: ``"default"`` or ``"reference"``: the values of the arguments left at ``None``.
        shard_memory: Bank mode under ``torch.distributed``: split each bank's rows across the
            ranks (:class:`~crcd_plugin.sharded_memory.ShardedMemoryBank`, ``1/W`` of the memory
            per rank, rows fetched from their owners each step) instead of a full copy on every
            rank (the default). Same loss for the same draws. Build the loss after
            ``init_process_group``.
        share_negatives: Bank mode: draw the ``K`` negatives once per step for the whole batch
            (as a queue does) instead of ``K`` per sample (the reference). The candidate side of
            the scores is then made once per batch, ``A * K`` relations instead of ``B * A * K``
            (the shared-candidate kernels), so a step costs several times less at the same ``K``,
            or affords a larger ``K``. Anchors and positives are the batch's memory rows as before.

    Shape:
        student_feat ``[B, Ds]``, teacher_feat ``[B, Dt]``, index ``[B]`` -> scalar (the sum of
        the two sides, each averaged over its ``B * A`` relation rows).

    Example:
        >>> crcd = CRCDLoss(64, 256, negatives="bank", num_samples=1000, num_negatives=50)
        >>> loss = crcd(torch.randn(8, 64), torch.randn(8, 256), index=torch.arange(8))
        >>> loss.shape
        torch.Size([])
    """

    # Batch and queue negatives take the shared-candidate kernels; False forces the per-sample
    # path (the same loss, slower), which tests and benchmarks compare against.
    _share_candidates: bool = True

    # One memory per side (absent with negatives="batch"); the mode fixes the kind, see _banks/_queues.
    memory_student: Memory
    memory_teacher: Memory
    log_z: torch.Tensor
    z_ready: torch.Tensor
    noise_size: int

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        embed_dim: int = 128,
        head: Literal["linear", "mlp", "identity"] = "linear",
        head_hidden_dim: Optional[int] = None,
        negatives: Optional[Literal["bank", "queue", "batch"]] = None,
        num_samples: Optional[int] = None,
        queue_size: Optional[int] = None,
        num_negatives: Optional[int] = None,
        temperature: float = 0.05,
        objective: Optional[Literal["nce", "infonce"]] = None,
        momentum: float = 0.5,
        memory_init: Optional[Literal["first_write", "cold"]] = None,
        num_anchors: Optional[int] = None,
        self_anchor: Literal["keep", "mask"] = "keep",
        symmetric: bool = True,
        teacher_head_grad: bool = False,
        anchored: bool = True,
        eps: float = 1e-6,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        check_index: bool = True,
        backend: str = "auto",
        chunk_size: Optional[int] = None,
        preset: Preset = "default",
        shard_memory: bool = False,
        share_negatives: bool = False,
    ) -> None:
        super().__init__()
        check_choice("preset", preset, PRESETS)
        settings = loss_preset(preset)
        # The preset helpers return one of NEGATIVE_MODES / OBJECTIVES (checked just below).
        negatives = negatives or cast(NegativeMode, default_negatives(preset, num_samples, queue_size))
        objective = objective or cast(Objective, default_objective(preset, negatives))
        if num_anchors is None:
            num_anchors = settings["num_anchors"]
        check_choice("negatives", negatives, NEGATIVE_MODES)
        check_choice("objective", objective, OBJECTIVES)
        check_choice("self_anchor", self_anchor, SELF_ANCHOR_MODES)
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_MODES)
        check_choice("backend", backend, BACKENDS)
        if memory_init is not None:
            check_choice("memory_init", memory_init, MEMORY_INITS)
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("embed_dim", embed_dim)):
            check_positive_int(name, value)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_anchors is not None:
            check_positive_int("num_anchors", num_anchors)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        if share_negatives and negatives != "bank":
            raise ValueError(
                f'share_negatives=True draws the bank\'s negatives once per step: it needs negatives="bank", got '
                f"{negatives!r} (queue and in-batch negatives are always shared by the batch)"
            )
        if shard_memory and negatives != "bank":
            raise ValueError(f'shard_memory=True shards the memory bank: it needs negatives="bank", got {negatives!r}')
        if memory_init is None:
            # The sharded bank's rows live on their owner ranks; it has no first-write slots yet.
            memory_init = "cold" if shard_memory else settings["memory_init"]
        if shard_memory and memory_init != "cold":
            raise ValueError('shard_memory=True supports memory_init="cold" only (the default with it)')

        self.student_dim, self.teacher_dim, self.embed_dim = student_dim, teacher_dim, embed_dim
        self.negatives, self.objective, self.self_anchor = negatives, objective, self_anchor
        self.temperature, self.eps, self.num_anchors = float(temperature), float(eps), num_anchors
        self.symmetric, self.anchored = symmetric, anchored
        self.teacher_head_grad, self.memory_init = bool(teacher_head_grad), memory_init
        self.on_nonfinite, self.check_index, self.backend = on_nonfinite, check_index, backend
        self.chunk_size, self.preset = chunk_size, preset
        self.share_negatives = bool(share_negatives)

        self.embed_student = EmbedHead(student_dim, embed_dim, head, head_hidden_dim)
        self.embed_teacher = EmbedHead(teacher_dim, embed_dim, head, head_hidden_dim)

        # ``noise_size`` is NCE's N (Pn = 1/N). It cancels between Z and Pn, so any fixed value works
        # where the negatives do not come from a fixed-size set.
        if negatives == "bank":
            if num_samples is None:
                raise ValueError('negatives="bank" needs num_samples (the training-set size)')
            check_positive_int("num_samples", num_samples)
            self.num_negatives: Optional[int] = DEFAULT_BANK_NEGATIVES if num_negatives is None else num_negatives
            check_positive_int("num_negatives", self.num_negatives)
            if shard_memory:
                self.memory_student = ShardedMemoryBank(num_samples, embed_dim, momentum)
                self.memory_teacher = ShardedMemoryBank(num_samples, embed_dim, momentum)
            else:
                self.memory_student = MemoryBank(num_samples, embed_dim, momentum, memory_init)
                self.memory_teacher = MemoryBank(num_samples, embed_dim, momentum, memory_init)
            self.noise_size = num_samples
        elif negatives == "queue":
            if queue_size is None:
                raise ValueError('negatives="queue" needs queue_size')
            check_positive_int("queue_size", queue_size)
            if num_negatives is None:
                num_negatives = min(queue_size, REFERENCE_NUM_NEGATIVES)
            check_positive_int("num_negatives", num_negatives)
            self.num_negatives = num_negatives
            self.memory_student = FeatureQueue(queue_size, embed_dim)
            self.memory_teacher = FeatureQueue(queue_size, embed_dim)
            self.noise_size = queue_size
        else:
            if num_negatives is not None:
                raise ValueError('negatives="batch" uses the other B - 1 samples; leave num_negatives=None')
            self.num_negatives = None
            self.noise_size = 1

        self.register_buffer("log_z", torch.zeros(2))  # NCE's log Z: [student side, teacher side]
        self.register_buffer("z_ready", torch.zeros(2, dtype=torch.bool))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        *,
        return_parts: bool = False,
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Computes the loss and, in training mode, updates memories and the NCE constants.

        Args:
            student_feat: ``[B, Ds]`` student features (gradients flow into them).
            teacher_feat: ``[B, Dt]`` teacher features (detached here).
            index: ``[B]`` dataset indices (integer); required for ``negatives="bank"``.
            return_parts: Return a dict ``{loss, student_loss, teacher_loss}`` instead of the
                scalar loss (``teacher_loss`` is zero when ``symmetric=False``).

        Returns:
            The scalar loss, or the dict of its parts.
        """
        index = self._check_inputs(student_feat, teacher_feat, index)
        device = self.log_z.device
        # Heads and loss core run outside autocast, in the module's dtype (fp32 unless converted):
        # fp16/bf16 features from an autocast forward are upcast here.
        dtype = self.log_z.dtype
        with torch.autocast(device_type=device.type, enabled=False):
            query_student = self.embed_student(student_feat.to(dtype))  # [B, d]
            query_teacher = self.embed_teacher(teacher_feat.detach().to(dtype))  # [B, d]
        finite = torch.isfinite(query_student).all(-1) & torch.isfinite(query_teacher).all(-1)  # [B]
        self._check_values(finite, index)

        batch = student_feat.shape[0]
        anchor_pos = self._anchor_positions(batch, device)  # [A]
        masked = self.anchored and self.self_anchor == "mask"
        # In-batch and queue negatives are the same for every sample: their candidate side is
        # computed once for the batch (``run_shared_relation_loss_core``), which equals the
        # per-sample path on the same inputs and random draws (tested).
        shared = (self.negatives != "bank" or self.share_negatives) and self._share_candidates
        masks: tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
        if shared and self.negatives == "bank":
            bank_slots = self._shared_bank_slots(index, anchor_pos)
            masks = self._shared_bank_masks(*bank_slots, anchor_pos) if masked else (None, None)
        elif shared:
            masks = self._shared_masks(batch, anchor_pos, device) if masked else (None, None)
        else:
            cand_ids, anchor_ids = self._candidate_ids(batch, index, anchor_pos, device)
            mask = cand_ids[:, None, :] == anchor_ids[None, :, None] if masked else None  # [B, A, K+1]
        options = _CoreOptions(
            temperature=self.temperature,
            eps=self.eps,
            objective=self.objective,
            num_samples=self.noise_size,
            chunk_size=self.chunk_size,
        )
        backend = resolve_backend(self.backend, device)

        # The student is scored against the teacher's side (memory or current embeddings), and back.
        sides = [(query_student, query_teacher, getattr(self, "memory_teacher", None))]
        if self.symmetric:
            sides.append((query_teacher, query_student, getattr(self, "memory_student", None)))
        losses, new_log_z = [], []
        for side, (query, other, store) in enumerate(sides):
            if side > 0 or not self.teacher_head_grad:
                other = other.detach()
            z_state = (self.log_z[side], self.z_ready[side])
            if shared:
                positives: Optional[torch.Tensor]
                if self.negatives == "bank":
                    anchors, candidates, positives = self._shared_bank_candidates(other, store, bank_slots, anchor_pos)
                else:
                    anchors, candidates, positives = self._shared_candidates(other, store, anchor_pos)
                with torch.autocast(device_type=device.type, enabled=False):
                    loss, log_z = run_shared_relation_loss_core(
                        backend, query, anchors, candidates, positives, *z_state, *masks, **options
                    )
            else:
                anchors, candidates = self._anchors_and_candidates(other, store, cand_ids, anchor_pos)
                with torch.autocast(device_type=device.type, enabled=False):
                    loss, log_z = run_relation_loss_core(backend, query, anchors, candidates, *z_state, mask, **options)
            losses.append(loss)
            new_log_z.append(log_z)

        if self.training:
            self._update_state(query_student.detach(), query_teacher.detach(), index, finite, new_log_z)

        student_loss = losses[0]
        teacher_loss = losses[1] if self.symmetric else torch.zeros_like(student_loss)
        total = student_loss + teacher_loss
        if return_parts:
            return {"loss": total, "student_loss": student_loss, "teacher_loss": teacher_loss}
        return total

    # ------------------------------------------------------------------ pieces
    def _anchor_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.num_anchors is None or self.num_anchors >= batch:
            return torch.arange(batch, device=device)
        return torch.randperm(batch, device=device)[: self.num_anchors]

    def _candidate_ids(
        self, batch: int, index: Optional[torch.Tensor], anchor_pos: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity of every candidate ``[B, K+1]`` and anchor ``[A]``: bank slots (the row once
        written, else the batch sample that stands in for it, see ``MemoryBank.slots``), batch
        positions otherwise (queue rows are ``-1``, never an anchor's own sample)."""
        num_negatives = self.num_negatives
        if self.negatives == "bank":
            assert index is not None and num_negatives is not None  # _check_inputs / __init__ set both
            # Both memories are written together, so the teacher bank's slots address both.
            _, bank = self._banks()
            positives = bank.slots(index)  # [B]
            negatives = bank.sample(index, (batch, num_negatives))  # [B, K]
            return torch.cat([positives[:, None], negatives], dim=1), positives[anchor_pos]
        if self.negatives == "batch":
            return in_batch_candidate_index(batch, device), anchor_pos
        assert num_negatives is not None  # set for the queue in __init__
        positives = torch.arange(batch, device=device)[:, None]
        return torch.cat([positives, positives.new_full((batch, num_negatives), -1)], dim=1), anchor_pos

    def _shared_bank_slots(
        self, index: Optional[torch.Tensor], anchor_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``share_negatives=True``: the batch's slots ``[B]`` and the ``K`` negatives' slots ``[K]``,
        one draw for the whole batch (see ``MemoryBank.slots`` / ``sample``)."""
        assert index is not None and self.num_negatives is not None  # _check_inputs / __init__ set both
        _, bank = self._banks()  # both memories are written together: the teacher bank's slots address both
        return bank.slots(index), bank.sample(index, (self.num_negatives,))

    @staticmethod
    def _shared_bank_masks(
        positives: torch.Tensor, negatives: torch.Tensor, anchor_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``self_anchor="mask"`` for shared bank negatives: ``(mask [A, K], positive_mask [B, A])``,
        True where the candidate is the anchor's own sample (equal slots)."""
        anchor_slots = positives[anchor_pos]  # [A]
        return anchor_slots[:, None] == negatives[None, :], positives[:, None] == anchor_slots[None, :]

    def _shared_bank_candidates(
        self,
        other: torch.Tensor,
        store: Optional[Memory],
        slots: tuple[torch.Tensor, torch.Tensor],
        anchor_pos: torch.Tensor,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``share_negatives=True``: anchors ``[A, d]`` (None when not anchored), the shared
        negatives ``[K, d]`` and the positives ``[B, d]`` of one side, read from its bank."""
        bank = cast(Bank, store)
        positive_slots, negative_slots = slots
        if self.teacher_head_grad and store is self.memory_teacher:
            # The batch's own teacher rows are its current embeddings, which carry the gradient.
            positives = other
            negatives = bank.read(negative_slots, other.detach()).to(other.dtype)
        else:
            # One read (a collective for a sharded bank) serves positives, anchors and negatives.
            rows = bank.read(torch.cat([positive_slots, negative_slots]), other)
            positives, negatives = rows[: other.shape[0]], rows[other.shape[0] :]
        return (positives[anchor_pos] if self.anchored else None), negatives, positives

    def _shared_masks(
        self, batch: int, anchor_pos: torch.Tensor, device: torch.device
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``self_anchor="mask"`` for shared candidates: ``(mask [A, M], positive_mask [B, A])``.

        In-batch, candidate ``m`` is sample ``m`` (sample ``b``'s positive is candidate ``b``), so
        the entries whose candidate is anchor ``j``'s own sample are one ``[A, B]`` mask for the
        whole batch. Queue rows are never an anchor's sample; only the positive can be.
        """
        samples = torch.arange(batch, device=device)
        if self.negatives == "batch":
            return anchor_pos[:, None] == samples[None, :], None
        return None, samples[:, None] == anchor_pos[None, :]

    def _shared_candidates(
        self, other: torch.Tensor, store: Optional[Memory], anchor_pos: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """Anchors ``[A, d]`` (None when not anchored), shared candidates ``[M, d]`` and separate
        positives ``[B, d]`` of one side: in-batch, the candidates are the batch itself
        (positives None); with the queue, the ``K`` queue rows, and the positives the batch."""
        anchors = other[anchor_pos] if self.anchored else None
        if self.negatives == "batch":
            return anchors, other, None
        queue = cast(FeatureQueue, store).weight  # the other mode here is "queue"
        num_negatives = queue.shape[0] if self.num_negatives is None else self.num_negatives
        if num_negatives != queue.shape[0]:  # the same draw as the per-sample path makes
            return anchors, queue[torch.randint(queue.shape[0], (num_negatives,), device=queue.device)], other
        # A copy: the queue is updated in place after this forward, before backward reads it (the
        # CRD scores save it, and chunk_size recomputes from it).
        return anchors, queue.clone(), other

    def _anchors_and_candidates(
        self,
        other: torch.Tensor,
        store: Optional[Memory],
        cand_ids: torch.Tensor,
        anchor_pos: torch.Tensor,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Anchors ``[A, d]`` (None when not anchored) and candidates ``[B, K+1, d]`` of one side."""
        if self.negatives == "bank":
            bank = cast(Bank, store)
            if self.teacher_head_grad and store is self.memory_teacher:
                # The batch's own teacher rows are its current embeddings, which carry the gradient.
                anchors = other[anchor_pos]
                negatives = bank.read(cand_ids[:, 1:], other.detach())
                candidates = torch.cat([other[:, None, :], negatives.to(other.dtype)], dim=1)
            else:
                # Anchors are the positives' rows: one fetch (a collective for a sharded bank) serves both.
                candidates = bank.read(cand_ids, other)
                anchors = candidates[anchor_pos, 0]
        elif self.negatives == "batch":
            anchors, candidates = other[anchor_pos], other[cand_ids]
        else:
            anchors = other[anchor_pos]
            queue = cast(FeatureQueue, store).weight
            num_negatives = cand_ids.shape[1] - 1
            if num_negatives != queue.shape[0]:
                queue = queue[torch.randint(queue.shape[0], (num_negatives,), device=queue.device)]
            negatives = queue[None].expand(other.shape[0], -1, -1)
            candidates = torch.cat([other[:, None, :], negatives], dim=1)
        return (anchors if self.anchored else None), candidates

    @torch.no_grad()
    def _update_state(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        index: Optional[torch.Tensor],
        finite: torch.Tensor,
        new_log_z: list,
    ) -> None:
        # One-sided (symmetric=False), nothing reads the student memory: it is left as it is.
        self._write_memory(student_emb, teacher_emb, index, finite, first_write=False, student=self.symmetric)
        if self.objective == "nce":
            sides = len(new_log_z)
            self.log_z[:sides].copy_(average(torch.stack(new_log_z)))
            self.z_ready[:sides] |= torch.isfinite(self.log_z[:sides])

    @torch.no_grad()
    def _write_memory(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        index: Optional[torch.Tensor],
        finite: torch.Tensor,
        first_write: bool,
        student: bool = True,
    ) -> None:
        """Write the rows to the teacher memory and, with ``student``, to the student memory."""
        # Under DDP every rank applies every rank's rows, so the state stays identical everywhere.
        if self.negatives == "bank":
            assert index is not None  # _check_inputs requires it for the bank
            student_emb, teacher_emb, index, finite = gather_rows(student_emb, teacher_emb, index, finite)
            student_bank, teacher_bank = self._banks()
            (teacher_bank.write if first_write else teacher_bank.update)(index, teacher_emb, finite)
            if student:
                (student_bank.write if first_write else student_bank.update)(index, student_emb, finite)
        elif self.negatives == "queue":
            student_emb, teacher_emb, finite = gather_rows(student_emb, teacher_emb, finite)
            student_queue, teacher_queue = self._queues()
            teacher_queue.enqueue(teacher_emb, finite)
            if student:
                student_queue.enqueue(student_emb, finite)

    def _banks(self) -> tuple[Bank, Bank]:
        """The (student, teacher) memories as banks; only with negatives="bank"."""
        return cast(Bank, self.memory_student), cast(Bank, self.memory_teacher)

    def _queues(self) -> tuple[FeatureQueue, FeatureQueue]:
        """The (student, teacher) memories as queues; only with negatives="queue"."""
        return cast(FeatureQueue, self.memory_student), cast(FeatureQueue, self.memory_teacher)

    @torch.no_grad()
    def fill_memory(
        self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> None:
        """Write one batch's embeddings into the memory, as first writes, without a loss.

        A warm-up pass over the training set before training (see ``CRCDDistiller.fill_memory``)
        gives every bank row a real embedding, so negatives are drawn from the whole set from the
        first step; it also works with ``memory_init="cold"``. Bank rows are overwritten with the
        embedding itself and marked written; a queue enqueues the rows. Runs in either mode, never
        touches the NCE constant, and under DDP writes the rows of all ranks.

        Args:
            student_feat: ``[B, Ds]`` student features.
            teacher_feat: ``[B, Dt]`` teacher features.
            index: ``[B]`` dataset indices; required for ``negatives="bank"``.

        Raises:
            ValueError: With ``negatives="batch"`` (no memory), or on the input errors of ``forward``.

        Example:
            >>> crcd = CRCDLoss(64, 256, negatives="bank", num_samples=1000, num_negatives=50)
            >>> crcd.fill_memory(torch.randn(8, 64), torch.randn(8, 256), index=torch.arange(8))
            >>> crcd.memory_teacher.seen[:10].tolist()
            [True, True, True, True, True, True, True, True, False, False]
        """
        if self.negatives == "batch":
            raise ValueError('negatives="batch" keeps no memory to fill; use "bank" or "queue"')
        index = self._check_inputs(student_feat, teacher_feat, index, relations=False)
        dtype = self.log_z.dtype
        with torch.autocast(device_type=self.log_z.device.type, enabled=False):
            student_emb = self.embed_student(student_feat.to(dtype))
            teacher_emb = self.embed_teacher(teacher_feat.to(dtype))
        finite = torch.isfinite(student_emb).all(-1) & torch.isfinite(teacher_emb).all(-1)
        self._check_values(finite, index)
        self._write_memory(student_emb, teacher_emb, index, finite, first_write=True)

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        index: Optional[torch.Tensor],
        relations: bool = True,
    ) -> Optional[torch.Tensor]:
        """Shape, dtype and device checks that need no device sync (``relations=False``: a batch
        of one is fine, for ``fill_memory``). Returns ``index`` as int64."""
        device = self.log_z.device
        features = (("student_feat", student_feat, self.student_dim), ("teacher_feat", teacher_feat, self.teacher_dim))
        for name, value, dim in features:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
            if value.ndim != 2 or value.shape[1] != dim:
                raise ValueError(f"{name} must have shape [B, {dim}], got {list(value.shape)}")
            if value.device != device:
                raise ValueError(f"{name} is on {value.device} but the loss is on {device}; move one with .to()")
        batch = student_feat.shape[0]
        if teacher_feat.shape[0] != batch:
            raise ValueError(
                f"student_feat and teacher_feat must have the same batch size, got {batch} and {teacher_feat.shape[0]}"
            )
        if relations and batch < 2 and (self.anchored or self.negatives == "batch"):
            raise ValueError(f"relations need at least two samples per batch, got a batch of {batch}")
        if self.negatives == "queue" and batch * world_size() > self._queues()[1].size:
            raise ValueError(
                f"a batch of {batch} on each of {world_size()} rank(s) does not fit a queue of "
                f"queue_size={self._queues()[1].size}"
            )
        if self.negatives != "bank":
            return None
        if index is None:
            raise ValueError('negatives="bank" needs index (the dataset indices of the batch)')
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
        if index.shape != (batch,):
            raise ValueError(f"index must have shape [{batch}], got {list(index.shape)}")
        if index.device != device:
            raise ValueError(f"index is on {index.device} but the loss is on {device}")
        return index.long()

    def _check_values(self, finite: torch.Tensor, index: Optional[torch.Tensor]) -> None:
        """Value checks, batched into a single device-to-host sync (none when both are off)."""
        flags = []
        if self.on_nonfinite == "raise":
            flags.append(~finite.all())
        if self.check_index and index is not None:
            flags.append(((index < 0) | (index >= self.noise_size)).any())
        if not flags or not bool(torch.stack(flags).any()):
            return
        if self.on_nonfinite == "raise" and not bool(finite.all()):
            rows = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"non-finite values in student_feat or teacher_feat (or their embeddings) at batch rows {rows[:10]}; "
                'pass on_nonfinite="skip" to leave such rows out of the memory instead of raising'
            )
        assert index is not None  # only the index check is left to have failed
        raise ValueError(
            f"index must be in [0, num_samples={self.noise_size}), got values from "
            f"{int(index.min())} to {int(index.max())}"
        )

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, embed_dim={self.embed_dim}, "
            f"negatives={self.negatives!r}, num_negatives={self.num_negatives}, objective={self.objective!r}, "
            f"temperature={self.temperature}, anchored={self.anchored}, self_anchor={self.self_anchor!r}, "
            f"memory_init={self.memory_init!r}, teacher_head_grad={self.teacher_head_grad}"
            + (", share_negatives=True" if self.share_negatives else "")
        )

