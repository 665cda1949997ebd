"""A search study's Optuna storage: opening it, checking a journal file's tail, and its errors as one line.

:func:`storage_for` opens the storage of ``--storage URL`` (None: SQLite ``<study>/study.db``;
``journal:PATH`` or ``*.journal``: Optuna's ``JournalStorage``; any other URL: ``RDBStorage``). A
journal file is checked first: a last line cut by a kill (an incomplete write) would be appended
onto and corrupt the journal, so it is refused, naming the file and the byte offset, until
``repair_journal`` truncates it (after a backup ``PATH.bak``). A journal whose directory does not
exist is refused (only the study directory itself is made).

:func:`storage_errors` turns a failing storage (a corrupt or full SQLite file, a server that cannot be
reached, a missing database driver, a corrupt journal) into one :class:`StorageError` line naming the
storage and the fix; errors of the trials' own training pass through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metakd.config import ConfigError

if TYPE_CHECKING:
    import optuna

__all__ = ["StorageError", "describe", "journal_path", "masked", "storage_errors", "storage_for"]

#: the pip command of each database driver SQLAlchemy may miss
_DRIVERS = {
    "psycopg": "pip install 'psycopg[binary]' (SQLAlchemy's driver for postgresql://; or write "
    "postgresql+psycopg2:// and pip install psycopg2-binary)",
    "psycopg2": "pip install psycopg2-binary",
    "MySQLdb": "pip install mysqlclient (or write mysql+pymysql:// and pip install pymysql)",
    "pymysql": "pip install pymysql",
}


class StorageError(ConfigError):
    """The study's storage cannot be used; the message names it and the fix (one line)."""


def journal_path(url: str | None) -> Path | None:
    """The journal file of a ``--storage`` value, None when it is not a journal."""
    if url is not None and (url.startswith("journal:") or url.endswith(".journal")):
        return Path(url.removeprefix("journal:"))
    return None


def describe(url: str | None, study_dir: Path) -> str:
    """The storage in words, for messages (a URL's password masked)."""
    journal = journal_path(url)
    if journal is not None:
        return f"the journal file {journal}"
    if url is None:
        return f"the SQLite database {study_dir / 'study.db'}"
    if url.startswith("sqlite:///"):
        return f"the SQLite database {url.removeprefix('sqlite:///')}"
    return f"the storage {masked(url)}"


def masked(text: str) -> str:
    """``text`` with the password of each URL in it replaced by ``***``."""
    return re.sub(r"://([^:/@\s]*):[^@\s]*@", r"://\1:***@", text)


def storage_for(
    url: str | None, study_dir: Path, *, repair_journal: bool = False
) -> optuna.storages.BaseStorage:
    """An Optuna storage: None → SQLite ``<study_dir>/study.db``; ``journal:PATH`` or ``*.journal``
    → ``JournalStorage`` on that file (checked by :func:`_check_journal`); any other URL →
    ``RDBStorage`` (with a heartbeat). Failures raise :class:`StorageError`."""
    import optuna

    journal = journal_path(url)
    if journal is not None:
        _journal_dir(journal, study_dir)
        with storage_errors(url, study_dir):
            _check_journal(journal, repair_journal)
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    if url is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for the lock
    elif url.startswith(("postgresql", "mysql")):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}  # fail fast
    # Workers opening a new study at once all find no tables and all create them and insert the schema
    # version (Optuna does not guard this): the losers fail with "table ... already exists" or a UNIQUE
    # constraint. A local SQLite file is opened under a file lock beside it (filelock: a well-kept
    # cross-platform lock); a server database gets a retry, as its tables exist once the winner is done.
    lock = _sqlite_lock(url)
    for attempt in range(3):
        try:
            with lock, storage_errors(url, study_dir), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=30, grace_period=120, **kwargs
                )
        except StorageError as exc:
            racing = "already exists" in str(exc) or "UNIQUE constraint" in str(exc)
            if not racing or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # the loop returns or raises


def _sqlite_lock(url: str) -> contextlib.AbstractContextManager[object]:
    """A lock file beside a local SQLite database (``study.db.lock``); a no-op for other URLs and for
    a database in a missing directory (the lock would create it)."""
    path = Path(url.removeprefix("sqlite:///"))
    if not url.startswith("sqlite:///") or not path.parent.is_dir():  # SQLite says it cannot open it
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{path}.lock", timeout=120)


def _journal_dir(journal: Path, study_dir: Path) -> None:
    """Refuse a journal whose directory does not exist or is not a directory (the study directory
    itself, and folders in it, are made)."""
    parent = journal.parent
    if parent.is_dir():
        if journal.is_dir():
            raise StorageError(
                f"--storage journal:{journal} is a directory; give a file path (e.g. "
                f"journal:{journal / 'study.journal'})"
            )
        return
    if parent.exists():
        raise StorageError(
            f"--storage journal:{journal}: {parent} is not a directory; fix the --storage path"
        )
    inside = (
        parent.resolve() == study_dir.resolve() or study_dir.resolve() in parent.resolve().parents
    )
    if not inside:
        raise StorageError(
            f"--storage journal:{journal}: the directory {parent} does not exist; create it or fix "
            "the --storage path"
        )
    parent.mkdir(parents=True, exist_ok=True)


