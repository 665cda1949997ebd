"""The compute ledger: what a run or a study cost, in *plain-run equivalents*.

One plain run is a fixed-λ training run (``meta.method=fixed``) of the same settings on the same
machine. A run of S steps that took W wall seconds and C CPU seconds (``time.process_time`` of the
training loop, all threads of the process) costs

    plain_runs     = W / (w_ref · S)        plain_runs_cpu = C / (c_ref · S)

where ``w_ref``, ``c_ref`` are a fixed-λ run's wall and CPU seconds *per step* (evaluations
included). How the reference is obtained, in this order:

1. ``self``: a run that holds λ fixed (``fixed``, ``random``) is a plain run; it costs 1 and its
   per-step seconds are recorded in the machine's ledger cache (below).
2. ``cache``: the median per-step seconds of the last fixed-λ runs recorded in
   ``<data.cache_dir>/ledger/<key>.json``; the key hashes the cost-relevant settings (data, student,
   train except epochs, device) and the machine (host, torch threads, torch version).
3. ``calibration``: when the cache has none, a short fixed-λ run of the same config
   (``train.epochs`` × :data:`CALIBRATION_FRACTION`, at least one epoch) is timed in-process after the
   run has finished (it changes nothing the run wrote) and cached. The run passes that timing in as
   ``run_cost(..., calibrate=metakd.runs.build.calibrate)``: this module prices, it does not train.

The key and the calibration run take the kind of step the priced run ran (compiled or eager,
``summary["compiled"]``: ``train.compile=auto``'s choice, :mod:`metakd.training.methods.compiled`), so a compiled
run is priced in compiled plain runs; references are per-step seconds without the one-off compilation (``compile_seconds``),
which stays in the priced run's own wall time.

Studies and pipelines use their own fixed-λ runs as the reference (:func:`study_reference`): the
searchers' trials, and the pipeline's retrain, were measured alongside on the same machine. On a
shared machine the absolute seconds drift (10–25 % here); ratios measured in one sitting are the
meaningful numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from metakd.config import Config, LoaderConfig, config_to_dict
from metakd.runs.rundir import atomic_write_text

__all__ = [
    "CALIBRATION_FRACTION",
    "FIXED_METHODS",
    "cost_of",
    "lookup_reference",
    "record_reference",
    "reference_key",
    "run_cost",
    "study_reference",
]

log = logging.getLogger(__name__)

FIXED_METHODS = ("fixed", "random")
"""Trainer methods that hold λ fixed: each such run is a plain run (its own reference)."""

CALIBRATION_FRACTION = 0.05
"""Share of ``train.epochs`` a calibration run trains (at least one epoch)."""

_KEEP = 5  # samples kept per cache key


def reference_key(cfg: Config, world_size: int = 1) -> tuple[str, dict[str, Any]]:
    """(hash, fields): the settings and machine that a plain run's per-step cost depends on (a run on
    several ranks is priced in plain runs of the same world size)."""
    d = config_to_dict(cfg)
    train = {k: v for k, v in d["train"].items() if k not in ("epochs", "checkpoint_every")}
    # the kind of step: run_cost resolves auto to what the run chose; unresolved, auto means eager
    train["compile"] = "compiled" if train.get("compile") == "on" else "eager"
    if train.get("precision") == "fp32":  # the default: keys cached before the setting still match
        del train["precision"]
    data = {k: v for k, v in d["data"].items() if k not in ("data_seed", "cache_dir")}
    # the streaming defaults: the keys cached before data.in_memory still match
    defaults = {
        "in_memory": "auto",
        "memory_budget_mb": None,
        "loader": LoaderConfig().model_dump(),
    }
    if all(data.get(k) == v for k, v in defaults.items()):
        for k in defaults:
            del data[k]
    fields = {
        "data": data, "student": d["student"], "train": train, "device": d["device"],
        "host": platform.node(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }  # fmt: skip
    if world_size > 1:  # (absent for one process: the keys cached before several ranks still match)
        fields["world_size"] = world_size
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], fields


def _cache_path(cfg: Config, world_size: int = 1) -> Path:
    return Path(cfg.data.cache_dir) / "ledger" / f"{reference_key(cfg, world_size)[0]}.json"


def record_reference(
    cfg: Config, wall: float, cpu: float, steps: int, source: str, *, world_size: int = 1
) -> None:
    """Add one fixed-λ run's per-step seconds to the machine's ledger cache (the last 5 are kept)."""
    if steps <= 0 or not wall > 0:
        return
    path = _cache_path(cfg, world_size)
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        old = {}
    samples = list(old.get("samples", []))[-(_KEEP - 1) :]
    samples.append({
        "wall_per_step": wall / steps, "cpu_per_step": cpu / steps, "steps": steps,
        "source": source, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })  # fmt: skip
    payload = {"key": reference_key(cfg)[1], "samples": samples}
    try:
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    except OSError as exc:  # a read-only cache costs the cache, never the run
        log.warning("could not write the ledger cache %s: %s", path, exc)


def lookup_reference(cfg: Config, world_size: int = 1) -> dict[str, float] | None:
    """Median per-step ``{"wall_per_step", "cpu_per_step", "samples"}`` from the cache, or None."""
    path = _cache_path(cfg, world_size)
    try:
        samples = json.loads(path.read_text()).get("samples", []) if path.is_file() else []
    except (OSError, json.JSONDecodeError):
        return None
    if not samples:
        return None
    return {
        "wall_per_step": statistics.median(float(s["wall_per_step"]) for s in samples),
        "cpu_per_step": statistics.median(float(s["cpu_per_step"]) for s in samples),
        "samples": float(len(samples)),
    }


def cost_of(
    wall: float, cpu: float | None, ref_wall: float, ref_cpu: float | None
) -> dict[str, Any]:
    """``{"plain_runs", "plain_runs_cpu"}``: seconds over a plain run's seconds (None when unknown)."""
    return {
        "plain_runs": wall / ref_wall if ref_wall > 0 else None,
        "plain_runs_cpu": cpu / ref_cpu if cpu is not None and ref_cpu else None,
    }


