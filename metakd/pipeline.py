"""The metakd pipeline: a short hypergradient *finder* run, then a fixed-λ retrain at the λ it found.

Per seed s (resumable: a finished run is kept, a started one resumes from its checkpoint)::

    <out>/finder/seed-<s>/    the config's meta.method (hypergrad or forecast) for finder_epochs
    <out>/retrain/seed-<s>/   meta.method=fixed at the finder's final constrained λ, train.epochs

The retrain is the plain run of the ledger (:mod:`metakd.ledger`), measured alongside, so the
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
from metakd.search_report import mean_std, write_results

__all__ = ["run_pipeline"]

TrainFn = Callable[..., dict]
CallbacksFactory = Callable[[Config, Path], list]


def _done(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" else None


def _scalar_values(meta: Any, run_dir: Path) -> dict[str, float]:
    if not isinstance(meta, dict) or not meta:
        raise ConfigError(f"the finder run {run_dir} has no final λ under 'meta' in summary.json")
    bad = [k for k, v in meta.items() if isinstance(v, (list, dict))]
    if bad:
        raise ConfigError(
            f"the retrain needs scalar metaparameters; the finder has {bad} non-scalar"
        )
    return {k: float(v) for k, v in meta.items()}


def run_pipeline(
    cfg: Config,
    *,
    out_dir: str | Path,
    seeds: Sequence[int],
    finder_epochs: int,
    callbacks_factory: CallbacksFactory | None = None,
    train_fn: TrainFn | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Finder (``cfg`` with ``train.epochs=finder_epochs``) then retrain (``meta.method=fixed`` at
    the finder's final λ, ``cfg.train.epochs``) per seed; writes and returns the results (kind
    ``pipeline``: per seed λ, accuracies, seconds and cost in plain runs; mean ± sample std)."""
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
        from metakd.run import train_run as train_fn
    assert train_fn is not None
    train = train_fn
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def run(run_cfg: Config, run_dir: Path, label: str) -> dict[str, Any]:
        summary = _done(run_dir)
        if summary is not None:
            if say:
                say(f"{label}: finished, kept ({run_dir})")
            return summary
        cbs = list(callbacks_factory(run_cfg, run_dir)) if callbacks_factory else []
        if say:
            say(f"{label}: running in {run_dir}")
        return train(run_cfg, run_dir, resume=(run_dir / "config.yaml").is_file(), callbacks=cbs)

    rows: list[dict[str, Any]] = []
    for s in seeds:
        data = config_to_dict(cfg)
        data["seed"] = int(s)
        fdir, rdir = out / "finder" / f"seed-{s}", out / "retrain" / f"seed-{s}"
        data["out"] = str(fdir)
        data["train"]["epochs"] = int(finder_epochs)
        data["wandb"]["group"] = f"{cfg.name}-pipeline-finder"
        finder = run(Config.model_validate(data), fdir, f"finder seed {s}")
        values = _scalar_values(finder.get("meta"), fdir)
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
    acc, acc_sd = mean_std([r["test_accuracy"] for r in rows])
    cost, cost_sd = mean_std([r["cost"] for r in rows])
    cpu, cpu_sd = mean_std([r["cost_cpu"] for r in rows])
    results = {
        "kind": "pipeline", "name": cfg.name, "finder_method": cfg.meta.method,
        "finder_epochs": int(finder_epochs),
        "meta_optimizer": f"{cfg.meta.optimizer} lr {cfg.meta.lr:g}", "epochs": cfg.train.epochs, "seeds": list(seeds),
        "runs": rows, "summary": {
            "test_accuracy_mean": acc, "test_accuracy_std": acc_sd, "cost_mean": cost,
            "cost_std": cost_sd, "cost_cpu_mean": cpu, "cost_cpu_std": cpu_sd,
        },
        "cost_definition": "(finder + retrain wall seconds) / retrain wall seconds",
    }  # fmt: skip
    write_results(out, results)
    return results
