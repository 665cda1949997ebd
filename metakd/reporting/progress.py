"""Progress display for runs and experiments (rich, always on stderr).

:class:`ProgressCallback` is a trainer callback that draws one bar per run with the step count,
epoch, phase (train / optimize / predict), the current λ, the last validation and test accuracy,
elapsed time and ETA. :class:`ExperimentProgress` adds a bar over the runs of an experiment
(runs done / total) and hands out one :class:`ProgressCallback` per run.

Progress never goes to stdout, so ``metakd train ... | jq`` sees only results. When stderr is not
a terminal (a log file, CI) the bar is replaced by a plain line at most every 10% of the run;
``quiet=True`` shows nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from metakd.training.trainer import Callback

if TYPE_CHECKING:
    from metakd.config import Config

__all__ = [
    "ExperimentProgress",
    "ProgressCallback",
    "TeacherProgress",
    "estimate_total_steps",
    "format_meta",
    "stderr_console",
]

_SHORT = {"beta1": "β1", "beta2": "β2", "temperature": "T"}
_START_KEYS = ("start_step", "resumed_step", "step")  # where a resumed run's bar starts


def stderr_console() -> Console:
    """The console all progress and messages go to (stdout is kept for results)."""
    return Console(stderr=True)


def estimate_total_steps(cfg: Config) -> int:
    """Training steps of a run: ``epochs · ceil(n_train / batch_size)`` (one step per epoch when
    full batch)."""
    per_epoch = 1
    if cfg.train.batch_size is not None:
        per_epoch = max(1, math.ceil(cfg.data.n_train / cfg.train.batch_size))
    return cfg.train.epochs * per_epoch


def _flat(value: Any) -> list[Any]:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def format_meta(meta: Mapping[str, Any] | None) -> str:
    """``{"beta1": 0.4, "temperature": 2.1}`` -> ``"β1=0.400 T=2.10"`` (lists: their mean, ``~``)."""
    if not meta:
        return ""
    parts = []
    for name, value in meta.items():
        short = _SHORT.get(name, name)
        if isinstance(value, (list, tuple)):  # a vector or a matrix (meta-weight network)
            nums = [float(v) for v in _flat(value)]
            value = sum(nums) / len(nums) if nums else float("nan")
            short += "~"
        parts.append(f"{short}={float(value):.3g}")
    return " ".join(parts)


def _acc(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float)) else "-"


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _short_label(label: str, limit: int = 14) -> str:
    """``hypergrad seed 0`` -> ``hypergrad s0``; longer ones cut to ``limit`` cells with ``…``, never
    inside a number (the cut moves back before its digits)."""
    short = re.sub(r"\bseed (\d+)", r"s\1", label)
    if len(short) <= limit:
        return short
    cut = limit - 1
    while (
        cut > 0 and (short[cut - 1].isdigit() or short[cut - 1] in ".-+e") and short[cut].isdigit()
    ):
        cut -= 1
    return short[:cut].rstrip() + "…"


class _RunLine(ProgressColumn):
    """A run's whole bar line, fitted to the console's width: fields are dropped by priority, never cut.

    Richest first: label, bar (24 cells), steps, ``ep N``, phase, λ, ``val … test …``, elapsed and ETA.
    When the line is wider than the console the layouts give up, in order: the bar's width down to 8
    cells, elapsed/ETA, the phase word, the full label (``hypergrad seed 0`` -> ``hypergrad s0``), the
    epoch, the accuracies, λ (with the bar down to 4 cells), the label; the steps ``200/20000`` stay. Each field is whole
    or absent (rich would otherwise cut every column with ``…``, numbers too)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    @staticmethod
    def _layouts(task: Task) -> list[tuple[str, int, list[tuple[str, str]]]]:
        """(label, bar width, [(text, style)]) candidates, richest first."""
        f = task.fields
        label = str(task.description)
        steps = f"{int(task.completed)}/{int(task.total or 0)}"
        epoch = f"ep {f.get('epoch', '-')}" if f.get("epoch", "-") != "-" else ""
        phase = str(f.get("phase") or "")
        meta = str(f.get("meta") or "")
        val, test = f.get("val", "-"), f.get("test", "-")
        acc = f"val {val} test {test}" if (val, test) != ("-", "-") else ""
        times = f"{_clock(task.elapsed)} ETA {_clock(task.time_remaining)}"
        short = _short_label(label)
        plan = [  # (label, bar, epoch, phase, meta, acc, times)
            (label, 24, True, True, True, True, True),
            (label, 8, True, True, True, True, True),
            (label, 8, True, True, True, True, False),
            (label, 8, True, False, True, True, False),
            (short, 8, True, False, True, True, False),
            (short, 8, False, False, True, True, False),
            (short, 8, False, False, True, False, False),
            (short, 4, False, False, False, False, False),
            ("", 4, False, False, False, False, False),
        ]
        out = []
        for lab, bar, ep, ph, me, ac, ti in plan:
            parts = [(steps, "progress.download")]
            parts += [(epoch, "")] if ep else []
            parts += [(phase, "cyan")] if ph else []
            parts += [(meta, "")] if me else []
            parts += [(acc, "")] if ac else []
            parts += [(times, "progress.elapsed")] if ti else []
            out.append((lab, bar, [(t, st) for t, st in parts if t]))
        return out

    def render(self, task: Task) -> Table:
        width = self.console.width
        layouts = self._layouts(task)
        for label, bar, parts in layouts:
            cells = [len(label)] if label else []
            cells += [bar] + [Text(t).cell_len for t, _ in parts]
            if sum(cells) + len(cells) - 1 <= width:
                break
        grid = Table.grid(padding=(0, 1))
        row: list[Any] = []
        if label:
            grid.add_column(no_wrap=True)
            row.append(Text(label, style="bold"))
        grid.add_column(width=bar, no_wrap=True)
        row.append(ProgressBar(total=task.total, completed=task.completed, width=bar))
        text = Text(no_wrap=True)
        for i, (t, style) in enumerate(parts):
            text.append((" " if i else "") + t, style=style)
        grid.add_column(no_wrap=True)
        row.append(text)
        grid.add_row(*row)
        return grid


