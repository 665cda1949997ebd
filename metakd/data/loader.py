"""The streaming path's train batches: a ``torch.utils.data.DataLoader`` that loads, step by step, exactly
the rows the in-memory path takes.

:class:`StepLoader` is what :class:`~metakd.data.batches.BatchStream` asks for the inputs of step s when
``splits.train.x`` is a :class:`~metakd.data.streaming.Rows` (a streamed split). Its batch sampler
(:class:`StepSampler`) yields, for s, s + 1, ..., the Dataset items of rows [j·B, (j+1)·B) of epoch e's
permutation (``s = e·steps_per_epoch + j``; the stream's own ``perm(e)``, seeded by (seed, 0, e)), or
every row in order for full batches; under R ranks (``shard=(rank, R)``, plain ints given by the caller:
this floor imports no training code) only this rank's rows [r·B/R, (r+1)·B/R) of them, as
:meth:`metakd.training.distributed.World.shard` would cut the batch. The workers decode each item (eval
transform) and normalise it (:meth:`~metakd.data.streaming.Rows.item`); ``data.loader`` sets
``num_workers``, ``pin_memory`` (None: on CUDA), ``prefetch_factor`` and ``persistent_workers``.

The loader runs ahead in step order (``num_workers · prefetch_factor`` batches): the η-step look-ahead asks
for steps s..s+η-1 before the real steps consume them, in increasing order, and the stream keeps each
batch until consumed, so the look-ahead and the real steps see one tensor. A step asked out of order
(a resumed run's first step, a ``check-grad`` at any step) restarts the sampler at that step: a batch is a
pure function of (seed, step), never of the loader's history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from metakd.data.streaming import Rows

__all__ = ["StepLoader", "StepSampler", "step_loader"]


class _Items(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Dataset item i, decoded and normalised (what a worker runs)."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows.items)

    def __getitem__(self, i: int) -> Tensor:
        return self.rows.item(i)


class StepSampler:
    """Batch sampler: the Dataset items of step ``start``, ``start + 1``, ... (no end)."""

    def __init__(self, items: Callable[[int], list[int]]) -> None:
        self.items, self.start = items, 0

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.items(step)
            step += 1


class StepLoader:
    """``loader(step) -> (rows, x)``: this rank's row numbers of ``step`` (None: the whole split in
    order) and their inputs on ``device``, loaded ahead by a DataLoader."""

    def __init__(
        self,
        rows: Rows,
        perm: Callable[[int], Tensor],
        batch_size: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.x, self.perm, self.batch_size = rows, perm, batch_size
        self.n = len(rows)
        self.steps_per_epoch = -(-self.n // batch_size)
        self.rank, self.size = shard
        cfg = rows.loader
        self.pin = rows.device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
        self.sampler = StepSampler(lambda s: rows.index[self.rows(s)].tolist())
        kw: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": self.pin}
        if cfg.num_workers > 0:
            kw.update(
                prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers
            )
        # default_collate stacks a worker's batch straight into shared memory (torch.stack's values);
        # a plain torch.stack there is copied into shared memory once more to cross the queue
        self.loader = torch.utils.data.DataLoader(
            _Items(rows), batch_sampler=self.sampler, collate_fn=torch.utils.data.default_collate,
            **kw,
        )  # fmt: skip
        self._it: Iterator[Tensor] | None = None
        self._next = -1

    def rows(self, step: int) -> Tensor:
        """This rank's row numbers of ``step`` (the in-memory path's rows, then the rank's shard)."""
        if self.batch_size < self.n:
            epoch, j = divmod(step, self.steps_per_epoch)
            idx = self.perm(epoch)[j * self.batch_size : (j + 1) * self.batch_size].cpu()
        else:
            idx = torch.arange(self.n)
        if self.size > 1:
            part = len(idx) // self.size
            idx = idx[self.rank * part : (self.rank + 1) * part]
        return idx

    def __call__(self, step: int) -> tuple[Tensor | None, Tensor]:
        if self._it is None or step != self._next:  # out of order: restart the sampler at ``step``
            self.sampler.start = step
            self._it = iter(self.loader)
        x = next(self._it)
        self._next = step + 1
        whole = self.batch_size >= self.n and self.size == 1
        return (None if whole else self.rows(step).to(self.x.device)), x.to(
            self.x.device, non_blocking=self.pin
        )


def step_loader(
    x: Any, perm: Callable[[int], Tensor], batch_size: int, shard: tuple[int, int] = (0, 1)
) -> StepLoader | None:
    """A :class:`StepLoader` when the train inputs ``x`` are streamed (:class:`Rows`), else None."""
    return StepLoader(x, perm, batch_size, shard) if isinstance(x, Rows) else None
