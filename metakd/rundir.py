"""The run directory: resolved config, metrics, summary, checkpoints and the run log.

Layout (docs/architecture.md)::

    <run>/config.yaml          fully resolved config (refused if a different one is already there)
    <run>/metrics.jsonl        one JSON object per logged step, appended and flushed
    <run>/summary.json         written atomically (write to a temporary file, then os.replace)
    <run>/checkpoints/epoch-XXXXX.pt   atomic; the newest two are kept
    <run>/run.log              a logging.FileHandler on the ``metakd`` logger while attached

A crash (even SIGKILL) never leaves a truncated summary or checkpoint: both are written to a
temporary file in the same directory and renamed over the target, which is atomic on POSIX.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import yaml
from pydantic import ValidationError

from metakd.config import Config, ConfigError, config_to_dict

__all__ = ["RunDir", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text"]

_CKPT = re.compile(r"^epoch-(\d{5,})\.pt$")


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` atomically (caches and checkpoints are never left half-written)."""
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


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
        self.log = logging.getLogger("metakd.run")
        self._metrics_fh: IO[str] | None = None

    # ------------------------------------------------------------------ config
    def write_config(self, cfg: Config, *, resume: bool = False) -> None:
        """Write config.yaml; a *different* config already there is refused unless ``resume``."""
        text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        if self.config_path.exists():
            old = _with_current_defaults(yaml.safe_load(self.config_path.read_text()) or {})
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
        if self._metrics_fh is None:
            self._metrics_fh = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics_fh.write(json.dumps(row) + "\n")
        self._metrics_fh.flush()

    def truncate_metrics(self, after_step: int) -> int:
        """Drop rows with ``step > after_step`` and any partially written line; returns rows kept."""
        self.close_metrics()
        if not self.metrics_path.exists():
            return 0
        kept: list[str] = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and int(row.get("step", 0)) <= after_step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        return len(kept)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete rows of metrics.jsonl."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def close_metrics(self) -> None:
        if self._metrics_fh is not None:
            self._metrics_fh.close()
            self._metrics_fh = None

    # ------------------------------------------------------------------ summary
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically."""
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        data: dict[str, Any] = json.loads(self.summary_path.read_text(encoding="utf-8"))
        return data

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
        return self.checkpoint_dir / f"epoch-{epoch:05d}.pt"

    def save_checkpoint(self, state: Mapping[str, Any], epoch: int) -> Path:
        """Save ``state`` as ``checkpoints/epoch-XXXXX.pt`` atomically; keep it and the previous one."""
        path = self.checkpoint_path(epoch)
        atomic_torch_save(dict(state), path)
        for old in self.checkpoints()[2:]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads with ``weights_only=True`` (None when there is none).

        A corrupt newest checkpoint gives a warning and falls back to the previous one; when none
        loads, a ``ValueError`` (a user-fixable problem) names the files and the fix.
        """
        paths = self.checkpoints()
        errors = []
        for i, path in enumerate(paths):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                errors.append(
                    f"{path.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                )
                nxt = paths[i + 1].name if i + 1 < len(paths) else "nothing"
                msg = f"checkpoint {path} is corrupt or unreadable ({errors[-1]}); falling back to {nxt}"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                self.log.warning(msg)
                continue
            if not isinstance(state, dict):
                errors.append(f"{path.name}: not a checkpoint dict")
                continue
            return state
        if errors:
            raise ValueError(
                f"no valid checkpoint in {str(self.checkpoint_dir)!r} ({'; '.join(errors)}); "
                "start the run again with a new --out DIR"
            )
        return None

    # ------------------------------------------------------------------ log
    @contextmanager
    def attach_log(self, level: int = logging.INFO) -> Iterator[logging.Logger]:
        """Route the ``metakd`` logger to run.log while the block runs."""
        handler = logging.FileHandler(self.log_path, encoding="utf-8")
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
