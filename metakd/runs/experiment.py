"""The experiment grid of the paper: methods × seeds, resumable, with a results table.

Methods: ``baseline``, ``random``, ``fixed``, ``hypergrad``, ``forecast`` (the trainer's
``meta.method``) and ``optimal``: a retrain with ``meta.method=fixed`` and ``meta.values`` = the final
constrained λ of the ``hypergrad`` run of the same seed (the paper's "optimized λ" retrain), so it
runs after that run. Layout: ``out_dir/<method>/seed-<s>/`` (a run directory, see
``docs/architecture.md``). A run whose ``summary.json`` exists is skipped; an unfinished run
directory is resumed (``train_run(..., resume=True)``).

Results (``results.md``, ``results.csv``, ``results.json`` in ``out_dir``) are computed by
:func:`metakd.reporting.report.aggregate`: per method the mean ± sample std (ddof=1) over seeds.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metakd.config import Config, ConfigError, config_to_dict
from metakd.reporting.tables import aggregate, results_csv, results_markdown
from metakd.runs import parallel
from metakd.runs.rundir import atomic_write_text, lock_dir, read_summary_file
from metakd.training.distributed import World

__all__ = ["METHODS", "run_dir_for", "run_experiment"]

METHODS = ("baseline", "random", "fixed", "hypergrad", "forecast", "optimal")

TrainFn = Callable[..., dict]
CallbacksFactory = Callable[[Config, Path], list]


def run_dir_for(out_dir: str | Path, method: str, seed: int) -> Path:
    """``out_dir/<method>/seed-<seed>``: where the grid puts one run."""
    return Path(out_dir) / method / f"seed-{seed}"


@dataclass(frozen=True)
class _Job:
    method: str
    seed: int
    cfg: Config
    run_dir: Path
    resume: bool
    main: bool = True  # rank 0 (or one process): writes the cell's label into its summary


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    return read_summary_file(path)  # ValueError naming the file when it is not a JSON mapping


def _finished(run_dir: Path) -> bool:
    """A run is finished when its summary.json exists and does not say ``status: failed``."""
    summary = _read_summary(run_dir)
    return summary is not None and summary.get("status") != "failed"


def _optimal_values(out_dir: Path, seed: int) -> dict[str, float | list[float]]:
    """Final constrained λ of the hypergrad run of ``seed`` (its ``summary.json`` ``meta``)."""
    hyper = run_dir_for(out_dir, "hypergrad", seed)
    summary = _read_summary(hyper)
    if summary is None or not _finished(hyper):
        raise ValueError(
            f"method 'optimal' retrains with the final λ of the hypergrad run of seed {seed}, but "
            f"{hyper / 'summary.json'} does not exist; add 'hypergrad' to the methods"
        )
    values: dict[str, float | list[float]] = {}
    for name, value in (summary.get("meta") or {}).items():
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(x, list) for x in value)
        ):
            raise ValueError(
                f"'optimal' needs scalar or per-class ([K]) metaparameters, but the hypergrad run "
                f"{hyper} has {name}={value!r}"
            )
        values[name] = [float(x) for x in value] if isinstance(value, list) else float(value)
    if not values:
        raise ValueError(f"{hyper / 'summary.json'} has no final λ under 'meta'")
    return values


def _run_config(cfg: Config, method: str, seed: int, run_dir: Path, out_dir: Path) -> Config:
    """``cfg`` for one grid cell: method, seed, out, W&B group ``<name>-<method>`` and tags."""
    data = config_to_dict(cfg)
    data["seed"] = seed
    data["out"] = str(run_dir)
    data["meta"]["method"] = "fixed" if method == "optimal" else method
    if method == "optimal":
        data["meta"]["values"] = _optimal_values(out_dir, seed)
    data["wandb"]["group"] = f"{cfg.name}-{method}"
    data["wandb"]["tags"] = list(dict.fromkeys([*cfg.wandb.tags, cfg.name, method, f"seed-{seed}"]))
    try:
        return Config.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError: report which cell failed
        raise ConfigError(f"the config of {method} seed {seed} is invalid: {exc}") from None


def _label(
    run_dir: Path, summary: dict[str, Any], method: str, write: bool = True
) -> dict[str, Any]:
    """Record the grid method as ``summary["label"]`` when it differs from the trainer's method
    (``optimal`` runs train with ``fixed``), so reports group them apart (``write``: in summary.json
    too; a rank > 0 writes nothing)."""
    if summary.get("method") != method and summary.get("label") != method:
        summary = {**summary, "label": method}
        if write:
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _execute(
    job: _Job, train_fn: TrainFn | None, callbacks_factory: CallbacksFactory | None
) -> dict:
    """Run one grid cell (in this process or a worker)."""
    if train_fn is None:
        # looked up at call time, so a patched metakd.runs.run.train_run is used
        train_fn = importlib.import_module("metakd.runs.run").train_run
    callbacks = list(callbacks_factory(job.cfg, job.run_dir)) if callbacks_factory else []
    summary = train_fn(job.cfg, job.run_dir, resume=job.resume, callbacks=callbacks)
    return _label(job.run_dir, dict(summary), job.method, write=job.main)


def _init_worker(threads: int, chosen: bool) -> None:
    from metakd import threads as _threads

    # the user's --threads is kept; a share of the cores is a default each run may lower
    (_threads.set_threads if chosen else _threads.set_default_threads)(threads)


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _write_results(out_dir: Path, summaries: Sequence[dict[str, Any]], cfg: Config) -> None:
    table = aggregate(summaries)
    runs = [
        {
            "method": s.get("label") or s.get("method"),
            "seed": s.get("seed"),
            **{k: s.get(k) for k in ("test_accuracy", "best_test_accuracy", "hypergradient_steps")},
            "meta": s.get("meta"),
            "wall_seconds": s.get("wall_seconds"),
        }
        for s in summaries
    ]
    md = (
        f"# Experiment `{cfg.name}`\n\n"
        f"Runs under `{out_dir}` (`<method>/seed-<s>/`), seeds "
        f"{sorted({s.get('seed') for s in summaries}, key=str)}.\n\n" + results_markdown(table)
    )
    atomic_write_text(out_dir / "results.md", md)
    atomic_write_text(out_dir / "results.csv", results_csv(table))
    payload = {
        "name": cfg.name,
        "std": "sample standard deviation (ddof=1) over seeds; null with one seed",
    }
    atomic_write_text(
        out_dir / "results.json",
        json.dumps({**payload, "methods": table, "runs": runs}, indent=2) + "\n",
    )


def run_experiment(
    cfg: Config,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    workers: int = 1,
    callbacks_factory: CallbacksFactory | None = None,
    quiet: bool = False,
    train_fn: TrainFn | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run ``methods × seeds`` into ``out_dir/<method>/seed-<s>/`` and write the results tables.

    Each cell gets a copy of ``cfg`` with ``meta.method``, ``seed``, ``out``, ``wandb.group``
    (``<cfg.name>-<method>``) and ``wandb.tags`` set; ``optimal`` also gets ``meta.values`` from the
    same seed's hypergrad run and is started once that run is done. Finished runs (``summary.json``
    present) are skipped; unfinished run directories are resumed. ``workers > 1`` runs the cells
    in a process pool (spawn), each worker with ``threads`` torch threads (default ``max(1, cores //
    workers)``, which a run of a small model lowers to 1: :mod:`metakd.threads`); then
    ``callbacks_factory(run_cfg, run_dir) -> callbacks`` and ``train_fn`` must be picklable
    (module-level functions). ``train_fn`` defaults to :func:`metakd.runs.run.train_run`.

    Returns the summaries in ``methods × seeds`` order (each with ``label`` where the grid
    method differs from the trainer's, i.e. ``optimal``).
    """
    methods = list(methods)
    seeds = [int(s) for s in seeds]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty list without repeats, got {methods}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {seeds}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    out = Path(out_dir)
    if "optimal" in methods and "hypergrad" not in methods:
        missing = [s for s in seeds if not _finished(run_dir_for(out, "hypergrad", s))]
        if missing:
            raise ValueError(
                f"method 'optimal' needs the finished hypergrad run of each seed, missing for seeds "
                f"{missing} under {out / 'hypergrad'}; add 'hypergrad' to the methods"
            )
    world = parallel.world_for(cfg)  # under torchrun every cell runs on all ranks; rank 0 writes
    out = parallel.broadcast(out, world)  # rank 0's (a default name holds a timestamp)
    if world.distributed and workers > 1:
        raise ConfigError(
            f"--workers {workers} runs cells in separate processes, but under torchrun every cell "
            f"already runs on all {world.size} ranks: use --workers 1"
        )
    out.mkdir(parents=True, exist_ok=True)
    # a second experiment on the same --out is refused, naming this PID (rank 0 holds it)
    with lock_dir(out) if world.is_main else contextlib.nullcontext():
        return _run_grid(
            cfg, methods, seeds, out, workers, callbacks_factory, quiet or not world.is_main,
            train_fn, threads, world,
        )  # fmt: skip


