"""Continue a search study or a pipeline whose run directories are gone, from its ``results.json``.

A long study (the CIFAR-10 side-by-side one is ~50 plain runs) spans several sittings, often on machines
that keep only what was committed — the study's report (``results.json``, ``search.json``), not its run
directories or its SQLite file. ``metakd search ... --import-results DIR`` reads that report and

- for a grid/random/TPE study, adds its finished trials to the (empty) Optuna study with their original
  numbers, parameters, scores, seconds and costs (:func:`import_trials`), so the sampler continues where
  the study stopped: the grid sampler's grid ids are the trials' own, TPE conditions on the same history,
  the best λ and the compute ledger are the report's;
- hands the retrain rows of the report's best trial and the pipeline's finished seeds back
  (:func:`known_rows`), so those runs are not repeated.

The imported rows keep ``imported_from``; their runs are not re-executed and their numbers are the ones
measured when they ran (the report states the machine and date).
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metakd.config import ConfigError

if TYPE_CHECKING:
    import optuna

    from metakd.runs.search import SearchSpace

__all__ = ["import_trials", "known_rows", "load_report"]


def load_report(path: str | Path, kind: str, out: Path) -> dict[str, Any]:
    """The ``results.json`` at ``path`` (a file, or a directory holding one) of ``kind`` (search or
    pipeline). A ``search.json`` beside it is copied into ``out`` when ``out`` has none, so the
    study's settings check (:func:`metakd.runs.search._check_settings`) refuses a command that differs."""
    p = Path(path)
    file = p / "results.json" if p.is_dir() else p
    try:
        results = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--import-results: {file} does not exist; pass a study directory "
                          "or its results.json") from None  # fmt: skip
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--import-results: cannot read {file} ({exc})") from None
    if not isinstance(results, dict) or results.get("kind") != kind:
        got = results.get("kind") if isinstance(results, dict) else type(results).__name__
        which = "--sampler hypergrad" if kind == "pipeline" else "--sampler grid|random|tpe"
        raise ConfigError(f"--import-results: {file} holds results of kind {got!r}, but {which} "
                          f"continues kind {kind!r}")  # fmt: skip
    settings = file.parent / "search.json"
    out.mkdir(parents=True, exist_ok=True)
    if kind == "search" and settings.is_file() and not (out / "search.json").is_file():
        shutil.copyfile(settings, out / "search.json")
    results["imported_from"] = str(file)
    return results


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One importing process at a time per study directory (workers may start together)."""
    with open(out / ".import.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def import_trials(study: optuna.Study, results: Mapping[str, Any], space: SearchSpace,
                  kind: str, sampler: Any, out: Path) -> int:  # fmt: skip
    """Add the report's COMPLETE and PRUNED trials to ``study`` with their original numbers (a
    numbering gap becomes a FAIL placeholder without parameters); returns how many were added.

    A study that already holds trials must hold the report's (same number, same parameters): then
    nothing is added (a rerun, or a second worker that imported after the first). ``sampler``: the
    study's ``GridSampler`` for ``kind`` grid (each trial gets its point's ``grid_id``, its index in
    the sampler's seeded grid, so the grid is not repeated), else unused."""
    import optuna
    from optuna.distributions import BaseDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    if results.get("sampler") != kind:
        raise ConfigError(
            f"--import-results: the report is a {results.get('sampler')!r} study, this command "
            f"runs {kind!r}; pass the matching --sampler or another --out"
        )
    rows = sorted(results.get("trials") or [], key=lambda r: int(r["number"]))
    dists: dict[str, BaseDistribution] = {
        n: FloatDistribution(d.lo, d.hi, log=d.log) for n, d in space.dims.items()
    }
    with _locked(out):
        held = {t.number: t for t in study.get_trials(deepcopy=False)}
        if held:
            for r in rows:
                t = held.get(int(r["number"]))
                if t is None or t.params != r["params"]:
                    raise ConfigError(
                        f"--import-results: the study in {out} already holds trials that are not "
                        f"the report's (trial {r['number']}); import into a new --out"
                    )
            return 0
        added = 0
        for r in rows:
            while len(study.trials) < int(r["number"]):  # a failed or running trial of the report
                study.add_trial(create_trial(state=TrialState.FAIL,
                                             user_attrs={"placeholder": "not in the report"}))  # fmt: skip
            params = {n: float(r["params"][n]) for n in dists}
            state = TrialState[r["state"]]
            steps = int(r.get("steps") or 0)
            system: dict[str, Any] = {}
            if isinstance(sampler, optuna.samplers.GridSampler):
                point = tuple(params[n] for n in sampler._param_names)
                if point not in sampler._all_grids:
                    raise ConfigError(f"--import-results: trial {r['number']}'s point {params} is "
                                      "not on this command's --grid")  # fmt: skip
                system = {"search_space": sampler._search_space,
                          "grid_id": sampler._all_grids.index(point)}  # fmt: skip
            result = {k: r.get(k) for k in ("steps", "wall_seconds", "cpu_seconds",
                                            "test_accuracy", "val_accuracy")}  # fmt: skip
            study.add_trial(create_trial(
                state=state, params=params, distributions=dists, value=r.get("val_accuracy"),
                intermediate_values={steps: r["val_accuracy"]} if r.get("val_accuracy") is not None
                else None,
                user_attrs={"run_dir": r.get("run_dir"), "values": r.get("values"),
                            "result": result, "imported_from": results.get("imported_from")},
                system_attrs=system,
            ))  # fmt: skip
            added += 1
        return added


def known_rows(results: Mapping[str, Any] | None, *, trial: int | None = None,
               check: Mapping[str, Any] | None = None) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Rows by seed a report already holds: a search's retrain rows of trial ``trial`` (its best),
    or a pipeline's per-seed rows. ``check``: fields the pipeline report must match (finder method,
    epochs, meta optimizer) or the import is refused."""
    if not results:
        return {}
    if results.get("kind") == "pipeline":
        for key, want in (check or {}).items():
            if results.get(key) != want:
                raise ConfigError(
                    f"--import-results: the report's pipeline has {key}={results.get(key)!r}, this "
                    f"command {want!r}; rerun it with the report's settings or another --out"
                )
        rows = results.get("runs") or []
    else:
        best = results.get("best") or {}
        if trial is None or best.get("number") != trial:
            return {}
        rows = results.get("retrain") or []
    return {int(r["seed"]): {**r, "imported_from": results.get("imported_from")} for r in rows}
