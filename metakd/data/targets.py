"""The teacher's targets of a train batch: the (B, K) logits the distillation loss compares with.

:class:`BatchStream <metakd.data.batches.BatchStream>` asks one :class:`TeacherTargets` for them with the
batch's example ids and the very tensor the student is fed (after augmentation):

* :class:`CachedLogits` — a table of the teacher's logits on D_train (:func:`metakd.data.teacher.teacher_logits`,
  computed once and cached on disk), indexed by example id. Right only when the student's inputs are the
  stored ones: a deterministic input pipeline (:func:`deterministic_inputs`).
* :class:`LiveTeacher` — the teacher ``nn.Module`` itself, run in eval mode under ``torch.no_grad()`` on the
  fed tensor, every batch. What a random input pipeline (``data.augment``) needs: the target of an augmented
  image is the teacher's output on that augmented image, not on the original.

Both are pure functions of their inputs (a teacher in eval mode is deterministic), so a batch — and a
resumed run — stays a function of (seed, step). :func:`metakd.runs.build.build` chooses one from the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from metakd.config import DataConfig

__all__ = ["CachedLogits", "LiveTeacher", "TeacherTargets", "as_targets", "deterministic_inputs"]


def deterministic_inputs(cfg: DataConfig) -> bool:
    """Whether the student sees exactly the stored train inputs (no random transform of a batch):
    then the teacher's logits can be computed once and cached, else the teacher runs live. Any
    ``data.train_transform`` counts as random."""
    return not cfg.augment and cfg.train_transform is None


class TeacherTargets:
    """``targets(indices, x) -> (B, K)``: the teacher's logits for the batch of example ids ``indices``
    (None: the whole train split in order) whose student input is ``x`` (as fed, after augmentation)."""

    #: True when the targets are computed from ``x`` (so they follow any augmentation of it)
    live: bool = False

    def __call__(self, indices: Tensor | None, x: Tensor) -> Tensor:
        raise NotImplementedError


class CachedLogits(TeacherTargets):
    """Rows of a precomputed (N, K) table of the teacher's logits on D_train, by example id."""

    live = False

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def __call__(self, indices: Tensor | None, x: Tensor) -> Tensor:
        return self.logits if indices is None else self.logits[indices]


class LiveTeacher(TeacherTargets):
    """The teacher module evaluated on the fed batch: eval mode, ``torch.no_grad()``, float32 logits on the
    device of ``x`` (the module is moved there once). ``autocast``: run its forward under
    ``torch.autocast`` to that dtype (``train.precision``, :func:`metakd.training.precision.autocast_dtype`);
    the logits are cast back to float32."""

    live = True

    def __init__(self, module: nn.Module, *, autocast: torch.dtype | None = None) -> None:
        self.autocast = autocast
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, indices: Tensor | None, x: Tensor) -> Tensor:
        if self.module.training:  # someone switched it back: a teacher is only ever evaluated
            self.module.eval()
        first = next(self.module.parameters(), None)
        if first is not None and first.device != x.device:
            self.module.to(x.device)
        if self.autocast is None:
            return self.module(x).float()
        with torch.autocast(x.device.type, dtype=self.autocast):
            out = self.module(x)
        return out.float()


def as_targets(
    teacher: TeacherTargets | Mapping[str, Tensor] | Tensor | None,
) -> TeacherTargets | None:
    """A :class:`TeacherTargets` from what a caller holds: itself, the ``{"train", "val", "test"}``
    logits of :func:`metakd.data.teacher.teacher_logits` (their ``train`` table), or one (N, K) table."""
    if teacher is None or isinstance(teacher, TeacherTargets):
        return teacher
    if isinstance(teacher, Tensor):
        return CachedLogits(teacher)
    return CachedLogits(teacher["train"])