def _new_progress(console: Console) -> Progress:
    return Progress(_RunLine(console), console=console, transient=False)


class ProgressCallback(Callback):
    """Trainer callback drawing a run's progress bar (see the module docstring).

    ``total_steps`` None: taken from ``info["total_steps"]`` at run start, else estimated from the
    config (:func:`estimate_total_steps`). ``progress`` shares a display with other bars (used by
    :class:`ExperimentProgress`); otherwise the callback owns one and closes it at run end.
    """

    def __init__(
        self,
        total_steps: int | None = None,
        quiet: bool = False,
        *,
        console: Console | None = None,
        progress: Progress | None = None,
        description: str | None = None,
        parent: ExperimentProgress | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.quiet = quiet
        self.console = console if console is not None else stderr_console()
        self.description = description
        self.parent = parent
        self.run_dir: Path | None = None
        self.summary: Mapping[str, Any] | None = None
        self.last: dict[str, Any] = {"epoch": 0, "phase": "", "meta": "", "val": "-", "test": "-"}
        self._progress = progress
        self._own = progress is None
        self._task: TaskID | None = None
        self._plain = not self.console.is_terminal
        self._next_plain = 0.0
        self._last_printed: int | None = None

    @property
    def enabled(self) -> bool:
        return not self.quiet

    def teacher_progress(self, epochs: int) -> TeacherProgress | None:
        """A bar over an in-process teacher's epochs (plain lines while an experiment's bars are
        shown: one live display at a time)."""
        if not self.enabled:
            return None
        return TeacherProgress(epochs, console=self.console, plain=self._progress is not None)

    def on_run_start(self, cfg: Config, run_dir: Path | None, info: Mapping[str, Any]) -> None:
        """Create the bar once the total number of steps is known."""
        self.run_dir = Path(run_dir) if run_dir is not None else None
        total = self.total_steps or info.get("total_steps")
        if not total and info.get("steps_per_epoch"):
            total = int(info["steps_per_epoch"]) * cfg.train.epochs
        self.total_steps = int(total or estimate_total_steps(cfg))
        self._next_plain = 0.1 * self.total_steps
        if self.description is None:
            self.description = f"{cfg.meta.method} seed {cfg.seed}"
        start = next((int(info[k]) for k in _START_KEYS if info.get(k)), 0)
        if not self.enabled or self._plain:
            if self.enabled:
                where = f" -> {run_dir}" if run_dir is not None else ""
                self.console.print(
                    f"{self.description}: {self.total_steps} steps{where}", soft_wrap=True
                )
            return
        if self._progress is None:
            self._progress = _new_progress(self.console)
        if self._own:
            self._progress.start()
        self._task = self._progress.add_task(
            self.description, total=self.total_steps, completed=start, **self.last
        )

    def _update(self, row: Mapping[str, Any]) -> None:
        if "epoch" in row:
            self.last["epoch"] = row["epoch"]
        if row.get("phase"):
            self.last["phase"] = row["phase"]
        if row.get("meta"):
            self.last["meta"] = format_meta(row["meta"])
        if row.get("val_accuracy") is not None:
            self.last["val"] = _acc(row["val_accuracy"])
        if row.get("test_accuracy") is not None:
            self.last["test"] = _acc(row["test_accuracy"])
        if not self.enabled:
            return
        step = int(row.get("step", 0))
        if self._task is not None and self._progress is not None:
            self._progress.update(self._task, completed=step, **self.last)
        elif self._plain and self.total_steps and step >= self._next_plain:
            tenth = 0.1 * self.total_steps  # a line at each 10% of the run
            self._next_plain = (math.floor(step / tenth) + 1) * tenth
            self._print_plain(step)

    def _print_plain(self, step: int) -> None:
        self._last_printed = step
        pct = 100.0 * step / self.total_steps if self.total_steps else 0.0
        last = self.last
        self.console.print(
            f"{self.description}: step {step}/{self.total_steps} ({pct:.0f}%) epoch {last['epoch']} "
            f"{last['phase']} {last['meta']} val {last['val']} test {last['test']}",
            highlight=False,
            soft_wrap=True,
        )

    def on_step(self, row: Mapping[str, Any]) -> None:
        """Advance the bar to ``row["step"]`` and show epoch, phase and λ."""
        self._update(row)

    def on_eval(self, row: Mapping[str, Any]) -> None:
        """Show the newest validation/test accuracy."""
        self._update(row)

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        """Fill the bar, close it, and tell the experiment bar that a run finished."""
        self.summary = summary
        final = {
            "val_accuracy": summary.get("val_accuracy"),
            "test_accuracy": summary.get("test_accuracy"),
            "meta": summary.get("meta"),
            "step": summary.get("steps", self.total_steps or 0),
        }
        self._update({k: v for k, v in final.items() if v is not None})
        if self.enabled and self._task is not None and self._progress is not None:
            self._progress.update(self._task, completed=self.total_steps)
        elif self.enabled and self._plain and self._last_printed != final["step"]:
            self._print_plain(int(final["step"] or 0))
        self.close()
        if self.parent is not None:
            self.parent.advance()

    def close(self) -> None:
        """Stop an owned display (safe to call twice, e.g. after a failed run)."""
        if self._own and self._progress is not None:
            self._progress.stop()
            self._progress = None
        elif self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
        self._task = None


class _LiveBar:
    """A rich display started by ``__enter__`` (in subclasses) and stopped on exit."""

    _progress: Progress | None = None
    _task: TaskID | None = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class ExperimentProgress(_LiveBar):
    """Bar over the runs of an experiment; :meth:`run_callback` gives each run its own bar.

    Use as a context manager::

        with ExperimentProgress(total_runs=len(methods) * len(seeds)) as bar:
            run_experiment(..., callbacks_factory=lambda *a, **k: [bar.run_callback()])
    """

    def __init__(
        self, total_runs: int, quiet: bool = False, *, console: Console | None = None
    ) -> None:
        self.total_runs = total_runs
        self.quiet = quiet
        self.console = console if console is not None else stderr_console()
        self.done = 0
        self._plain = not self.console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ExperimentProgress:
        if not self.quiet and not self._plain:
            self._progress = _new_progress(self.console)
            self._progress.start()
            self._task = self._progress.add_task(
                "runs",
                total=self.total_runs,
                epoch="-",
                phase="",
                meta="",
                val="-",
                test="-",
            )
        return self

    def run_callback(self, total_steps: int | None = None) -> ProgressCallback:
        """A per-run bar sharing this display; finishing it advances the run count."""
        return ProgressCallback(
            total_steps,
            quiet=self.quiet,
            console=self.console,
            progress=self._progress,
            parent=self,
        )

    def advance(self) -> None:
        """One more run finished."""
        self.done += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.done)
        elif not self.quiet:
            self.console.print(f"runs done: {self.done}/{self.total_runs}", highlight=False)


