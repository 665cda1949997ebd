"""Search baselines: grid, random and TPE search over a fixed λ, on Optuna.

Each trial is one fixed-λ training run (:func:`metakd.runs.run.train_run`, ``meta.method=fixed``) in its own
run directory ``<study>/trials/trial-XXXX/``, scored on the **validation** accuracy at the end of
training (the test accuracy is recorded, never used to choose). The samplers, pruners and the study
storage are Optuna's (``GridSampler``, ``RandomSampler``, ``TPESampler``; ``MedianPruner``,
``SuccessiveHalvingPruner`` on the validation accuracy reported at each evaluation).

The search space (``share`` or ``raw``, from ``meta.params``) is :mod:`metakd.runs.search_space`;
the storage, samplers, pruners and recovery of dead workers' trials are :mod:`metakd.runs.study`.

Resume: rerunning the same search continues its study — finished trials are kept; a trial left
``RUNNING`` by a dead process on this host is marked failed and rerun (its run directory resumes from
its last checkpoint).

A run directory is reused (its summary taken, or its run resumed) only when it holds this very run:
its config.yaml equal to the trial's (λ included) and, where it records one (``trial.json``), this
study. One that another study left there (``study.db`` emptied, another ``--storage``, a copied
study) is never reused nor overwritten: the trial runs in ``trial-XXXX-2`` (``-3``, ...) instead.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from metakd.files import file_sha256
from metakd.config import Config, ConfigError, config_to_dict
from metakd.runs.rundir import (
    _diff_keys,
    _with_current_defaults,
    atomic_write_text,
    read_config_file,
)
from metakd.runs.search_space import Dim, SearchSpace, parse_grid
from metakd.runs.study import (
    PRUNERS,
    SAMPLERS,
    Pruning,
    exists,
    make_pruner,
    make_sampler,
    missing_trials,
    quiet_trial_failures,
    recover,
    storage_for,
)
from metakd.runs.study_storage import storage_errors

if TYPE_CHECKING:
    import optuna

__all__ = [  # the space and the Optuna plumbing are re-exported: search_space.py, study.py
    "PRUNERS",
    "SAMPLERS",
    "Dim",
    "SearchSpace",
    "parse_grid",
    "run_search",
    "storage_for",
]


TrainFn = Callable[..., dict]
CallbacksFactory = Callable[[Config, Path], list]

log = logging.getLogger(__name__)
MARK = "trial.json"  # in a run directory: the study (its uid) that started the run there
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _one_line_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """A failing storage is one :class:`~metakd.runs.study_storage.StorageError` naming it, and a
    failed trial is not logged by Optuna with its traceback (metakd's own error says it)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        out = Path(str(kwargs["out_dir"]))
        storage = kwargs.get("storage")
        with storage_errors(storage if isinstance(storage, str) else None, out), \
                quiet_trial_failures():  # fmt: skip
            return fn(*args, **kwargs)

    return wrapper


def _trial_config(cfg: Config, values: Mapping[str, float], run_dir: Path, label: str) -> Config:
    data = config_to_dict(cfg)
    data["out"] = str(run_dir)
    data["meta"]["method"] = "fixed"
    data["meta"]["values"] = dict(values)
    data["wandb"]["group"] = f"{cfg.name}-{label}"
    data["wandb"]["tags"] = list(dict.fromkeys([*cfg.wandb.tags, cfg.name, label]))
    return Config.model_validate(data)


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" else None


def _run_dir_for(study: optuna.Study, trial: optuna.Trial, params: Mapping[str, float],
                 root: Path) -> tuple[Path, set[str]]:  # fmt: skip
    """A failed trial's run directory when this trial reruns its point (to resume it), else
    ``trials/trial-<number>``; and the run directories the study's other trials hold."""
    from optuna.trial import TrialState

    taken = {
        str(t.user_attrs.get("run_dir")) for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL and t.number != trial.number
    }  # fmt: skip
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        rd = t.user_attrs.get("run_dir")
        if t.params == dict(params) and rd and rd not in taken:
            return root / rd, taken
    return root / "trials" / f"trial-{trial.number:04d}", taken


def _study_uid(study: optuna.Study) -> str:
    """The study's identity (a study user attribute, set by its first process): a study made anew
    under the same name (an emptied ``study.db``) has another."""
    uid = study.user_attrs.get("uid")
    if not uid:
        study.set_user_attr("uid", uuid.uuid4().hex)
        uid = study.user_attrs.get("uid")
    return str(uid)


def _own_dir(root: Path, first: Path, cfg_for: Callable[[Path], Config], uid: str,
             taken: Collection[str] = ()) -> tuple[Path, Config]:  # fmt: skip
    """The run directory and config of a trial (or retrain): ``first`` when it is free or holds this
    very run (:func:`_holds_this_run`), else the first such of ``first-2``, ``first-3``, ... (the run
    there is another study's or another λ's: never reused, never overwritten). ``taken``: run
    directories of the study's other trials."""
    k = 1
    while True:
        path = first if k == 1 else first.with_name(f"{first.name}-{k}")
        tcfg = cfg_for(path)
        if path.relative_to(root).as_posix() not in taken and _holds_this_run(path, tcfg, uid):
            if k > 1:
                log.info("%s holds another run (another study or λ); this one runs in %s",
                         first, path)  # fmt: skip
            return path, tcfg
        k += 1


def _holds_this_run(path: Path, tcfg: Config, uid: str) -> bool:
    """Whether ``path`` is free (nothing of a run in it) or holds the run of ``tcfg``: its
    config.yaml the same (``out`` and ``wandb.mode`` aside) and, where ``trial.json`` records a
    study, this one (``uid``)."""
    if not path.exists():
        return True
    try:
        mark = json.loads((path / MARK).read_text()) if (path / MARK).is_file() else {}
    except (OSError, ValueError):
        mark = {"study_uid": None}  # unreadable: not known to be this study's
    if isinstance(mark, dict) and "study_uid" in mark and mark["study_uid"] != uid:
        return False
    if not (path / "config.yaml").is_file():
        return not any(
            (path / n).exists() for n in ("summary.json", "metrics.jsonl", "checkpoints")
        )
    try:
        old = read_config_file(path / "config.yaml")
    except (OSError, ValueError):
        return False
    return not _diff_keys(_comparable(old), _comparable(config_to_dict(tcfg)))


def _claim(path: Path, uid: str, name: str, number: int | None) -> None:
    """Record in ``path`` that this study starts (or resumes) the run there."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARK).is_file():
        mark = {"study": name, "study_uid": uid, "trial": number}
        atomic_write_text(path / MARK, json.dumps(mark) + "\n")


@_one_line_errors
def run_search(
    cfg: Config,
    *,
    sampler: str,
    trials: int,
    out_dir: str | Path,
    space: str = "share",
    grid: Sequence[str] = (),
    pruner: str = "none",
    storage: str | None = None,
    study_name: str | None = None,
    sampler_seed: int = 0,
    worker: int = 0,
    retrain_seeds: Sequence[int] = (),
    callbacks_factory: CallbacksFactory | None = None,
    train_fn: TrainFn | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    import_results: str | Path | None = None,
    repair_journal: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) a search study in ``out_dir`` until it holds ``trials`` finished trials
    (complete or pruned), retrain its validation-best λ on ``retrain_seeds``, and write
    ``results.json``/``results.md``/``trials.csv`` there (:mod:`metakd.runs.search_results`). Returns the
    results. ``worker`` offsets the sampler seed: parallel processes sharing a study pass distinct
    values so random/TPE draws differ; ``train_fn`` defaults to :func:`metakd.runs.run.train_run`.
    ``import_results``: a study directory or ``results.json`` whose trials (and the retrains of its
    best) this study continues from, when their run directories are gone (:mod:`metakd.runs.search_resume`).
    Results are rewritten after every finished trial; the retrain on the search's own seed
    (``cfg.seed``) is the best trial's run itself (the same fixed-λ run), not a second one.

    The storage is opened before anything is written in ``out_dir`` (``repair_journal``: truncate a
    journal's torn last line, :mod:`metakd.runs.study_storage`). A trial that another worker left
    ``RUNNING`` when it died on this host is rerun at the end too; one that this process cannot
    check (another host) is reported in ``results["missing"]``, with ``command`` (this command line,
    to finish the study) in its text."""
    import optuna

    from metakd.runs import search_results, search_resume

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    out = Path(out_dir)
    sp = SearchSpace.from_config(cfg, space)
    grid_values = parse_grid(grid, sp) if sampler == "grid" else None
    if sampler != "grid" and grid:
        raise ConfigError(f"--grid is for --sampler grid, not {sampler!r}")
    if grid_values is not None:
        trials = min(trials, math.prod(len(v) for v in grid_values.values()))
    store = storage_for(storage, out, repair_journal=repair_journal)
    out.mkdir(parents=True, exist_ok=True)
    report = search_resume.load_report(import_results, "search", out) if import_results else None
    _check_settings(out, cfg, sampler, sp, grid_values, pruner)
    if train_fn is None:
        from metakd.runs.run import train_run as train_fn
    assert train_fn is not None
    train = train_fn

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or out.resolve().name
    probe = optuna.load_study(study_name=name, storage=store) if exists(store, name) else None
    if report is not None:
        if probe is None:
            probe = optuna.create_study(study_name=name, storage=store, direction="maximize",
                                        load_if_exists=True)  # fmt: skip
        grid_sampler = make_sampler(sampler, grid_values, sampler_seed, trials)
        search_resume.import_trials(probe, report, sp, sampler, grid_sampler, out)
    n_before = len(probe.trials) if probe is not None else 0
    # Random/TPE: a resumed or parallel process draws from another seed, or it would repeat the
    # draws of the first. Grid: always the same seed — GridSampler maps trial numbers to grid points
    # through a seeded shuffle, which every process and resume must share.
    seed = sampler_seed
    if sampler != "grid":
        seed += 1_000_003 * n_before + 7919 * worker
    study = optuna.create_study(
        study_name=name, storage=store, direction="maximize", load_if_exists=True,
        sampler=make_sampler(sampler, grid_values, seed, trials), pruner=make_pruner(pruner),
    )  # fmt: skip
    study.set_user_attr("metric", "val_accuracy (final evaluation)")
    # workers started together (noise_study.sh's two) take turns: each would enqueue the same points
    recover_lock = out / "recover.lock"
    recover(study, store, sampler, recover_lock)
    uid = _study_uid(study)

    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED)

    def objective(trial: optuna.Trial) -> float:
        # few attributes, each one storage commit: who runs it (for _recover), where, what
        trial.set_user_attr("worker", {"host": platform.node(), "pid": os.getpid()})
        params = sp.suggest(trial)
        values = sp.values(params)
        first, taken = _run_dir_for(study, trial, params, out)
        run_dir, tcfg = _own_dir(
            out, first, lambda p: _trial_config(cfg, values, p, f"search-{sampler}"), uid, taken
        )
        trial.set_user_attr("run_dir", run_dir.relative_to(out).as_posix())
        trial.set_user_attr("values", values)
        summary = _read_summary(run_dir)
        pr = Pruning(trial)
        if summary is None:
            _claim(run_dir, uid, name, trial.number)
            cbs = list(callbacks_factory(tcfg, run_dir)) if callbacks_factory else []
            resume = (run_dir / "config.yaml").is_file()
            try:
                summary = train(tcfg, run_dir, resume=resume, callbacks=[pr, *cbs])
            except optuna.TrialPruned:
                import time

                used = {"steps": pr.step, "wall_seconds": time.perf_counter() - pr.t0,
                        "cpu_seconds": time.process_time() - pr.c0}  # fmt: skip
                trial.set_user_attr("result", used)
                if on_trial is not None:
                    on_trial({"number": trial.number, "state": "PRUNED", "values": values})
                raise
            except (ValueError, FloatingPointError) as exc:  # a diverged trial (train.lr=1e38 too:
                # metakd.training.diagnostics.overflow_is_divergence) is failed with its error, so a
                # rerun draws another point
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
                raise
        keys = ("steps", "wall_seconds", "cpu_seconds", "test_accuracy", "val_accuracy")
        trial.set_user_attr("result", {k: summary.get(k) for k in keys})
        val = summary.get("val_accuracy")
        if val is None:
            raise ConfigError(f"the run {run_dir} has no validation accuracy (train.eval_every?)")
        if on_trial is not None:
            on_trial({"number": trial.number, "state": "COMPLETE", "values": values,
                      "val_accuracy": val})  # fmt: skip
        return float(val)

    def current(*_: Any) -> dict[str, Any]:
        return search_results.study_results(study, out, sampler=sampler, space=sp, pruner=pruner,
                                           budget=trials)  # fmt: skip

    def write(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in counted:  # a long study's report is current after every trial
            search_results.write_results(out, current())

    while True:
        done = len(study.get_trials(deepcopy=False, states=(*counted, TrialState.RUNNING)))
        if done < trials:
            stop = optuna.study.MaxTrialsCallback(trials, states=(*counted, TrialState.RUNNING))
            study.optimize(objective, n_trials=trials - done, callbacks=[stop, write], catch=())
        rerun = recover(study, store, sampler, recover_lock)  # a worker of this host died meanwhile
        if not rerun:
            break
        log.warning("trial(s) %s of a worker that died are run again",
                    ", ".join(map(str, rerun)))  # fmt: skip
    results = current()
    missing = missing_trials(study, trials, len(results["trials"]), out, storage, command)
    if missing is not None:
        results["missing"] = missing
        log.warning("%s", missing["text"])
    if retrain_seeds and results.get("best") is not None:
        known = search_resume.known_rows(report, trial=int(results["best"]["number"]))
        results["retrain"] = _retrain(cfg, results, retrain_seeds, out, train,
                                      callbacks_factory, known, (uid, name))  # fmt: skip
    search_results.write_results(out, results)
    return results


def _check_settings(out: Path, cfg: Config, sampler: str, sp: SearchSpace,
                    grid: Mapping[str, list[float]] | None, pruner: str) -> None:  # fmt: skip
    """Write ``search.json``; refuse to continue a study made with other settings."""
    conf = config_to_dict(cfg)
    conf.pop("out", None)
    conf.get("wandb", {}).pop("mode", None)
    settings = {"sampler": sampler, "space": sp.to_dict(), "grid": grid, "pruner": pruner,
                "config": conf, "teacher_sha256": teacher_digest(cfg)}  # fmt: skip
    path = out / "search.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if "teacher_sha256" not in old:  # written before it was recorded: not compared
            settings.pop("teacher_sha256")
        # a study continued after an upgrade: keys added to Config since keep their defaults
        old["config"] = _comparable(old.get("config"))
        settings["config"] = _comparable(conf)
        if old.get("teacher_sha256") and settings.get("teacher_sha256"):
            _same_teacher_path(old["config"], settings["config"])
        changed = [k for k in settings if json.dumps(old.get(k), sort_keys=True)
                   != json.dumps(settings[k], sort_keys=True)]  # fmt: skip
        if changed:
            keys = sorted(_diff_keys(old.get("config"), settings["config"]))
            which = f" (config keys {', '.join(keys)})" if keys else ""
            raise ConfigError(
                f"{out} holds a study with different {', '.join(changed)}{which}; rerun it with "
                f"its settings (see {path}) or pass a new --out DIR"
            )
        return
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def _same_teacher_path(old: Any, new: Any) -> None:
    """Where both sides record the teacher file's digest, the digest identifies the teacher: the
    path (another checkout, a relative path) is not compared."""
    for conf in (old, new):
        if isinstance(conf, dict) and isinstance(conf.get("teacher"), dict):
            conf["teacher"] = {**conf["teacher"], "checkpoint": "(compared by sha256)"}


def teacher_digest(cfg: Config) -> str | None:
    """sha256 of the teacher checkpoint file (``teacher.checkpoint``), None for an in-process teacher
    (its config is part of the study's config). A study continued in another sitting, or from a
    committed report, must use the same file: a teacher retrained there may differ."""

    ckpt = cfg.teacher.checkpoint
    return file_sha256(Path(ckpt)) if ckpt is not None and Path(ckpt).is_file() else None


def _comparable(conf: Any) -> Any:
    """A stored or current config with the keys added since filled in, less ``out``/``wandb.mode``."""
    full = _with_current_defaults(conf)
    if isinstance(full, dict):
        full = dict(full)
        full.pop("out", None)
        full["wandb"] = {k: v for k, v in (full.get("wandb") or {}).items() if k != "mode"}
    return full


def _retrain(cfg: Config, results: Mapping[str, Any], seeds: Sequence[int], out: Path,
             train: TrainFn, callbacks_factory: CallbacksFactory | None,
             known: Mapping[int, dict[str, Any]], study: tuple[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    """Fixed-λ runs at the best trial's λ on each seed, in ``retrain/trial-XXXX/seed-<s>`` (another
    study's run there: ``seed-<s>-2``, :func:`_own_dir`). On the search's own seed the best trial
    *is* that run (same config, seed and code; CPU training is deterministic): its row is reused
    (``reused_trial``, no extra cost). ``known``: rows of an imported report, by seed, used where
    the run directory is gone. ``study``: (uid, name)."""
    best = results["best"]
    trial_row = next(t for t in results["trials"] if t["number"] == best["number"])
    keys = ("test_accuracy", "val_accuracy", "steps", "wall_seconds", "cpu_seconds")
    rows = []
    for s in seeds:
        first = out / "retrain" / f"trial-{int(best['number']):04d}" / f"seed-{s}"

        def retrain_cfg(path: Path, seed: int = int(s)) -> Config:
            rcfg = _trial_config(cfg, best["values"], path, "search-retrain")
            rcfg.seed = seed
            return rcfg

        run_dir, rcfg = _own_dir(out, first, retrain_cfg, study[0])
        summary = _read_summary(run_dir)
        if summary is None and int(s) == cfg.seed and trial_row.get("test_accuracy") is not None:
            rows.append({"seed": int(s), "run_dir": trial_row["run_dir"], "reused_trial": True,
                         **{k: trial_row.get(k) for k in keys}})  # fmt: skip
            continue
        if summary is None and int(s) in known:
            rows.append(dict(known[int(s)]))
            continue
        if summary is None:
            _claim(run_dir, study[0], study[1], None)
            cbs = list(callbacks_factory(rcfg, run_dir)) if callbacks_factory else []
            summary = train(rcfg, run_dir, resume=(run_dir / "config.yaml").is_file(),
                            callbacks=cbs)  # fmt: skip
        rows.append({"seed": int(s), "run_dir": run_dir.relative_to(out).as_posix(),
                     **{k: summary.get(k) for k in keys}})  # fmt: skip
    return rows
