"""The run's progress bar fits the terminal: fields are dropped by priority, numbers are never cut."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from metakd.reporting.progress import ProgressCallback, _new_progress, _short_label, format_meta

_THREE = {"beta1": 0.8012, "beta2": 0.03541, "temperature": 9.4937}
_PER_CLASS = {"beta1": [0.1 * k + 0.05 for k in range(10)], "beta2": 0.03541, "temperature": 9.4937}


def _bar_line(width: int, meta: dict, total: int = 20000, step: int = 200) -> str:
    """The bar of a run at ``step`` of ``total`` (epoch 200, optimize phase, accuracies known) as a
    terminal of ``width`` columns draws it."""
    console = Console(file=io.StringIO(), force_terminal=True, width=width, record=True,
                      color_system=None, legacy_windows=False)  # fmt: skip
    progress = _new_progress(console)  # not started: the test prints its one frame itself
    cb = ProgressCallback(total, console=console, progress=progress, description="hypergrad seed 0")
    cb.on_run_start(None, None, {"total_steps": total})  # type: ignore[arg-type]
    cb.on_eval({"step": step, "epoch": 200, "phase": "optimize", "meta": meta,
                "val_accuracy": 0.6351, "test_accuracy": 0.6122})  # fmt: skip
    console.print(progress.get_renderable())
    lines = [ln for ln in console.export_text().splitlines() if "200/20000" in ln]
    assert lines, console.export_text()
    return lines[-1]


def _numbers_whole(line: str) -> None:
    assert not re.search(r"[0-9.]…|…[0-9.]", line), line  # no number cut by an ellipsis


@pytest.mark.parametrize("meta", [_THREE, _PER_CLASS], ids=["three λ", "per-class λ"])
def test_bar_fits_80_columns_with_whole_numbers(meta):
    line = _bar_line(80, meta)
    assert len(line.rstrip()) <= 80, line
    _numbers_whole(line)
    assert "200/20000" in line
    lam = format_meta(meta)
    assert lam in line  # λ whole (it fits at 80 columns), never a part of it
    assert "…" not in line


@pytest.mark.parametrize("width", [40, 50, 60, 70, 80, 90, 100])
def test_narrow_terminals_drop_fields_whole(width):
    line = _bar_line(width, _THREE)
    assert len(line.rstrip()) <= width, line
    _numbers_whole(line)
    lam = format_meta(_THREE)
    for part in lam.split():  # λ entirely or not at all
        assert (part in line) == (lam in line), line


@pytest.mark.parametrize("meta", [_THREE, _PER_CLASS], ids=["three λ", "per-class λ"])
def test_bar_at_120_columns_shows_everything(meta):
    line = _bar_line(120, meta)
    assert len(line.rstrip()) <= 120, line
    for part in ("hypergrad seed 0", "200/20000", "ep 200", "optimize", format_meta(meta),
                 "val 0.635 test 0.612", "ETA"):  # fmt: skip
        assert part in line, (part, line)
    _numbers_whole(line)


def test_short_labels_never_cut_a_number():
    assert _short_label("hypergrad seed 0") == "hypergrad s0"
    assert _short_label("a-very-long-method-name seed 12345").endswith("…")
    assert _short_label("method 123456789012345", limit=12) == "method…"