class TeacherProgress(_LiveBar):
    """``progress(epoch, row)`` callback of :func:`metakd.data.teacher.train_teacher`: a bar over the
    teacher's epochs with its loss and test accuracy. Use as a context manager. Without a terminal
    (or ``plain=True``) it prints a line on each of the teacher's ~20 evaluation epochs instead."""

    def __init__(
        self,
        epochs: int,
        quiet: bool = False,
        *,
        console: Console | None = None,
        plain: bool = False,
    ) -> None:
        self.epochs = epochs
        self.quiet = quiet
        self.plain = plain
        self.console = console if console is not None else stderr_console()
        self.last: dict[str, Any] = {}
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> TeacherProgress:
        if not self.quiet and not self.plain and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]teacher"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} test {task.fields[test]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("teacher", total=self.epochs, loss="-", test="-")
        return self

    def __call__(self, epoch: int, row: dict[str, Any]) -> None:
        """0-based teacher ``epoch`` finished (``row``: loss, and test accuracy on evaluation epochs)."""
        self.last.update(row)
        if self._progress is not None and self._task is not None:
            loss = self.last.get("loss")
            self._progress.update(
                self._task,
                completed=epoch + 1,
                loss=f"{loss:.4f}" if isinstance(loss, float) else "-",
                test=_acc(self.last.get("test_accuracy")),
            )
        elif not self.quiet and "test_accuracy" in row:
            self.console.print(
                f"teacher: epoch {epoch + 1}/{self.epochs} loss {row.get('loss', float('nan')):.4f} "
                f"test {_acc(row['test_accuracy'])}",
                highlight=False,
                soft_wrap=True,
            )
