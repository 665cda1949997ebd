"""Reading run directories: the :class:`Run` record and the run finder behind every report.

Reads only the run-directory files fixed in ``docs/architecture.md`` (``metrics.jsonl``,
``summary.json``, ``config.yaml``), so it works offline on runs from any machine. Runs are grouped by
method (``summary["label"]`` when the experiment runner set one, e.g. ``optimal``, else
``summary["method"]``), in :data:`METHOD_ORDER`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metakd.files import read_config_file, read_summary_file

__all__ = [
    "METHOD_ORDER",
    "Run",
    "find_runs",
    "load_run",
    "load_runs",
    "method_of",
]

METHOD_ORDER = ("baseline", "random", "fixed", "hypergrad", "forecast", "optimal")
"""Canonical order of methods in tables and legends; other labels follow alphabetically."""


log = logging.getLogger(__name__)


def method_of(summary: Mapping[str, Any]) -> str:
    """The group a run belongs to: ``summary["label"]`` (set by the experiment runner, e.g.
    ``optimal`` for a fixed-λ retrain) if present, else ``summary["method"]``."""
    return str(summary.get("label") or summary.get("method") or "unknown")


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _scalar(value: Any) -> float | None:
    """A metric as a float; lists (non-scalar metaparameters) become their mean; None stays None."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=float)
    return float(arr.mean()) if arr.size else None


@dataclass
class Run:
    """One finished run directory: its summary, resolved config and metrics rows (in file order)."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def method(self) -> str:
        return method_of(self.summary)

    @property
    def base_method(self) -> str:
        """The trainer's method (``fixed`` for an ``optimal`` retrain)."""
        meta = self.config.get("meta") or {}
        return str(self.summary.get("method") or meta.get("method") or "unknown")

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    def series(self, key: str, sub: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Steps ``(S,)`` and values ``(S,)`` of rows where ``row[key]`` (or ``row[key][sub]``) is
        set, sorted by step; a step logged twice (a resumed run) keeps its last row."""
        by_step: dict[float, float] = {}
        for row in self.rows:
            value = row.get(key)
            if sub is not None:
                value = value.get(sub) if isinstance(value, Mapping) else None
            scalar = _scalar(value)
            if scalar is not None and "step" in row:
                by_step[float(row["step"])] = scalar
        steps = np.array(sorted(by_step), dtype=float)
        return steps, np.array([by_step[s] for s in steps], dtype=float)

    def setting(self, key: str) -> Any:
        """A config value by dotted key (``forecast.window``), falling back to the summary's key."""
        node: Any = self.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node if node is not None else self.summary.get(key.rsplit(".", 1)[-1])


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    rows: list[dict[str, Any]] = []
    fix = "repair or delete that line (or resume the run, which drops unreadable lines)"
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{i} is not UTF-8 text ({exc.reason}); {fix}") from None
        except json.JSONDecodeError as exc:
            if i == len(lines):  # a run killed mid-write leaves a truncated last line
                break
            raise ValueError(f"{path}:{i} is not a JSON metrics row ({exc}); {fix}") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: str | Path) -> Run:
    """Read one run directory (``summary.json`` required; ``config.yaml``/``metrics.jsonl`` optional)."""
    path = Path(path)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} does not exist: {path} is not a finished run directory"
        )
    summary = read_summary_file(summary_path)  # ValueError naming the file and the fix
    config_path = path / "config.yaml"
    config = read_config_file(config_path) if config_path.is_file() else {}
    return Run(path, summary, config, _read_metrics(path / "metrics.jsonl"))


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: each is a run directory (has ``summary.json``) or a
    directory searched recursively for them. Unfinished runs (no ``summary.json``) are not included."""
    found: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if (p / "summary.json").is_file():
            found[p.resolve()] = None
        elif p.is_dir():
            hits = sorted(s.parent.resolve() for s in p.rglob("summary.json"))
            if not hits:
                raise FileNotFoundError(
                    f"no finished runs (summary.json) under {p}; pass a run or experiment directory"
                )
            found.update(dict.fromkeys(hits))
        else:
            raise FileNotFoundError(
                f"{p} does not exist or is not a directory; pass a run directory (with summary.json) "
                "or an experiment directory holding run directories"
            )
    return list(found)


def load_runs(
    paths: Iterable[str | Path], *, skipped: list[tuple[Path, str]] | None = None
) -> list[Run]:
    """:func:`load_run` on every run found by :func:`find_runs`, sorted by (method, seed, path).

    With ``skipped`` (a list), an unreadable run (damaged summary.json, config.yaml or metrics.jsonl)
    is left out with a warning naming the file, and appended there as ``(path, reason)``; without
    it, the first unreadable run raises its ``ValueError``."""
    runs = []
    for p in find_runs(paths):
        try:
            runs.append(load_run(p))
        except (ValueError, OSError) as exc:  # ConfigError is a ValueError
            if skipped is None:
                raise
            reason = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror}: {exc.filename}"
            log.warning("skipped the unreadable run %s: %s", p, reason)
            skipped.append((p, reason))
    return sorted(runs, key=lambda r: (_method_key(r.method), str(r.seed), str(r.path)))
