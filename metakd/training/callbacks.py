"""Hooks of a run (:class:`Callback`): progress bars, W&B, tests and users subclass it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metakd.config import Config

__all__ = ["Callback"]


class Callback:
    """Hooks of a run; every method is a no-op by default.

    :func:`metakd.runs.run.train_run` calls ``on_run_start``/``on_run_end``. The :class:`Trainer` hands
    each metrics row to exactly one hook: ``on_eval`` for rows with evaluations, ``on_step`` otherwise.
    """

    def teacher_progress(
        self, epochs: int
    ) -> AbstractContextManager[Callable[[int, dict[str, Any]], None] | None] | None:
        """A context giving the ``progress(epoch, row)`` callback of an in-process teacher's training
        (:func:`metakd.data.teacher.train_teacher`, ``epochs`` long) before the run starts; None: no display."""
        return None

    def on_run_start(self, cfg: Config, run_dir: Path | None, info: Mapping[str, Any]) -> None:
        """Before the first step (``info``: data info, device, steps per epoch, resumed step)."""

    def on_step(self, row: Mapping[str, Any]) -> None:
        """One metrics row without evaluations (docs/architecture.md format)."""

    def on_eval(self, row: Mapping[str, Any]) -> None:
        """A metrics row that also carries val/test accuracy and loss."""

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        """After the run (``summary``: the summary.json dict)."""
