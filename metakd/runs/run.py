"""One run end to end: data, teacher logits, student, :class:`~metakd.training.trainer.Trainer`, run directory.

:func:`train_run` seeds everything, loads the data and the (cached) teacher logits, builds the student
from the run seed, trains it, checkpoints every ``train.checkpoint_every`` epochs and at the end, and
writes ``summary.json``. A checkpoint holds all state a run depends on — student (with BatchNorm
buffers), both optimizers, raw λ, forecaster and its history, counters, and the torch/numpy/python
RNG states (batches are pure functions of (seed, step), see :mod:`metakd.training.trainer`) — so a run resumed
from any checkpoint ends exactly as the uninterrupted run does (on CPU, same seed).

The run's pieces are assembled by :mod:`metakd.runs.build`; ``metakd check-grad`` is
:mod:`metakd.runs.check_grad`.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import metakd
from metakd.config import Config, ConfigError
from metakd.data import teacher
from metakd.runs import ledger, parallel
from metakd.runs.build import (
    build,
    calibrate,
    check_components,
    get_rng_state,
    git_commit,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from metakd.runs.check_grad import check_grad
from metakd.runs.config import load_config
from metakd.runs.per_sample import write_per_sample
from metakd.runs.rundir import RunDir, atomic_write_bytes
from metakd.training.distributed import World, from_env
from metakd.training.precision import check as check_precision
from metakd.training.resume_state import CheckpointMismatch
from metakd.training.trainer import Callback, Trainer

__all__ = [  # the assembling helpers and check_grad are re-exported: their home is build / check_grad
    "check_components",
    "check_grad",
    "default_run_dir",
    "get_rng_state",
    "git_commit",
    "load_trainer",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
    "train_run",
]

log = logging.getLogger(__name__)


def default_run_dir(cfg: Config) -> Path:
    """``runs/<name>-<method>-<timestamp>`` (a suffix when that exists already)."""
    base = Path("runs") / f"{cfg.name}-{cfg.meta.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _cli_command() -> str | None:
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return shlex.join(["metakd", *sys.argv[1:]]) if argv0.startswith("metakd") else None


class _MetricsWriter(Callback):
    """Appends every metrics row the trainer emits to metrics.jsonl."""

    def __init__(self, rundir: RunDir) -> None:
        self.rundir = rundir
        self.rows = 0  # rows in metrics.jsonl, recorded in checkpoints to detect lost rows

    def on_step(self, row: Mapping[str, Any]) -> None:
        self.rundir.append_metrics(row)
        self.rows += 1

    def on_eval(self, row: Mapping[str, Any]) -> None:
        self.rundir.append_metrics(row)
        self.rows += 1


def load_trainer(
    run_dir: str | Path, epoch: int | None = None, *, device: str | torch.device = "cpu"
) -> Trainer:
    """The trainer of the run in ``run_dir``, rebuilt from its config.yaml (data, teacher logits, seeded
    student) and restored from the checkpoint of ``epoch`` (None: the newest; 0: the initial state,
    before the first step) — to inspect a run, e.g. its hypergradients at a checkpoint
    (:meth:`Trainer.hypergradient`) or its evaluation (:meth:`Trainer.evaluate`). A run keeps its two
    newest checkpoints; asking for another epoch raises ``FileNotFoundError`` naming the kept ones."""
    if not (Path(run_dir) / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no run (no config.yaml)")
    rd = RunDir(Path(run_dir))
    cfg = load_config(rd.config_path, [f"device={device}"])
    dev = resolve_device(cfg.device)
    state: dict[str, Any] | None = None
    if epoch is None:
        state = rd.load_checkpoint(required=("trainer",))
        if state is None:
            raise FileNotFoundError(
                f"{rd.path} has no checkpoint; pass epoch=0 for the initial state"
            )
    elif epoch > 0:
        path = rd.checkpoint_path(epoch)
        if not path.is_file():
            kept = [p.name for p in rd.checkpoints()]
            raise FileNotFoundError(
                f"{path} does not exist; the run keeps {kept or 'no checkpoints'}"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
    splits, logits, model = build(cfg, dev)
    trainer = Trainer(cfg, model, splits, logits, device=dev)
    if state is not None:
        _restore(trainer, state, rd)
    return trainer


def _restore(trainer: Trainer, state: Mapping[str, Any], rd: RunDir) -> None:
    """Load a checkpoint's trainer state after checking it was made on the same data."""
    fingerprint = str(trainer.splits.info.get("fingerprint", ""))
    if state.get("fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"the data of {rd.path} changed since its checkpoint (fingerprint "
            f"{state.get('fingerprint')} != {fingerprint}); start a new run with a new --out"
        )
    trainer.load_state_dict(state["trainer"])


def train_run(
    cfg: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    command: str | None = None,
    overwrite: bool = False,
    world: World | None = None,
) -> dict[str, Any]:
    """Train one student as configured; returns the summary (also written to summary.json).

    ``run_dir`` (default ``cfg.out``, else ``runs/<name>-<method>-<timestamp>``) receives config.yaml,
    metrics.jsonl, summary.json, checkpoints/ and run.log. ``resume=True`` continues from the newest
    valid checkpoint there (from the start when there is none); a completed run whose summary lacks
    its ledger entry (``cost``: killed during the calibration) gets it, without training again.
    A directory that already holds a run (checkpoints, metrics or summary) is refused without
    ``resume``, unless ``overwrite=True`` starts it over (its checkpoints and summary are deleted).
    ``command`` is recorded in the summary (default: the command line when run by the ``metakd``
    console script). Under torchrun (``world``, default from the environment) rank 0 writes the run
    and the other ranks follow it (:mod:`metakd.runs.parallel`).
    """
    device = resolve_device(cfg.device)
    check_precision(cfg.train.precision, device)  # fp16 off CUDA: before the run directory
    world = world or from_env(device)
    path = Path(run_dir if run_dir is not None else cfg.out or default_run_dir(cfg))
    path = parallel.broadcast(path, world)  # rank 0's (a default name holds a timestamp)
    if not world.is_main:
        return parallel.follow(cfg, path, device, world, calibrate)
    if resume and not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"cannot resume: {str(path)!r} holds no run (no config.yaml); drop --resume to start one"
        )
    check_components(cfg)
    if cfg.teacher.checkpoint is not None and cfg.meta.method != "baseline":
        teacher.check_checkpoint_path(cfg.teacher.checkpoint)  # fails before the run dir exists
    rd = RunDir(path)
    with rd.lock():  # a second process on the same run directory is refused, naming this PID
        rd.remove_orphans()
        before = rd.config_path.read_bytes() if resume and rd.config_path.is_file() else None
        rd.write_config(cfg, resume=resume, overwrite=overwrite)
        if not resume and not overwrite and _holds_a_run(rd):
            raise ConfigError(
                f"{rd.path} already holds a run with this config; continue it with --resume, pass "
                "a new --out DIR, or add --overwrite to delete it and start over"
            )
        with rd.attach_log(), contextlib.ExitStack() as stack:
            try:
                return _train(cfg, rd, device, resume, callbacks, command, stack, world)
            except CheckpointMismatch:
                if before is not None:  # the run keeps the config its checkpoints were made with
                    atomic_write_bytes(rd.config_path, before)
                raise
            except BaseException as exc:
                if not isinstance(exc, FloatingPointError):  # _train logged that one already
                    _record_failure(rd, exc)
                raise
            finally:
                rd.close()