def run_cost(
    cfg: Config,
    summary: Mapping[str, Any],
    *,
    calibrate: Callable[[Config], dict[str, float]] | None = None,
    world_size: int = 1,
) -> dict:
    """The ledger entry of a finished run: ``{"cost": {...}, "plain_runs": x}`` for summary.json.

    ``cost`` holds ``plain_runs`` (wall), ``plain_runs_cpu`` and ``reference`` (source and the
    reference's seconds for this run's step count). Never raises: a failed calibration is recorded
    as ``reference.error`` with ``plain_runs`` None."""
    wall = float(summary.get("wall_seconds") or 0.0)
    cpu = summary.get("cpu_seconds")
    steps = int(summary.get("steps") or 0)
    method = str(summary.get("method"))
    # the reference is a plain run of the same kind of step (metakd.training.methods.compiled): the cache
    # key and a calibration run carry what this run ran (auto's choice, or eager after a failure)
    cfg = cfg.model_copy(deep=True)
    cfg.train.compile = "on" if summary.get("compiled") else "off"
    ref: dict[str, Any]
    if method in FIXED_METHODS:
        own = wall - float(summary.get("compile_seconds") or 0.0)  # per-step seconds, not compiling
        source = f"run {summary.get('run_dir')}"
        record_reference(cfg, own, float(cpu or 0.0), steps, source, world_size=world_size)
        cost = {"plain_runs": 1.0, "plain_runs_cpu": 1.0 if cpu is not None else None}
        ref = {"source": "self", "wall_seconds": wall, "cpu_seconds": cpu}
        return {"cost": {**cost, "reference": ref}, "plain_runs": 1.0}
    found = lookup_reference(cfg, world_size)
    source = "cache"
    # baseline (no teacher term) only reads the cache: calibrating it would need a teacher
    if found is None and calibrate is not None and steps > 0 and method != "baseline":
        try:
            found, source = calibrate(cfg), "calibration"
        except Exception as exc:  # the run is done and kept; only its price is unknown
            log.warning("ledger calibration failed (%s); cost left unknown", exc)
            ref = {"source": "none", "error": f"{type(exc).__name__}: {exc}"}
            return {"cost": {"plain_runs": None, "plain_runs_cpu": None, "reference": ref},
                    "plain_runs": None}  # fmt: skip
    if found is None or steps <= 0:
        ref = {"source": "none"}
        return {"cost": {"plain_runs": None, "plain_runs_cpu": None, "reference": ref},
                "plain_runs": None}  # fmt: skip
    ref_wall, ref_cpu = found["wall_per_step"] * steps, found["cpu_per_step"] * steps
    cost = cost_of(wall, None if cpu is None else float(cpu), ref_wall, ref_cpu)
    ref = {"source": source, "wall_seconds": ref_wall, "cpu_seconds": ref_cpu,
           "samples": int(found["samples"])}  # fmt: skip
    return {"cost": {**cost, "reference": ref}, "plain_runs": cost["plain_runs"]}


def study_reference(runs: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Mean wall and CPU seconds per step of finished fixed-λ runs (a study's own plain runs):
    ``{"wall_per_step", "cpu_per_step", "runs"}``, or None without any."""
    rows = [r for r in runs if r.get("steps") and r.get("wall_seconds")]
    if not rows:
        return None
    walls = [float(r["wall_seconds"]) / int(r["steps"]) for r in rows]
    cpus = [float(r["cpu_seconds"]) / int(r["steps"]) for r in rows if r.get("cpu_seconds")]
    return {
        "wall_per_step": statistics.fmean(walls),
        "cpu_per_step": statistics.fmean(cpus) if cpus else 0.0,
        "runs": float(len(rows)),
    }
