"""The metakd pipeline: a short hypergradient *finder* run, then a fixed-λ retrain at the λ it found.

Per seed s (resumable: a finished run is kept — one killed while the ledger priced it is resumed to
get its ``cost`` — and a started one resumes from its checkpoint)::

    <out>/finder/seed-<s>/    the config's meta.method (hypergrad or forecast) for finder_epochs
    <out>/retrain/seed-<s>/   meta.method=fixed at the finder's final constrained λ, train.epochs

The retrain is the plain run of the ledger (:mod:`metakd.runs.ledger`), measured alongside, so the
pipeline's cost in plain runs is (W_finder + W_retrain) / W_retrain (wall; the same with CPU seconds).
The student reported is the retrain's (its test accuracy at the final epoch); the finder only proposes
λ, chosen on the validation split through the hypergradient of L_val.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metakd.config import Config, ConfigError, config_to_dict
from metakd.reporting.search_tables import mean_std
from metakd.runs import parallel
from metakd.runs.rundir import _diff_keys
from metakd.runs.search import _comparable, _same_teacher_path, teacher_digest
from metakd.runs.search_results import write_results

__all__ = ["run_pipeline"]

TrainFn = Callable[..., dict]
CallbacksFactory = Callable[[Config, Path], list]


def _done(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" else None


def _found_values(meta: Any, run_dir: Path) -> dict[str, float | list[float]]:
    """The finder's final constrained λ (``summary.json`` ``meta``): a float per scalar
    metaparameter, a list per shaped one (per class: ``meta.values`` takes either)."""
    if not isinstance(meta, dict) or not meta:
        raise ConfigError(f"the finder run {run_dir} has no final λ under 'meta' in summary.json")
    bad = [k for k, v in meta.items() if isinstance(v, dict)
           or (isinstance(v, list) and any(isinstance(x, list) for x in v))]  # fmt: skip
    if bad:
        raise ConfigError(f"the retrain takes scalar or [K] metaparameters; the finder has {bad}")
    return {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in meta.items()}


def run_pipeline(
    cfg: Config,
    *,
    out_dir: str | Path,
    seeds: Sequence[int],
    finder_epochs: int,
    callbacks_factory: CallbacksFactory | None = None,
    train_fn: TrainFn | None = None,
    say: Callable[[str], None] | None = None,
    import_results: str | Path | None = None,
) -> dict[str, Any]:
    """Finder (``cfg`` with ``train.epochs=finder_epochs``) then retrain (``meta.method=fixed`` at
    the finder's final λ, ``cfg.train.epochs``) per seed; writes and returns the results (kind
    ``pipeline``: per seed λ, accuracies, seconds and cost in plain runs; mean ± sample std),
    rewritten after every seed. ``import_results``: an earlier pipeline's ``results.json`` (or its
    directory) whose seeds are taken as done where their run directories are gone
    (:mod:`metakd.runs.search_resume`); its finder method, epochs and meta optimizer must match."""
    if cfg.meta.method not in ("hypergrad", "forecast"):
        raise ConfigError(
            f"the pipeline's finder tunes λ by hypergradients, but meta.method={cfg.meta.method!r}; "
            "set meta.method=hypergrad (or forecast)"
        )
    if not 1 <= finder_epochs <= cfg.train.epochs:
        raise ConfigError(
            f"--finder-epochs must be in [1, train.epochs={cfg.train.epochs}], got {finder_epochs}"
        )
    if train_fn is None:
        from metakd.runs.run import train_run as train_fn
    assert train_fn is not None
    train = train_fn
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = parallel.world_for(
        cfg
    )  # under torchrun each run is on all ranks; rank 0 decides, writes
    say = say if world.is_main else None
    settings = _settings(cfg)  # once: it hashes the teacher checkpoint
    known: dict[int, dict[str, Any]] = {}
    if import_results is not None:
        from metakd.runs import search_resume

        report = search_resume.load_report(import_results, "pipeline", out)
        known = search_resume.known_rows(report, check={
            "name": cfg.name, "finder_method": cfg.meta.method, "finder_epochs": int(finder_epochs),
            "epochs": cfg.train.epochs, "meta_optimizer": _meta_optimizer(cfg),
        })  # fmt: skip
        if "config" in report:  # reports from before it was recorded: the fields above only
            keys = _changed(report["config"], settings)
            if keys:
                raise ConfigError(
                    f"--import-results: the report's pipeline ran with other settings (config "
                    f"keys {', '.join(keys)}); rerun with its settings or pass another --out"
                )

    def run(run_cfg: Config, run_dir: Path, label: str) -> dict[str, Any]:
        summary = parallel.broadcast(_done(run_dir) if world.is_main else None, world)
        if summary is not None and "cost" in summary:
            if say:
                say(f"{label}: finished, kept ({run_dir})")
            return summary
        cbs = list(callbacks_factory(run_cfg, run_dir)) if callbacks_factory else []
        if summary is not None:  # killed in the ledger's calibration: the resume prices it
            if say:
                say(f"{label}: finished without its cost, computing it ({run_dir})")
            return train(run_cfg, run_dir, resume=True, callbacks=cbs)
        if say:
            say(f"{label}: running in {run_dir}")
        return train(run_cfg, run_dir, resume=(run_dir / "config.yaml").is_file(), callbacks=cbs)

    def write() -> dict[str, Any]:
        if not world.is_main:  # the results of a rank > 0: not written
            return _results(cfg, finder_epochs, settings, [*known.values(), *rows])
        return _write(out, cfg, finder_epochs, settings, [*known.values(), *rows])

    rows: list[dict[str, Any]] = []
    results: dict[str, Any] | None = None
    for s in seeds:
        fdir, rdir = out / "finder" / f"seed-{s}", out / "retrain" / f"seed-{s}"
        imported = int(s) in known and _done(fdir) is None and _done(rdir) is None
        if parallel.broadcast(imported, world):
            if say:
                say(f"seed {s}: imported from {known[int(s)]['imported_from']}")
            rows.append(known[int(s)])
            results = write()
            continue
        data = config_to_dict(cfg)
        data["seed"] = int(s)
        data["out"] = str(fdir)
        data["train"]["epochs"] = int(finder_epochs)
        data["wandb"]["group"] = f"{cfg.name}-pipeline-finder"
        finder = run(Config.model_validate(data), fdir, f"finder seed {s}")
        values = _found_values(finder.get("meta"), fdir)
        data = config_to_dict(cfg)
        data.update(seed=int(s), out=str(rdir))
        data["meta"]["method"] = "fixed"
        data["meta"]["values"] = values
        data["wandb"]["group"] = f"{cfg.name}-pipeline-retrain"
        retrain = run(Config.model_validate(data), rdir, f"retrain seed {s}")
        fw, rw = float(finder["wall_seconds"]), float(retrain["wall_seconds"])
        fc, rc = finder.get("cpu_seconds"), retrain.get("cpu_seconds")
        cost_cpu = (float(fc) + float(rc)) / float(rc) if fc and rc else None
        rows.append({
            "seed": int(s), "values": values, "test_accuracy": retrain.get("test_accuracy"),
            "val_accuracy": retrain.get("val_accuracy"),
            "finder": {k: finder.get(k) for k in ("run_dir", "val_accuracy", "test_accuracy",
                       "steps", "wall_seconds", "cpu_seconds", "hypergradient_steps")},
            "retrain": {k: retrain.get(k) for k in ("run_dir", "steps", "wall_seconds",
                        "cpu_seconds")},
            "finder_cost": fw / rw, "cost": (fw + rw) / rw, "cost_cpu": cost_cpu,
        })  # fmt: skip
        results = write()
    return results if results is not None else write()


def _write(out: Path, cfg: Config, finder_epochs: int, settings: dict[str, Any],
           rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Write the results of every finished seed in ``out``: ``rows`` (an imported report's and this
    call's, later ones winning) and those of other processes (e.g. seeds 0-2 and 3-4 side by side)
    already in its ``results.json`` with the same settings; under a lock, so side-by-side processes
    do not drop each other's rows."""
    import fcntl

    with open(out / ".results.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        earlier = _earlier_rows(out, finder_epochs, settings)
        merged = {int(r["seed"]): r for r in [*earlier, *rows]}
        results = _results(cfg, finder_epochs, settings, [merged[k] for k in sorted(merged)])
        write_results(out, results)
        return results


def _earlier_rows(out: Path, finder_epochs: int, settings: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        old = json.loads((out / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    same = (
        isinstance(old, dict) and old.get("kind") == "pipeline"
        and old.get("finder_epochs") == int(finder_epochs)
    )  # fmt: skip
    if same:
        same = not _changed(old.get("config"), settings)
    return list(old.get("runs") or []) if same else []


def _meta_optimizer(cfg: Config) -> str:
    return f"{cfg.meta.optimizer} lr {cfg.meta.lr:g}"


def _settings(cfg: Config) -> dict[str, Any]:
    """The pipeline's config less what varies per run (out, seed, W&B mode): an imported report
    must have been made with the same."""
    conf = config_to_dict(cfg)
    conf.pop("seed", None)
    full: dict[str, Any] = _comparable(conf)
    full["teacher_sha256"] = teacher_digest(cfg)
    return full


def _changed(recorded: Any, settings: dict[str, Any]) -> list[str]:
    """Dotted keys in which a report's recorded settings differ from ``settings`` (this run's
    :func:`_settings`; the teacher digest only where the report has one)."""
    old = dict(recorded) if isinstance(recorded, dict) else {}
    new = dict(settings)
    if "teacher_sha256" in old:
        sha = old.pop("teacher_sha256")
        old = _comparable(old)
        old["teacher_sha256"] = sha
        if sha and new.get("teacher_sha256"):
            _same_teacher_path(old, new)
    else:
        old = _comparable(old)
        new.pop("teacher_sha256")
    return sorted(_diff_keys(old, new))


def _results(cfg: Config, finder_epochs: int, settings: dict[str, Any],
             rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    acc, acc_sd = mean_std([r["test_accuracy"] for r in rows])
    cost, cost_sd = mean_std([r["cost"] for r in rows])
    cpu, cpu_sd = mean_std([r["cost_cpu"] for r in rows])
    results = {
        "kind": "pipeline", "name": cfg.name, "finder_method": cfg.meta.method,
        "finder_epochs": int(finder_epochs),
        "meta_optimizer": _meta_optimizer(cfg), "epochs": cfg.train.epochs,
        "seeds": [r["seed"] for r in rows],
        "runs": rows, "summary": {
            "test_accuracy_mean": acc, "test_accuracy_std": acc_sd, "cost_mean": cost,
            "cost_std": cost_sd, "cost_cpu_mean": cpu, "cost_cpu_std": cpu_sd,
        },
        "cost_definition": "(finder + retrain wall seconds) / retrain wall seconds",
        "config": settings,
    }  # fmt: skip
    return results