def _holds_a_run(rd: RunDir) -> bool:
    """Whether starting in ``rd`` would delete a run: its checkpoints, metrics or summary."""
    return bool(rd.checkpoints()) or rd.metrics_path.exists() or rd.summary_path.exists()


def _costless(rd: RunDir) -> dict[str, Any] | None:
    """The summary of a completed run without its ledger entry (its process was killed while the
    ledger calibrated, after the summary was written); None for any other run directory."""
    try:
        done = rd.read_summary()
    except ValueError:  # unreadable: the resume rewrites it
        return None
    if done is None or done.get("status") != "completed" or "cost" in done:
        return None
    return done


def _fill_cost(
    cfg: Config, rd: RunDir, done: dict[str, Any], cal: parallel.Calibration
) -> dict[str, Any]:
    """:func:`_costless`'s run with its ledger entry computed and written (no training)."""
    log.info("%s is complete but has no cost (interrupted in the ledger); computing it", rd.path)
    world_size = int(done.get("world_size") or 1)
    done.update(ledger.run_cost(cfg, done, calibrate=cal, world_size=world_size))
    cal.close()
    rd.write_summary(done)
    return done


def _all_meta_steps_failed(trainer: Trainer) -> str | None:
    """The cause, when every hypergradient of the run was non-finite (so λ never moved); else None."""
    done, skipped = (trainer.counters[k] for k in ("hypergradient_steps", "skipped_meta_steps"))
    if done == 0 or skipped < done:
        return None
    mc = trainer.cfg.meta
    return (
        f"every meta step was skipped ({skipped} of {done}): the hypergradient was never finite, so "
        f"λ never moved from its initial value; check meta.params (ranges of λ), meta.lr (now "
        f"{mc.lr:g}) and train.lr (now {trainer.cfg.train.lr:g}), e.g. with metakd check-grad"
    )


