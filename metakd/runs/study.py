"""Optuna plumbing of a search: storage, sampler, pruner, and recovery of trials left by dead workers.

Studies may be shared by several processes or machines through the storage URL: the default SQLite
file ``<study>/study.db``, an RDB server (``postgresql://...``, ``mysql://...``; Optuna's heartbeat
marks trials of dead workers on any machine failed), or a journal file (``journal:PATH`` or a path
ending in ``.journal``: Optuna's ``JournalStorage``, for file systems where SQLite locking is
unreliable, e.g. NFS). :func:`recover` marks a trial left ``RUNNING`` by a dead process on this host
failed and re-enqueues its point.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metakd.config import Config, ConfigError
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
    "recover",
    "storage_for",
]

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving")


def storage_for(url: str | None, study_dir: Path) -> optuna.storages.BaseStorage:
    """An Optuna storage: None → SQLite ``<study_dir>/study.db``; ``journal:PATH`` or ``*.journal``
    → ``JournalStorage`` on that file; any other URL → ``RDBStorage`` (with a heartbeat)."""
    import optuna

    if url is None:
        url = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if url.startswith("journal:") or url.endswith(".journal"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        backend = JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for the lock
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120, **kwargs)


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study: optuna.Study, storage: Any, kind: str) -> list[int]:
    """Mark trials left RUNNING by dead processes of this host failed; for random/TPE enqueue the
    point of each interrupted (not errored) failed trial that no other trial holds (the grid sampler
    re-picks unfinished grid points itself). Returns the numbers of the trials marked failed."""
    from optuna.trial import TrialState

    host = platform.node()
    marked = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        pid = worker.get("pid")
        if worker.get("host") == host and isinstance(pid, int) and not _alive(pid):
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            marked.append(t.number)
    if kind == "grid":
        return marked
    trials = study.get_trials(deepcopy=False)
    held = [
        t.params for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                       TrialState.WAITING)
    ]  # fmt: skip
    for t in trials:
        interrupted = t.state == TrialState.FAIL and "error" not in t.user_attrs
        if interrupted and t.params and t.params not in held:
            study.enqueue_trial(t.params)
            held.append(t.params)
    return marked


def exists(store: Any, name: str) -> bool:
    return any(s.study_name == name for s in store.get_all_studies())