def _torn_tail(path: Path) -> int | None:
    """Byte offset of the journal's last line when it is incomplete (no newline, or not JSON)."""
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        return None
    with path.open("rb") as f:
        pos, buf, start = size, b"", 0
        while pos > 0:  # read back to the newline before the last line
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            cut = (buf[:-1] if buf.endswith(b"\n") else buf).rfind(b"\n")
            if cut >= 0:
                start, buf = pos + cut + 1, buf[cut + 1 :]
                break
    tail = buf
    if not tail.endswith(b"\n"):
        return start
    try:
        json.loads(tail)
    except ValueError:
        return start
    return None


def _check_journal(path: Path, repair: bool) -> None:
    """Refuse (or, with ``repair``, truncate after a backup ``PATH.bak``) a journal whose last line
    is incomplete: Optuna would append onto it and corrupt the journal. Checked again under the
    journal's own lock, so a line another worker is writing right now is not taken for a torn one."""
    if _torn_tail(path) is None:
        return
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        offset = _torn_tail(path)
        if offset is None:
            return
        size = path.stat().st_size
        if not repair:
            raise StorageError(
                f"the journal file {path} ends in a torn line at byte {offset} of {size} (a write "
                "cut by a kill); rerun with --repair-journal to truncate it there (a copy is kept "
                f"as {path}.bak)"
            )
        shutil.copyfile(path, f"{path}.bak")
        with path.open("r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        import logging

        logging.getLogger(__name__).warning(
            "the journal file %s ended in a torn line at byte %d of %d: truncated there (the "
            "original is kept as %s.bak)", path, offset, size, path,
        )  # fmt: skip
    finally:
        lock.release()


def _is_storage_error(exc: BaseException) -> bool:
    """Raised by the storage: its type, or a frame of its traceback in Optuna's storages or
    SQLAlchemy (the trials' own errors pass through Optuna's study loop, never its storages)."""
    import sqlite3

    import optuna

    kinds: tuple[type[BaseException], ...] = (optuna.exceptions.StorageInternalError, sqlite3.Error)
    with contextlib.suppress(ImportError):
        import sqlalchemy.exc

        kinds = (*kinds, sqlalchemy.exc.SQLAlchemyError)
    if isinstance(exc, kinds):
        return True
    if not isinstance(exc, (ValueError, OSError, ImportError)) or isinstance(exc, StorageError):
        return False
    tb = exc.__traceback__
    while tb is not None:  # raised (or re-raised, as a journal's decode error) by the storage
        where = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/optuna/storages/" in where or "/sqlalchemy/" in where:
            return True
        tb = tb.tb_next
    return False


def _root(exc: BaseException) -> BaseException:
    """The innermost cause (SQLAlchemy's DBAPI error, Optuna's wrapped exception)."""
    seen = {id(exc)}
    while True:
        nxt = getattr(exc, "orig", None) or exc.__cause__
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _message(exc: BaseException, where: str) -> str:
    root = _root(exc)
    reason = (str(root).strip().splitlines() or [type(root).__name__])[0]
    low = reason.lower()
    if isinstance(root, ModuleNotFoundError) and root.name:
        fix = _DRIVERS.get(root.name, f"pip install {root.name}")
        return (f"{where} needs the database driver {root.name!r}, which is not installed: {fix}; "
                "or pass another --storage")  # fmt: skip
    if "disk is full" in low or getattr(root, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full (writing {where}); free some space, then run the command again "
                "(finished trials are kept)")  # fmt: skip
    if "not a database" in low or "malformed" in low:
        return (f"{where} is damaged ({reason}); move it away (or restore it from a copy) to start "
                "the study anew, or pass another --storage or --out")  # fmt: skip
    if "journal file" in where and isinstance(root, ValueError):
        return (f"{where} is corrupt ({reason}); restore it from a copy, or pass another "
                "--storage")  # fmt: skip
    if "database is locked" in low:
        return (f"{where} stayed locked by another process for 60 s ({reason}); run the command "
                "again when it is free")  # fmt: skip
    if "unable to open" in low or "could not connect" in low or "connection" in low:
        return (f"cannot open {where} ({reason}); check the path or that the database server is "
                "running, or pass another --storage")  # fmt: skip
    return f"{where} failed ({type(root).__name__}: {reason}); check --storage"


@contextlib.contextmanager
def storage_errors(url: str | None, study_dir: Path) -> Iterator[None]:
    """Re-raise an error of the storage as one :class:`StorageError` line naming it."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if not _is_storage_error(exc):
            raise
        raise StorageError(_message(exc, describe(url, study_dir))) from exc
