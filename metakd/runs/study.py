"""Optuna plumbing of a search: storage, sampler, pruner, and recovery of trials left by dead workers.

Studies may be shared by several processes or machines through the storage URL: the default SQLite
file ``<study>/study.db``, an RDB server (``postgresql://...``, ``mysql://...``; Optuna's heartbeat
marks trials of dead workers on any machine failed), or a journal file (``journal:PATH`` or a path
ending in ``.journal``: Optuna's ``JournalStorage``, for file systems where SQLite locking is
unreliable, e.g. NFS), opened by :mod:`metakd.runs.study_storage`. :func:`recover` marks a trial left ``RUNNING`` by a dead process on this host
failed and re-enqueues its point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metakd.config import Config, ConfigError
from metakd.runs.study_storage import masked, storage_for
from metakd.training.callbacks import Callback

if TYPE_CHECKING:
    import optuna

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "Pruning",
    "exists",
    "make_pruner",
    "make_sampler",
    "missing_trials",
    "quiet_trial_failures",
    "recover",
    "storage_for",
    "unfinished",
]

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving")


def make_sampler(kind: str, grid: Mapping[str, list[float]] | None, seed: int, trials: int) -> Any:
    import optuna

    if kind == "grid":
        if not grid:
            raise ConfigError("--sampler grid needs --grid NAME=V1,V2,... for each dimension")
        return optuna.samplers.GridSampler(dict(grid), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Optuna's default of 10 random start-up trials would make an 8-trial TPE random search
            return optuna.samplers.TPESampler(
                n_startup_trials=max(3, trials // 4), multivariate=True, seed=seed
            )
    raise ConfigError(f"unknown sampler {kind!r}; choose from {list(SAMPLERS)}")


def make_pruner(kind: str) -> Any:
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    raise ConfigError(f"unknown pruner {kind!r}; choose from {list(PRUNERS)}")


class Pruning(Callback):
    """Reports the validation accuracy of each evaluation to the trial; raises ``TrialPruned`` when
    the pruner says so (the run directory keeps its checkpoints and metrics)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.t0 = self.c0 = 0.0
        self.step = 0

    def on_run_start(self, cfg: Config, run_dir: Path | None, info: Mapping[str, Any]) -> None:
        import time

        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_eval(self, row: Mapping[str, Any]) -> None:
        import optuna

        self.step = int(row.get("step", 0))
        val = row.get("val_accuracy")
        if val is None:
            return
        self.trial.report(float(val), self.step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {self.step} (val accuracy {val:.4f})")


@contextlib.contextmanager
def quiet_trial_failures() -> Iterator[None]:
    """Optuna logs a failed trial (an error, a diverged run, Ctrl-C) with its traceback before the
    exception reaches metakd, which says it in one line: silence that logger meanwhile."""
    logger = logging.getLogger("optuna.study._optimize")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study: optuna.Study, storage: Any, kind: str, lock: Path | None = None) -> list[int]:
    """Mark trials left RUNNING by dead processes of this host failed, and enqueue the point of each
    interrupted (not errored) failed trial that no other trial holds (also for the grid sampler,
    which counts a failed grid point as visited and would draw a random one instead). Returns the
    numbers of the trials marked failed. ``kind``: the sampler (kept for callers).

    A point already enqueued (a WAITING trial, whose ``params`` stay empty until it runs: the point
    is its ``fixed_params``) counts as held. ``lock``: a file lock held meanwhile, so workers of one
    study starting together do not each enqueue the same points (a worker on another host, without
    that lock file, can still race this one)."""
    from filelock import FileLock
    from optuna.trial import TrialState

    host = platform.node()
    marked = []
    with FileLock(str(lock), timeout=120) if lock is not None else contextlib.nullcontext():
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker") or {}
            pid = worker.get("pid")
            if worker.get("host") == host and isinstance(pid, int) and not _alive(pid):
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                marked.append(t.number)
        trials = study.get_trials(deepcopy=False)
        held = [
            t.params or t.system_attrs.get("fixed_params") for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                           TrialState.WAITING)
        ]  # fmt: skip
        for t in trials:
            interrupted = t.state == TrialState.FAIL and "error" not in t.user_attrs
            if interrupted and t.params and t.params not in held:
                study.enqueue_trial(t.params)
                held.append(t.params)
    return marked


def unfinished(study: optuna.Study) -> list[dict[str, Any]]:
    """Trials still RUNNING, each with its worker (host, pid) and whether this host can tell that
    worker is alive (``alive``: True / False on this host, None on another one)."""
    from optuna.trial import TrialState

    host = platform.node()
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        pid = worker.get("pid")
        alive = _alive(pid) if worker.get("host") == host and isinstance(pid, int) else None
        rows.append({"number": t.number, "host": worker.get("host"), "pid": pid, "alive": alive})
    return rows


def missing_trials(study: optuna.Study, trials: int, finished: int, out: Path,
                   storage: str | None, command: str | None) -> dict[str, Any] | None:  # fmt: skip
    """How many of the ``trials`` the study still lacks, which are running where, and how to finish
    them (None when none is missing)."""
    if finished >= trials:
        return None
    running = unfinished(study)
    cmd = (
        masked(command)
        if command
        else (
            f"the same `metakd search` command (--out {out}"
            + (f" --storage {masked(storage)}" if storage else "")
            + f" --study-name {study.study_name})"
        )
    )
    parts = []
    for r in running:
        if r["host"] is None:
            parts.append(f"trial {r['number']} is RUNNING without a recorded worker (one that died "
                         f"as it started it); run {cmd} after Optuna's heartbeat marks it failed "
                         "(database servers), or start a new --study-name")  # fmt: skip
        elif r["alive"]:
            parts.append(f"trial {r['number']} is still running in process {r['pid']} on this host "
                         "(it updates the results when it finishes)")  # fmt: skip
        else:
            parts.append(
                f"trial {r['number']} is RUNNING in process {r['pid']} on host {r['host']}, which "
                f"this process cannot check; if that worker is dead, run {cmd} on {r['host']} to "
                "rerun it (with a database server, Optuna marks it failed after 120 s and any host "
                "can)"
            )  # fmt: skip
    n = trials - finished
    text = f"{n} of {trials} trials missing: the study holds {finished} finished trials"
    text += "; " + "; ".join(parts) if parts else f"; run {cmd} to finish them"
    return {"trials": n, "budget": trials, "finished": finished, "running": running,
            "command": masked(command) if command else None, "text": text}  # fmt: skip


def exists(store: Any, name: str) -> bool:
    return any(s.study_name == name for s in store.get_all_studies())
