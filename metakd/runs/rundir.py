"""The run directory: resolved config, metrics, summary, checkpoints and the run log.

Layout (docs/architecture.md)::

    <run>/config.yaml          fully resolved config (refused if a different one is already there)
    <run>/metrics.jsonl        one JSON object per logged step, appended and flushed
    <run>/summary.json         written atomically (write to a temporary file, then os.replace)
    <run>/checkpoints/epoch-XXXXX.pt   atomic; the newest two are kept
    <run>/run.log              a logging.FileHandler on the ``metakd`` logger while attached

    <run>/.lock                held (``fcntl.flock``) by the process writing the run; holds its PID

A crash (even SIGKILL) never leaves a truncated summary or checkpoint: both are written to a
temporary file in the same directory and renamed over the target, which is atomic on POSIX; a
temporary file orphaned by a kill is removed when the run is resumed. A full disk raises
:class:`DiskFullError` naming the file that could not be written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import ValidationError

from metakd.config import Config, ConfigError, config_to_dict
from metakd.files import (
    DiskFullError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    disk_full,
    file_mode,
    raise_if_full,
    read_config_file,
    read_summary_file,
)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not locked there
    fcntl = None  # type: ignore[assignment]

__all__ = [  # the atomic writers and readers are re-exported: their home is metakd.files
    "DiskFullError",
    "RunDir",
    "RunDirLockedError",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "lock_dir",
    "read_config_file",
    "read_summary_file",
]

LOCK_NAME = ".lock"

_CKPT = re.compile(r"^epoch-(\d{5,})\.pt$")
_ORPHAN = re.compile(r"^\..+\.tmp$")  # what _atomic_write's mkstemp names look like


class RunDir:
    """One run's directory (created if missing).

    >>> rd = RunDir("runs/demo")            # doctest: +SKIP
    >>> rd.write_config(cfg); rd.append_metrics({"step": 1, "train_loss": 0.7})  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"run directory {str(self.path)!r} is a file; pass another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.path / "checkpoints"
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.log_path = self.path / "run.log"
        self.log = logging.getLogger("metakd.runs.run")
        self._metrics_fh: IO[str] | None = None

    # ------------------------------------------------------------------ config
    def read_config(self) -> dict[str, Any]:
        """config.yaml as a mapping (:func:`read_config_file`: refused when empty or unreadable)."""
        return read_config_file(self.config_path)

    def write_config(self, cfg: Config, *, resume: bool = False, overwrite: bool = False) -> None:
        """Write config.yaml; a *different* config already there is refused unless ``resume`` (or
        ``overwrite``: the run there is started over), and an unreadable one is refused unless
        ``overwrite`` (it is the only record of what the run was)."""
        text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        if self.config_path.exists() and not overwrite:
            old = _with_current_defaults(self.read_config())
            new = config_to_dict(cfg)
            changed = sorted(_diff_keys(old, new) - {"out"})
            if changed and not resume:
                raise ConfigError(
                    f"run directory {str(self.path)!r} already holds a run with a different config "
                    f"(keys {', '.join(changed)}); pass a new --out DIR, or --resume to continue it"
                )
            if changed:
                self.log.warning("resuming with changed config keys: %s", ", ".join(changed))
        atomic_write_text(self.config_path, text)

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one JSON row to metrics.jsonl and flush it."""
        try:
            if self._metrics_fh is None:
                self._metrics_fh = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
            self._metrics_fh.write(json.dumps(row) + "\n")
            self._metrics_fh.flush()
        except OSError as exc:
            raise_if_full(exc, self.metrics_path)
            raise

    def _metric_lines(self) -> tuple[list[tuple[str, dict[str, Any]]], int]:
        """(complete rows of metrics.jsonl with their line, number of unreadable lines)."""
        rows: list[tuple[str, dict[str, Any]]] = []
        bad = 0
        for raw in self.metrics_path.read_bytes().splitlines():
            try:
                line = raw.decode("utf-8")
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad += 1  # a line cut short by a kill, or damaged bytes
                continue
            if isinstance(row, dict):
                rows.append((line, row))
            else:
                bad += 1
        return rows, bad

    def truncate_metrics(self, after_step: int, expected_rows: int | None = None) -> int:
        """Drop rows with ``step > after_step`` and any unreadable line; returns rows kept.

        ``expected_rows`` (rows written up to ``after_step``, as recorded in the checkpoint): when fewer
        are kept — the file was cut short or damaged — a warning says how many were lost.
        """
        self.close_metrics()
        if not self.metrics_path.exists():
            kept: list[str] = []
            bad = 0
        else:
            rows, bad = self._metric_lines()
            kept = [line for line, row in rows if _step(row) <= after_step]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        if expected_rows is not None and len(kept) < expected_rows:
            self.log.warning(
                "%s lost rows: it holds %d of the %d rows logged up to step %d (%d unreadable lines "
                "dropped); the run continues, and its curves have a gap there",
                self.metrics_path, len(kept), expected_rows, after_step, bad,
            )  # fmt: skip
        return len(kept)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete rows of metrics.jsonl (unreadable lines are skipped)."""
        if not self.metrics_path.exists():
            return []
        return [row for _, row in self._metric_lines()[0]]

    def close_metrics(self) -> None:
        if self._metrics_fh is not None:
            fh, self._metrics_fh = self._metrics_fh, None
            try:
                fh.close()
            except OSError as exc:  # a full disk: the write that failed already raised
                if disk_full(exc) is None:
                    raise

    # ------------------------------------------------------------------ summary
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically."""
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json (None when absent); ``ValueError`` naming the file when it is unreadable."""
        if not self.summary_path.exists():
            return None
        return read_summary_file(self.summary_path)

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest (highest epoch) first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.checkpoint_dir.iterdir()
            if (m := _CKPT.match(p.name))
        ]
        return [p for _, p in sorted(found, reverse=True)]

    def checkpoint_path(self, epoch: int) -> Path:
        """``checkpoints/epoch-XXXXX.pt``: where the checkpoint of ``epoch`` is (or would be) saved."""
        return self.checkpoint_file(self.path, epoch)

    @staticmethod
    def checkpoint_file(run_dir: Path, epoch: int) -> Path:
        """:meth:`checkpoint_path` of the run in ``run_dir``, without opening the directory (a
        reader such as a rank > 0 of a distributed run creates nothing)."""
        return Path(run_dir) / "checkpoints" / f"epoch-{epoch:05d}.pt"

    def save_checkpoint(self, state: Mapping[str, Any], epoch: int) -> Path:
        """Save ``state`` as ``checkpoints/epoch-XXXXX.pt`` atomically; keep it and the previous one.

        Older checkpoints are deleted only once the new one reads back (``weights_only=True``) with
        all of ``state``'s keys: a write that left an unreadable file (one warning) deletes nothing,
        so the last good checkpoint is never lost to a bad new one."""
        import torch  # here, not at the top: the command line imports this module for --help

        path = self.checkpoint_path(epoch)
        atomic_torch_save(dict(state), path)
        try:
            back = torch.load(path, map_location="cpu", weights_only=True)
            problem = None if isinstance(back, dict) and set(back) >= set(state) else "not all keys"
        except Exception as exc:
            problem = f"{type(exc).__name__}: {_first_line(exc)}"
        if problem is not None:
            self.log.warning(
                "checkpoint %s does not read back (%s); the older checkpoints are kept",
                path,
                problem,
            )
            return path
        for old in self.checkpoints()[2:]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, required: Sequence[str] = ()) -> dict[str, Any] | None:
        """The newest checkpoint that loads with ``weights_only=True`` and is a dict holding the keys
        ``required`` (None when there is none).

        A bad newest checkpoint (torn, empty, not a checkpoint) gives one warning and falls back to
        the previous one; when none loads, a ``ValueError`` (a user-fixable problem) names the files
        and the fix.
        """
        import torch  # here, not at the top: the command line imports this module for --help

        paths = self.checkpoints()
        errors = []
        for i, path in enumerate(paths):
            problem = None
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {_first_line(exc)}"
            else:
                if not isinstance(state, dict):
                    problem = f"holds a {type(state).__name__}, not a checkpoint dict"
                elif missing := [k for k in required if k not in state]:
                    problem = f"has no {', '.join(repr(k) for k in missing)}"
            if problem is None:
                return state
            if path.stat().st_size == 0:
                problem = "empty file (0 bytes)"
            errors.append(f"{path.name}: {problem}")
            nxt = paths[i + 1].name if i + 1 < len(paths) else "nothing"
            # logged once (stderr through the CLI's handler, and run.log), not also warnings.warn
            self.log.warning(
                "checkpoint %s is corrupt or unreadable (%s); falling back to %s",
                path,
                problem,
                nxt,
            )
        if errors:
            raise ValueError(
                f"no valid checkpoint in {str(self.checkpoint_dir)!r} ({'; '.join(errors)}); "
                "start the run again with a new --out DIR"
            )
        return None

    def remove_orphans(self) -> list[Path]:
        """Delete temporary files (``.NAME.*.tmp``) that a kill during an atomic write left in the run
        directory and ``checkpoints/``; returns them. Call only while holding :meth:`lock`."""
        removed = []
        for folder in (self.path, self.checkpoint_dir):
            if folder.is_dir():
                for p in sorted(folder.iterdir()):
                    if _ORPHAN.match(p.name) and p.is_file():
                        p.unlink(missing_ok=True)
                        removed.append(p)
        if removed:
            self.log.info(
                "removed %d temporary file(s) left by an interrupted write: %s",
                len(removed), ", ".join(p.name for p in removed),
            )  # fmt: skip
        return removed

    def lock(self) -> AbstractContextManager[None]:
        """:func:`lock_dir` on this run directory (held while a process writes the run)."""
        return lock_dir(self.path)

    # ------------------------------------------------------------------ log
    @contextmanager
    def attach_log(self, level: int = logging.INFO) -> Iterator[logging.Logger]:
        """Route the ``metakd`` logger to run.log while the block runs."""
        handler = _RunLogHandler(self.log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("metakd")
        old_level = root.level
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > level:
            root.setLevel(level)
        try:
            yield self.log
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            handler.close()

    def close(self) -> None:
        self.close_metrics()


@contextmanager
def lock_dir(directory: str | Path) -> Iterator[None]:
    """Hold ``directory/.lock`` while the block runs; :class:`RunDirLockedError` naming the holder's
    PID when another process holds it.

    ``fcntl.flock`` (the kernel drops the lock when its holder dies, even by SIGKILL, so no stale
    lock needs breaking). Written with fcntl rather than ``filelock``: the holder writes its PID
    into the lock file, and filelock opens the file with O_TRUNC on every attempt, which would
    erase it. Without fcntl (Windows) directories are not locked.
    """
    if fcntl is None:
        yield
        return
    directory = Path(directory)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise RunDirLockedError(
                f"{directory} is in use by another metakd process (PID {holder}); wait for it to "
                "finish (or stop it), or pass another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunDirLockedError(RuntimeError):
    """The run directory is held by another process (its PID in the message)."""


class _RunLogHandler(logging.FileHandler):
    """run.log; a failed write (a full disk) switches it off instead of printing logging's traceback
    on stderr for every record — the run's next write of its own reports the problem once."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            self.broken = True


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters (its type when empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _step(row: Mapping[str, Any]) -> float:
    try:
        return float(row.get("step", 0))
    except (TypeError, ValueError):
        return 0.0


def _with_current_defaults(old: Any) -> Any:
    """A stored config with the keys added to :class:`Config` since it was written filled in with
    their defaults, so that a run resumed after an upgrade is not reported as changed when the new key
    keeps its default; a config that no longer validates is compared as written."""
    if not isinstance(old, dict):
        return old
    try:
        return config_to_dict(Config.model_validate(old))
    except ValidationError:
        return old


def _diff_keys(old: Any, new: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: set[str] = set()
        for key in set(old) | set(new):
            out |= _diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return set() if old == new else {prefix.rstrip(".")}