def _record_failure(rd: RunDir, exc: BaseException) -> None:
    """Append why the run stopped to run.log (only there: the caller reports it to the user), so a
    run directory left by a failed start says what happened."""
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    line = (
        f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(rd.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} ERROR metakd.runs.run: run {what}: {line}\n")
    except OSError:  # a full disk or a removed directory must not hide the original error
        pass


def _train(
    cfg: Config, rd: RunDir, device: torch.device, resume: bool, callbacks: Sequence[Callback],
    command: str | None, stack: contextlib.ExitStack, world: World,
) -> dict[str, Any]:  # fmt: skip
    cal = parallel.Calibration(world, calibrate)
    if resume and (done := _costless(rd)) is not None:
        parallel.broadcast(parallel.Start(done=True), world)
        return _fill_cost(cfg, rd, done, cal)
    ckpt = rd.load_checkpoint(required=("trainer", "rng")) if resume else None
    parallel.broadcast(parallel.Start(epoch=None if ckpt is None else int(ckpt["epoch"])), world)
    cpu_base = float(ckpt.get("cpu_seconds", 0.0)) if ckpt is not None else 0.0
    cpu_start: list[float] = []  # process_time() when training started (CPU seconds of the loop)

    def cpu_seconds() -> float:
        return cpu_base + (time.process_time() - cpu_start[0] if cpu_start else 0.0)

    if not resume and _holds_a_run(rd):  # overwrite=True (train_run refuses it otherwise)
        log.warning("%s already holds a run; starting it over (--overwrite)", rd.path)
        for p in rd.checkpoints():
            p.unlink()
        rd.summary_path.unlink(missing_ok=True)
    splits, logits, model = build(cfg, device, callbacks, stack)
    writer = _MetricsWriter(rd)
    trainer = Trainer(
        cfg, model, splits, logits, device=device, callbacks=[writer, *callbacks], world=world
    )
    fingerprint = str(splits.info.get("fingerprint", ""))
    if ckpt is not None:
        _restore(trainer, ckpt, rd)
        set_rng_state(ckpt["rng"])
        log.info("resumed %s at epoch %d (step %d)", rd.path, trainer.epoch, trainer.step)
    elif resume:
        log.warning("no checkpoint in %s; starting from the beginning", rd.path)
    expected = ckpt.get("metrics_rows") if ckpt is not None else None
    writer.rows = rd.truncate_metrics(trainer.step, expected if isinstance(expected, int) else None)
    # every command that worked on this run, the original first (report.md lists them)
    current = command if command is not None else _cli_command()
    history = [str(c) for c in (ckpt.get("commands") or [])] if ckpt is not None else []
    commands = [*history, current] if current else history
    info = {
        **{k: v for k, v in splits.info.items() if isinstance(v, (str, int, float, bool)) or v is None},
        "device": str(device), "total_steps": trainer.total_steps, "start_step": trainer.step,
        "steps_per_epoch": trainer.steps_per_epoch, "run_dir": str(rd.path), "resumed": ckpt is not None,
    }  # fmt: skip
    for cb in callbacks:
        cb.on_run_start(cfg, rd.path, info)
    log.info("run %s: %s, %d steps on %s", rd.path, cfg.meta.method, trainer.total_steps, device)
    if cfg.meta.preset == "practice" and cfg.meta.method in ("hypergrad", "forecast"):
        m = cfg.meta
        log.info(
            "meta.preset=practice: %s hypergradient, a meta step every %d steps, meta %s lr %g, "
            "train.normalize_weights=%s (meta.preset=paper: the paper's one-step hypergradient)",
            m.hypergrad.method if m.hypergrad.method == "online" else f"{m.hypergrad.method} η={m.unroll}",
            m.every, m.optimizer, m.lr, cfg.train.normalize_weights,
        )  # fmt: skip

    def checkpoint(epoch: int) -> None:
        if epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs:
            state = {
                "trainer": trainer.state_dict(), "rng": get_rng_state(), "epoch": epoch,
                "step": trainer.step, "fingerprint": fingerprint, "metakd_version": metakd.__version__,
                "cpu_seconds": cpu_seconds(),
                "teacher": {"checkpoint": cfg.teacher.checkpoint, "fingerprint": fingerprint},
                "metrics_rows": writer.rows, "commands": commands,
            }  # fmt: skip
            rd.save_checkpoint(state, epoch)

    def summary(status: str) -> dict[str, Any]:
        return {
            "name": cfg.name, "seed": cfg.seed, **trainer.summary(), "cpu_seconds": cpu_seconds(),
            "world_size": world.size, "meta_preset": cfg.meta.preset,
            "status": status,
            "device": str(device), "metakd_version": metakd.__version__, "git_commit": git_commit(),
            "run_dir": str(rd.path), "command": current, "commands": commands,
        }  # fmt: skip

    try:
        cpu_start.append(time.process_time())
        trainer.train(on_epoch_end=checkpoint)
        cause = _all_meta_steps_failed(trainer)
        if cause is not None:
            raise FloatingPointError(cause)
    except FloatingPointError as exc:
        failed = {**summary("failed"), "error": str(exc)}
        rd.write_summary(failed)
        log.error("%s (run record so far in %s)", exc, rd.path)
        raise
    result = summary("completed")
    write_per_sample(trainer, rd.path)  # label noise / per-sample λ (metakd.runs.per_sample)
    rd.write_summary(result)  # written before the ledger entry: a failed calibration loses nothing
    result.update(ledger.run_cost(cfg, result, calibrate=cal, world_size=world.size))
    cal.close()
    rd.write_summary(result)
    acc = result.get("test_accuracy")
    log.info(
        "finished %s: test accuracy %s", rd.path, f"{acc:.4f}" if isinstance(acc, float) else acc
    )
    for cb in callbacks:
        cb.on_run_end(result)
    return result
