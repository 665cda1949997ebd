"""Assembling one run: device, seeds and RNG states, data, teacher logits and the seeded student.

:func:`build` is the one place a run's pieces are made from its config — :func:`metakd.runs.run.train_run`,
:func:`metakd.runs.run.load_trainer`, :func:`metakd.runs.check_grad.check_grad` and the ledger's
:func:`calibrate` (a short fixed-λ run timed as the cost reference) all start from it, so a run, its
reload and its price are built the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metakd import data, plugins, threads
from metakd.config import DATA_SOURCES, Config, ConfigError, config_to_dict
from metakd.data import models, pretrained, teacher
from metakd.data.targets import CachedLogits, LiveTeacher, TeacherTargets, deterministic_inputs
from metakd.functional.metaparams import constrain
from metakd.runs import ledger
from metakd.training import objectives
from metakd.training.distributed import World
from metakd.training.precision import autocast_dtype
from metakd.training.trainer import Callback, Trainer

__all__ = [
    "build",
    "calibrate",
    "check_components",
    "get_rng_state",
    "git_commit",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
]

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``; ``cuda[:i]`` (an error when CUDA is absent)."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"unknown device {str(name)!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(name)!r} was requested but CUDA is not available to this torch "
            f"({torch.__version__}); use --device cpu or --device auto"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {str(name)!r}; use auto, cpu or cuda")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's legacy global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Global RNG states as tensors/numbers (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }  # fmt: skip
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str | None:
    """The commit of the metakd source tree (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _teacher_progress(callbacks: Sequence[Callback]) -> teacher.ProgressFactory:
    """The first display a callback offers for an in-process teacher's training (else none)."""

    def factory(epochs: int) -> AbstractContextManager[teacher.Progress | None]:
        for cb in callbacks:
            bar = cb.teacher_progress(epochs)
            if bar is not None:
                return bar
        return contextlib.nullcontext()

    return factory


def _work_size(cfg: Config, splits: Any) -> int:
    """:func:`metakd.threads.work_size` of a run's student step (from the data, before the model)."""
    n_train = int(splits.train.y.shape[0])
    rows = n_train if cfg.train.batch_size is None else min(cfg.train.batch_size, n_train)
    shape = tuple(int(s) for s in splits.train.x.shape[1:])
    try:  # the parameter count without allocating; the RNG is left as it was
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            n_params = sum(
                p.numel()
                for p in models.build_model(cfg.student, shape, splits.num_classes).parameters()
            )
    except Exception:  # a user model that cannot be built on the meta device: count the data only
        n_params = 0
    return threads.work_size(rows, shape, n_params)


def build(
    cfg: Config,
    device: torch.device,
    callbacks: Sequence[Callback] = (),
    stack: contextlib.ExitStack | None = None,
) -> tuple[Any, TeacherTargets | None, torch.nn.Module]:
    """(splits, the teacher's targets of the train batches — None for baseline or an objective
    without a teacher —, seeded student on ``device``). The targets are the cached logits of
    :func:`metakd.data.teacher.teacher_logits` when the input pipeline is deterministic, else
    (``data.augment``, ``data.train_transform``) the teacher module run on each batch as fed
    (:mod:`metakd.data.targets`).
    With ``stack``, torch's threads are chosen for the run from its work size
    (:mod:`metakd.threads`) until the stack closes."""
    autocast_dtype(cfg.train.precision, device)  # fp16 off CUDA: refused before any data or teacher
    seed_everything(cfg.seed)
    splits = data.load_data(cfg.data, cfg.seed, device)
    if stack is not None and device.type == "cpu":
        stack.enter_context(threads.run_threads(_work_size(cfg, splits)))
    targets: TeacherTargets | None = None
    if cfg.meta.method != "baseline" and objectives.build(cfg).needs_teacher:
        progress = _teacher_progress(callbacks)
        if deterministic_inputs(cfg.data):
            logits = teacher.teacher_logits(cfg, splits, device, progress=progress)
            targets = CachedLogits(logits["train"])
        else:
            module = teacher.teacher_module(cfg, splits, device, progress=progress)
            targets = LiveTeacher(module, autocast=autocast_dtype(cfg.train.precision, device))
    torch.manual_seed(cfg.seed)  # the same initial student for every method of a seed
    shape = tuple(int(s) for s in splits.train.x.shape[1:])
    model = models.build_model(cfg.student, shape, splits.num_classes).to(device)
    return splits, targets, model


def check_components(cfg: Config) -> None:
    """Resolve the config's import paths (``student.name``, ``teacher.model.name``,
    ``forecast.forecaster``, ``data.name``) and check their kind, and that ``teacher.weights`` is a file,
    before a run directory is created or a teacher trained; nothing found is called
    (:mod:`metakd.plugins`). Raises ``ConfigError``."""
    models_ = [("student.name", cfg.student.name)]
    if cfg.meta.method != "baseline":
        models_.append(("teacher.model.name", cfg.teacher.model.name))
        if cfg.teacher.weights is not None:
            pretrained.check_weights_path(cfg.teacher.weights)
    for key, name in models_:
        if ":" in name:
            plugins.load_model(name, kind=key)
    if cfg.meta.method == "forecast" and ":" in cfg.forecast.forecaster:
        plugins.load_forecaster(cfg.forecast.forecaster, kind="forecast.forecaster")
    if cfg.data.name not in DATA_SOURCES:  # a user's data source by import path
        plugins.load_data_source(cfg.data.name)


def calibrate(
    cfg: Config, world: World | None = None, fraction: float = ledger.CALIBRATION_FRACTION
) -> dict[str, float]:
    """Time a short fixed-λ run of ``cfg`` (no run directory) and cache its per-step seconds; with
    several ranks (``world``) every rank takes part and rank 0 records it."""
    world = world or World()
    epochs = max(1, math.ceil(cfg.train.epochs * fraction))
    data = config_to_dict(cfg)
    data["meta"]["method"] = "fixed"
    # any λ costs the same: hold each metaparameter at c(0), the middle of its range
    data["meta"]["values"] = {
        name: float(constrain(torch.zeros(()), spec)) for name, spec in cfg.meta.params.items()
    }
    data["train"]["epochs"] = epochs
    data["wandb"]["mode"] = "disabled"
    short = Config.model_validate(data)
    device = resolve_device(short.device)
    log.info("ledger: timing a plain (fixed-λ) run of %d epochs as the cost reference", epochs)
    splits, logits, model = build(short, device)
    trainer = Trainer(short, model, splits, logits, device=device, world=world)
    cpu0 = time.process_time()
    summary = trainer.train()
    cpu = time.process_time() - cpu0
    # a compiled reference: its per-step seconds without its one-off compilation
    wall, steps = trainer.wall_seconds - summary["compile_seconds"], trainer.step
    if world.is_main:
        source = f"calibration ({epochs} epochs)"
        ledger.record_reference(cfg, wall, cpu, steps, source, world_size=world.size)
    return {"wall_per_step": wall / steps, "cpu_per_step": cpu / steps, "samples": 1.0}
