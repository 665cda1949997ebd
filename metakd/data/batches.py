"""Seeded batches of the meta-trainer: every batch is a pure function of (seed, step).

Epoch e shuffles D_train with a generator seeded by (seed, 0, e); step s of the epoch takes rows
[s·B, (s+1)·B) of that permutation (the last batch may be shorter; full batch when B is None).
The random train transform of step s (``data.augment``, ``data.train_transform``) draws from (seed, 2, s) and the validation batch of a meta step at s from
(seed, 1, s). So a hypergradient can look ahead at the batches the next η real steps will
consume, and a resumed run sees the same batches without any stream state in its checkpoint.

A batch's teacher logits come from its :class:`~metakd.data.targets.TeacherTargets`, asked with the
batch's example ids and the student's input *as fed* (after augmentation): a cached table by id when the
inputs are deterministic, the live teacher on the augmented tensor otherwise (:mod:`metakd.data.targets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from metakd.data.loader import step_loader
from metakd.data.targets import TeacherTargets, as_targets

if TYPE_CHECKING:
    from collections.abc import Mapping

    from metakd.data import Splits

__all__ = ["Batch", "BatchStream", "derive_seed"]


class Batch(tuple):  # type: ignore[type-arg]
    """A train batch: the tuple ``(x, y, teacher logits or None)`` (``x, y, t = batch``), and ``ids``, the
    LongTensor (B,) of its examples' rows in D_train (what per-sample metaparameters are indexed by;
    None for a batch made without them, e.g. a plain tuple given to the library)."""

    ids: Tensor | None

    def __new__(cls, x: Tensor, y: Tensor, t: Tensor | None, ids: Tensor | None = None) -> Batch:
        batch = super().__new__(cls, (x, y, t))
        batch.ids = ids
        return batch

    def map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """The batch with ``fn`` applied to each tensor, ids too (e.g. a rank's shard of every one)."""
        x, y, t = self
        ids = None if self.ids is None else fn(self.ids)
        return Batch(fn(x), fn(y), None if t is None else fn(t), ids)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Batch, (*self, self.ids))


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed for the stream named by ``parts`` (e.g. (run seed, stream, step))."""
    seq = np.random.SeedSequence([int(p) % 2**63 for p in parts])
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


class BatchStream:
    """Train batches (x, y, teacher logits) and validation batches of one run.

    ``teacher``: the :class:`~metakd.data.targets.TeacherTargets` of the batches (or a (N, K) table / the
    ``{"train", ...}`` logits, taken as cached logits), None without a teacher. The batches are transformed by
    ``splits.train_transform`` (``data.train_transform``), else with ``augment`` by ``data.augment``'s crop +
    flip; either needs a live teacher: cached logits of the stored inputs are not the targets of transformed
    ones.
    """

    def __init__(
        self,
        splits: Splits,
        teacher: TeacherTargets | Mapping[str, Tensor] | Tensor | None,
        *,
        seed: int,
        batch_size: int | None,
        val_batch_size: int | None = None,
        augment: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.splits = splits
        self.teacher = as_targets(teacher)
        self.transform = splits.train_transform
        if self.transform is None and augment:
            from metakd.data.transforms import CropFlip  # pulls in torchvision; import on demand

            self.transform = CropFlip()
        if self.transform is not None and self.teacher is not None and not self.teacher.live:
            raise ValueError(
                "augmented batches need the live teacher (metakd.data.targets.LiveTeacher): cached "
                "logits are the teacher's outputs on the un-augmented images"
            )
        self.seed = seed
        self.n = int(splits.train.y.shape[0])
        self.batch_size = self.n if batch_size is None else min(batch_size, self.n)
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        self.val_batch_size = val_batch_size
        self.augment = self.transform is not None
        self._perms: dict[int, Tensor] = {}
        self._cache: dict[int, Batch] = {}
        # streamed train inputs (data.in_memory): this rank's rows, loaded ahead (metakd.data.loader)
        self.loader = step_loader(splits.train.x, self._perm, self.batch_size, shard)
        self.sharded = self.loader is not None  # its batches are this rank's shard already
        # a streamed shard is transformed as this rank's rows of the step's batch (data.augment: the
        # very crops of one process; a per-row transform: draws of its own, metakd.data.transforms)
        self._shard = shard if self.sharded else (0, 1)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def batch(self, step: int) -> Batch:
        """The train batch of 0-based ``step`` (cached until :meth:`consumed`)."""
        if step in self._cache:
            return self._cache[step]
        tr = self.splits.train
        x, y, idx = tr.x, tr.y, None
        if self.loader is not None:
            idx, x = self.loader(step)
            y = y if idx is None else y[idx]
        elif self.batch_size < self.n:
            epoch, j = divmod(step, self.steps_per_epoch)
            idx = self._perm(epoch)[j * self.batch_size : (j + 1) * self.batch_size].to(x.device)
            x, y = x[idx], y[idx]
        if self.transform is not None:
            seed = derive_seed(self.seed, 2, step)
            if self._shard[1] > 1 and getattr(self.transform, "shard_exact", False):
                x = self.transform(x, seed, self._shard)  # type: ignore[call-arg]
            else:  # one process, or per-row draws: each rank a seed of its own
                x = self.transform(
                    x, derive_seed(seed, *self._shard) if self._shard[1] > 1 else seed
                )
        # the teacher's targets of the tensor the student is fed (the same one the look-ahead unrolls)
        t = self.teacher(idx, x) if self.teacher is not None else None
        ids = torch.arange(self.n, device=x.device) if idx is None else idx
        batch = self._cache[step] = Batch(x, y, t, ids)
        return batch

    def consumed(self, step: int) -> None:
        """Forget cached batches up to and including ``step``."""
        self._cache = {k: v for k, v in self._cache.items() if k > step}

    def val_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The validation batch of a meta step at ``step`` (all of D_val when the size is None)."""
        v = self.splits.val
        n, vb = int(v.y.shape[0]), self.val_batch_size
        if vb is None or vb >= n:
            return v.x, v.y
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 1, step))
        idx = torch.randperm(n, generator=gen)[:vb].to(v.x.device)
        return v.x[idx], v.y[idx]
