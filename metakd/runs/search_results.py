"""A search study's results: read from its Optuna study, written as ``results.json``/``results.md``/``trials.csv``.

:func:`study_results` gives every trial its cost in plain runs, priced against the study's own
fixed-λ runs (:func:`metakd.runs.ledger.study_reference`), and the best-so-far trial;
:func:`write_results` adds the retrain block and writes the files. The tables and the figure drawn from
these results (and their definitions) are :mod:`metakd.reporting.search_tables`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metakd.reporting.search_tables import _f, mean_std, results_markdown
from metakd.runs.ledger import study_reference
from metakd.runs.rundir import atomic_write_text

if TYPE_CHECKING:
    import optuna

    from metakd.runs.search import SearchSpace

__all__ = ["study_results", "write_results"]


def study_results(study: optuna.Study, out: Path, *, sampler: str, space: SearchSpace,
                  pruner: str, budget: int) -> dict[str, Any]:  # fmt: skip
    """The results of a study: trials in number order with cost and best-so-far, and the best."""
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)

    def attrs(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {**t.user_attrs, **(t.user_attrs.get("result") or {})}

    complete = [attrs(t) for t in trials if t.state == TrialState.COMPLETE]
    ref = study_reference(complete)
    full_steps = max((int(a.get("steps") or 0) for a in complete), default=0)
    plain_wall = ref["wall_per_step"] * full_steps if ref else None
    plain_cpu = ref["cpu_per_step"] * full_steps if ref else None
    rows: list[dict[str, Any]] = []
    cum = cum_cpu = 0.0
    best: dict[str, Any] | None = None
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        a = attrs(t)
        cost = a["wall_seconds"] / plain_wall if plain_wall and a.get("wall_seconds") else None
        cost_cpu = a["cpu_seconds"] / plain_cpu if plain_cpu and a.get("cpu_seconds") else None
        cum += cost or 0.0
        cum_cpu += cost_cpu or 0.0
        row = {
            "number": t.number, "state": t.state.name, "params": dict(t.params),
            "values": a.get("values"), "val_accuracy": t.value,
            "test_accuracy": a.get("test_accuracy") if t.state == TrialState.COMPLETE else None,
            "steps": a.get("steps"), "wall_seconds": a.get("wall_seconds"),
            "cpu_seconds": a.get("cpu_seconds"), "cost": cost, "cost_cpu": cost_cpu,
            "cum_cost": cum, "cum_cost_cpu": cum_cpu, "run_dir": a.get("run_dir"),
        }  # fmt: skip
        if t.state == TrialState.COMPLETE and (best is None or t.value > best["val_accuracy"]):
            best = row
        row["best_so_far"] = None if best is None else best["number"]
        row["best_so_far_test"] = None if best is None else best["test_accuracy"]
        rows.append(row)
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    return {
        "kind": "search", "sampler": sampler, "space": space.to_dict(), "pruner": pruner,
        "budget_trials": budget, "study_name": study.study_name, "study_dir": str(out),
        "metric": "final validation accuracy (test accuracy never used to choose)",
        "reference": None if ref is None else {
            **ref, "steps": full_steps, "wall_seconds": plain_wall, "cpu_seconds": plain_cpu,
            "source": "mean over the study's complete trials (each a fixed-λ run)",
        },
        "trials": rows,
        "best": None if best is None else {k: best[k] for k in (
            "number", "params", "values", "val_accuracy", "test_accuracy", "run_dir")},
        "cost": {"plain_runs": cum, "plain_runs_cpu": cum_cpu, "trials": len(rows),
                 "pruned": len(pruned),
                 "pruning_saved": sum(1.0 - (r["cost"] or 1.0) for r in pruned)},
    }  # fmt: skip


def _retrain_block(results: dict[str, Any]) -> None:
    rows = results.get("retrain") or []
    plain = (results.get("reference") or {}).get("wall_seconds")
    for r in rows:  # a reused trial (the search seed's own run) costs nothing more
        r["cost"] = (0.0 if r.get("reused_trial") else
                     r["wall_seconds"] / plain if plain and r.get("wall_seconds") else None)  # fmt: skip
    mean, std = mean_std([r.get("test_accuracy") for r in rows])
    results["retrain_summary"] = {
        "seeds": [r["seed"] for r in rows], "test_accuracy_mean": mean, "test_accuracy_std": std,
    } if rows else None  # fmt: skip


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` and (searches) ``trials.csv`` in ``out``."""
    if results.get("kind") == "search":
        _retrain_block(results)
        cols = ["number", "state", "val_accuracy", "test_accuracy", "steps", "wall_seconds",
                "cpu_seconds", "cost", "cost_cpu", "cum_cost", "best_so_far", "run_dir"]  # fmt: skip
        names = list(dict.fromkeys(k for r in results["trials"] for k in (r["values"] or {})))
        lines = [",".join(cols + names)]
        for r in results["trials"]:
            cells = [_f(r[c], 6) if isinstance(r[c], float) else ("" if r[c] is None else str(r[c]))
                     for c in cols] + [str((r["values"] or {}).get(n, "")) for n in names]  # fmt: skip
            lines.append(",".join(cells))
        atomic_write_text(out / "trials.csv", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", "# " + results_markdown(results).lstrip("# "))