def _run_grid(
    cfg: Config, methods: list[str], seeds: list[int], out: Path, workers: int,
    callbacks_factory: CallbacksFactory | None, quiet: bool, train_fn: TrainFn | None,
    threads: int | None, world: World,
) -> list[dict[str, Any]]:  # fmt: skip
    """The body of :func:`run_experiment`, run while holding the lock on ``out``."""

    def say(msg: str) -> None:
        if not quiet:
            print(f"[metakd experiment] {msg}", file=sys.stderr, flush=True)

    results: dict[tuple[str, int], dict[str, Any]] = {}

    def job_for(method: str, seed: int) -> _Job | None:
        """The job of a cell, or None (result stored) when it is finished already."""
        run_dir = run_dir_for(out, method, seed)
        done = parallel.broadcast(_read_summary(run_dir) if world.is_main else None, world)
        if done is not None and done.get("status") != "failed":
            say(f"{method} seed {seed}: finished, skipped ({run_dir})")
            results[(method, seed)] = _label(run_dir, done, method, world.is_main)
            return None
        resume = (run_dir / "config.yaml").is_file()  # a started run: continue from its checkpoint
        say(f"{method} seed {seed}: {'resuming' if resume else 'starting'} in {run_dir}")
        run_cfg = _run_config(cfg, method, seed, run_dir, out)
        return _Job(method, seed, run_cfg, run_dir, resume, world.is_main)

    def finished(job: _Job, summary: dict[str, Any]) -> None:
        results[(job.method, job.seed)] = summary
        acc = summary.get("test_accuracy")
        say(f"{job.method} seed {job.seed}: done, test accuracy {acc}")

    first = [m for m in methods if m != "optimal"]
    cells = [(m, s) for s in seeds for m in first]
    if workers == 1:
        if threads is not None:
            from metakd.threads import set_threads

            set_threads(threads)
        for m, s in cells + [("optimal", s) for s in seeds if "optimal" in methods]:
            job = job_for(m, s)
            if job is not None:
                finished(job, _execute(job, train_fn, callbacks_factory))
    else:
        share = threads if threads is not None else max(1, _cores() // workers)
        ctx = multiprocessing.get_context("spawn")
        failures: list[tuple[str, int, BaseException]] = []
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(share, threads is not None)
        ) as pool:
            running: dict[Future[dict], _Job] = {}

            def submit(m: str, s: int) -> None:
                job = job_for(m, s)
                if job is not None:
                    running[pool.submit(_execute, job, train_fn, callbacks_factory)] = job

            for m, s in cells:
                submit(m, s)
            pending_optimal = set(seeds) if "optimal" in methods else set()
            # optimal cells whose hypergrad run is already done (or not part of this grid)
            for s in sorted(pending_optimal):
                if "hypergrad" not in methods or ("hypergrad", s) in results:
                    pending_optimal.discard(s)
                    submit("optimal", s)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        say(f"{job.method} seed {job.seed}: FAILED: {exc!r}")
                        failures.append((job.method, job.seed, exc))
                        continue
                    finished(job, fut.result())
                    if job.method == "hypergrad" and job.seed in pending_optimal:
                        pending_optimal.discard(job.seed)
                        submit("optimal", job.seed)
        if failures:
            names = ", ".join(f"{m} seed {s}" for m, s, _ in failures)
            cause = failures[0][2]
            message = (
                f"{len(failures)} run(s) failed: {names}; first error: {cause}. Finished runs are "
                "kept: fix the cause and rerun the same command to resume"
            )
            # a user-caused error in a worker (bad teacher, missing data, NaN) stays a user error, so
            # the CLI reports it as one line with exit code 2 instead of a worker traceback
            if isinstance(cause, ValueError | OSError | FloatingPointError):
                raise ConfigError(message) from cause
            raise RuntimeError(message) from cause

    summaries = [results[(m, s)] for m in methods for s in seeds]
    if world.is_main:
        _write_results(out, summaries, cfg)
    say(f"results: {out / 'results.md'}")
    return summaries
