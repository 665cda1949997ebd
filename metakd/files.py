"""Files that are never half-written: atomic writes, and the readers of a run's config and summary.

Every file metakd writes that a crash must not truncate — summaries, checkpoints, teacher and logit
caches, reports — goes through :func:`atomic_write_bytes` (a temporary file in the same folder,
fsync, then ``os.replace``, atomic on POSIX). A full disk raises :class:`DiskFullError` naming the
file. This module sits at the bottom of the floors (docs/architecture.md): the data floor's caches,
the run directory (:mod:`metakd.runs.rundir`) and the reports all use it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from metakd.config import ConfigError

__all__ = [
    "DiskFullError",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "disk_full",
    "file_mode",
    "file_sha256",
    "raise_if_full",
    "read_config_file",
    "read_summary_file",
]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """Writing ``filename`` failed because its file system is full (ENOSPC) or over quota (EDQUOT)."""


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` in ``exc`` or its chain (torch.save wraps it in a RuntimeError)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _FULL:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def raise_if_full(exc: BaseException, path: Path) -> None:
    full = disk_full(exc)
    if full is not None and not isinstance(exc, DiskFullError):
        raise DiskFullError(full.errno, os.strerror(full.errno or errno.ENOSPC), str(path)) from exc


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` as a mapping; :class:`ConfigError` naming the file when it is
    empty, unreadable, not UTF-8, not YAML or not a mapping (a run never falls back to defaults)."""
    path = Path(path)
    fix = "restore it (e.g. from a copy of the run) or start a new run with a new --out"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {fix}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}; {fix}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = (str(exc).strip().splitlines() or ["YAML error"])[0]
        raise ConfigError(f"{path} is not valid YAML ({first}); {fix}") from None
    if data is None:
        raise ConfigError(f"{path} is empty, so the run's config is lost; {fix}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a {type(data).__name__}, not the run's config (a mapping of keys); {fix}"
        )
    return data


def file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise_if_full(exc, path)
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        raise_if_full(exc, path)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` atomically (caches and checkpoints are never left half-written)."""
    import torch  # here, not at the top: the command line's config and error paths import this module

    _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def read_summary_file(path: str | Path) -> dict[str, Any]:
    """A summary.json as a dict; ``ValueError`` naming the file when it is not UTF-8 JSON of a mapping."""
    path = Path(path)
    fix = "delete it to rerun the run (metakd train --resume RUN_DIR), or restore it"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {fix}"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a run summary; {fix}")
    return data


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (teacher checkpoints and weights files)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
