"""One run end to end: data, teacher logits, student, :class:`~metakd.training.trainer.Trainer`, run directory.

:func:`train_run` seeds everything, loads the data and the (cached) teacher logits, builds the student
from the run seed, trains it, checkpoints every ``train.checkpoint_every`` epochs and at the end, and
writes ``summary.json``. A checkpoint holds all state a run depends on — student (with BatchNorm
buffers), both optimizers, raw λ, forecaster and its history, counters, and the torch/numpy/python
RNG states (batches are pure functions of (seed, step), see :mod:`metakd.training.trainer`) — so a run resumed
from any checkpoint ends exactly as the uninterrupted run does (on CPU, same seed).

:func:`check_grad` compares the configured hypergradient with central finite differences of the bilevel
objective L_val(U^η(w0, λ(r))) computed by an independent float64 unroll.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

import metakd
from metakd import data, hypergrad, plugins, threads
from metakd.runs import ledger
from metakd.functional import losses
from metakd.data import models, teacher
from metakd.training import objectives
from metakd.config import Config, ConfigError, TrainConfig, load_config
from metakd.runs.rundir import RunDir
from metakd.status import StatusLine
from metakd.training.trainer import Callback, Trainer

__all__ = [
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


def _build(
    cfg: Config,
    device: torch.device,
    callbacks: Sequence[Callback] = (),
    stack: contextlib.ExitStack | None = None,
) -> tuple[Any, dict[str, Tensor] | None, torch.nn.Module]:
    """(splits, teacher logits — None for baseline or an objective without a teacher —, seeded
    student on ``device``). With ``stack``, torch's threads are chosen for the run from its work
    size (:mod:`metakd.threads`) until the stack closes."""
    seed_everything(cfg.seed)
    splits = data.load_data(cfg.data, cfg.seed, device)
    if stack is not None and device.type == "cpu":
        stack.enter_context(threads.run_threads(_work_size(cfg, splits)))
    logits = None
    if cfg.meta.method != "baseline" and objectives.build(cfg).needs_teacher:
        logits = teacher.teacher_logits(cfg, splits, device, progress=_teacher_progress(callbacks))
    torch.manual_seed(cfg.seed)  # the same initial student for every method of a seed
    shape = tuple(int(s) for s in splits.train.x.shape[1:])
    model = models.build_model(cfg.student, shape, splits.num_classes).to(device)
    return splits, logits, model


def check_components(cfg: Config) -> None:
    """Resolve the config's import paths (``student.name``, ``teacher.model.name``,
    ``forecast.forecaster``) and check their kind before a run directory is created or a teacher
    trained; nothing found is called (:mod:`metakd.plugins`). Raises ``ConfigError``."""
    models_ = [("student.name", cfg.student.name)]
    if cfg.meta.method != "baseline":
        models_.append(("teacher.model.name", cfg.teacher.model.name))
    for key, name in models_:
        if ":" in name:
            plugins.load_model(name, kind=key)
    if cfg.meta.method == "forecast" and ":" in cfg.forecast.forecaster:
        plugins.load_forecaster(cfg.forecast.forecaster, kind="forecast.forecaster")


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
    splits, logits, model = _build(cfg, dev)
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
) -> dict[str, Any]:
    """Train one student as configured; returns the summary (also written to summary.json).

    ``run_dir`` (default ``cfg.out``, else ``runs/<name>-<method>-<timestamp>``) receives config.yaml,
    metrics.jsonl, summary.json, checkpoints/ and run.log. ``resume=True`` continues from the newest
    valid checkpoint there (from the start when there is none). ``command`` is recorded in the summary
    (default: the command line when run by the ``metakd`` console script).
    """
    device = resolve_device(cfg.device)
    path = Path(run_dir if run_dir is not None else cfg.out or default_run_dir(cfg))
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
        rd.write_config(cfg, resume=resume)
        with rd.attach_log(), contextlib.ExitStack() as stack:
            try:
                return _train(cfg, rd, device, resume, callbacks, command, stack)
            except BaseException as exc:
                if not isinstance(exc, FloatingPointError):  # _train logged that one already
                    _record_failure(rd, exc)
                raise
            finally:
                rd.close()


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
    command: str | None, stack: contextlib.ExitStack,
) -> dict[str, Any]:  # fmt: skip
    ckpt = rd.load_checkpoint(required=("trainer", "rng")) if resume else None
    cpu_base = float(ckpt.get("cpu_seconds", 0.0)) if ckpt is not None else 0.0
    cpu_start: list[float] = []  # process_time() when training started (CPU seconds of the loop)

    def cpu_seconds() -> float:
        return cpu_base + (time.process_time() - cpu_start[0] if cpu_start else 0.0)

    if not resume and (rd.checkpoints() or rd.metrics_path.exists()):
        log.warning("%s already holds a run with this config; starting it over", rd.path)
        for p in rd.checkpoints():
            p.unlink()
        rd.summary_path.unlink(missing_ok=True)
    splits, logits, model = _build(cfg, device, callbacks, stack)
    writer = _MetricsWriter(rd)
    trainer = Trainer(cfg, model, splits, logits, device=device, callbacks=[writer, *callbacks])
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
    rd.write_summary(result)  # written before the ledger entry: a failed calibration loses nothing
    result.update(ledger.run_cost(cfg, result))
    rd.write_summary(result)
    acc = result.get("test_accuracy")
    log.info(
        "finished %s: test accuracy %s", rd.path, f"{acc:.4f}" if isinstance(acc, float) else acc
    )
    for cb in callbacks:
        cb.on_run_end(result)
    return result


# --------------------------------------------------------------------------- check_grad


def _plain_step(
    cfg: TrainConfig, w: list[Tensor], g: list[Tensor], state: dict[str, Any],
    lam: Mapping[str, Any] | None = None,
) -> list[Tensor]:  # fmt: skip
    """One torch.optim.SGD/Adam step written out (independent of metakd.functional.optim), out of place; a
    learning rate / weight decay among the metaparameters ``lam`` replaces train.lr / weight_decay."""
    lam = lam or {}
    lr, wd = lam.get("lr", cfg.lr), lam.get("weight_decay", cfg.weight_decay)
    t = state["t"] = state.get("t", 0) + 1
    g = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
    if cfg.optimizer == "sgd":
        if cfg.momentum:
            buf = state.get("buf")
            buf = (
                g if buf is None else [cfg.momentum * b + gi for b, gi in zip(buf, g, strict=True)]
            )
            state["buf"] = buf
            g = (
                [gi + cfg.momentum * b for gi, b in zip(g, buf, strict=True)]
                if cfg.nesterov
                else buf
            )
        return [wi - lr * gi for wi, gi in zip(w, g, strict=True)]
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(state.get("m", [0.0] * len(g)), g, strict=True)]
    v = [
        b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(state.get("v", [0.0] * len(g)), g, strict=True)
    ]
    state["m"], state["v"] = m, v
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    return [
        wi - lr / bc1 * mi / (vi.sqrt() / bc2**0.5 + eps)
        for wi, mi, vi in zip(w, m, v, strict=True)
    ]


def check_grad(
    cfg: Config, *, eps: float = 1e-3, callbacks: Sequence[Callback] = ()
) -> dict[str, dict[str, Any]]:
    """Configured hypergradient vs central finite differences, at initialisation.

    The reference re-runs the η-step unroll of the first η training batches with plain loops in float64
    for r ± eps·e_i (each entry of each raw metaparameter): fd_i = (L(r + eps e_i) - L(r - eps e_i))/(2 eps).
    Returns ``{name: {"hypergrad", "finite_difference", "rel_error", "resolution", "resolved",
    "val_loss"}}`` (lists for non-scalar λ) with rel_error = |hg - fd| / max(|hg|, |fd|) (no floor) and
    resolution = the reference's own error estimate: |fd(eps) - fd(2 eps)| / 3 (Richardson: the
    O(eps²) truncation error) + 16 ε64 max|L(r ± eps e_i)| / eps (float64 round-off of L divided by
    the step). ``resolved`` is False where max(|hg|, |fd|) <= resolution: such an entry cannot be
    checked at this setting and a caller must not count it as a pass. ``callbacks`` get the
    in-process teacher's progress (:meth:`Callback.teacher_progress`).
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    meta_cfg = cfg.meta.model_copy(update={"method": "hypergrad"})
    cfg = cfg.model_copy(update={"meta": meta_cfg})
    device = resolve_device(cfg.device)
    splits, logits, model = _build(cfg, device, callbacks)
    trainer = Trainer(cfg, model, splits, logits, device=device)
    assert trainer.meta is not None
    model.train()
    batches = [trainer.batch(i) for i in range(cfg.meta.unroll)]
    vx, vy = trainer.val_batch(0)
    inner, state = trainer.inner_optimizer()  # meta.params.lr / weight_decay bound to raw λ
    hc = cfg.meta.hypergrad
    # Online tangents carried over the first η steps from Z = 0 are forward mode over those steps
    # (with γ = 1: the finite differences below hold λ fixed, so online_decay is not applied).
    method = "forward" if hc.method == "online" else hc.method
    log.info("check-grad: the %s hypergradient over η = %d steps", method, cfg.meta.unroll)
    res_grads = hypergrad.hypergradient(
        trainer.train_loss, trainer.val_loss, trainer.fmodel.params(), trainer.meta.raw, batches,
        (vx, vy), optimizer=inner, opt_state=state, method=method, backend=hc.backend,
        fd_eps=hc.fd_eps, checkpoint=hc.checkpoint,
    ).grads  # fmt: skip

    model64 = copy.deepcopy(model).double().train()
    names = [k for k, _ in model64.named_parameters()]
    w0 = [p.detach().clone() for _, p in model64.named_parameters()]
    bufs = {k: b.detach() for k, b in model64.named_buffers()}
    b64 = [(x.double(), y, t.double() if t is not None else None) for x, y, t in batches]

    def forward(w: list[Tensor], x: Tensor) -> Tensor:
        params = dict(zip(names, w, strict=True))
        return functional_call(model64, (params, {k: b.clone() for k, b in bufs.items()}), (x,))

    def objective(raw: dict[str, Tensor]) -> float:
        assert trainer.meta is not None
        lam = trainer.meta.constrained(raw)
        w, st = list(w0), {}  # type: ignore[var-annotated]
        for x, y, t in b64:
            w = [wi.detach().requires_grad_(True) for wi in w]
            out = forward(w, x)
            loss = trainer.loss(out, y, t, lam)
            g = torch.autograd.grad(loss, w)
            with torch.no_grad():
                w = _plain_step(cfg.train, w, list(g), st, lam)
        with torch.no_grad():
            return float(losses.cross_entropy(forward(w, vx.double()), vy))

    raw64 = {k: v.detach().double() for k, v in trainer.meta.raw.items()}
    val_loss = objective(raw64)
    round_off = 16 * torch.finfo(torch.float64).eps

    def central(name: str, r: Tensor, i: int, step: float) -> tuple[float, float]:
        """(central difference of L along entry i with this step, max |L| of its two points)."""
        vals = []
        for sign in (1.0, -1.0):
            shifted = r.clone().reshape(-1)
            shifted[i] += sign * step
            vals.append(objective({**raw64, name: shifted.reshape(r.shape)}))
        return (vals[0] - vals[1]) / (2 * step), max(abs(v) for v in vals)

    entries = sum(r.numel() for r in raw64.values())
    log.info(
        "check-grad: finite differences, %d float64 unrolls of η = %d steps (4 per λ entry)",
        4 * entries, cfg.meta.unroll,
    )  # fmt: skip
    status = StatusLine(log, "check-grad: finite differences, λ entries", entries)
    result: dict[str, dict[str, Any]] = {}
    for name, r in raw64.items():
        fd = torch.zeros(r.numel(), dtype=torch.float64)
        res = torch.zeros_like(fd)
        for i in range(r.numel()):
            fd1, size = central(name, r, i, eps)
            fd2, _ = central(name, r, i, 2 * eps)
            status.update()
            fd[i] = fd1
            res[i] = abs(fd1 - fd2) / 3 + round_off * size / eps
        hg = res_grads[name].detach().double().cpu().reshape(-1)
        scale = torch.maximum(hg.abs(), fd.abs())
        rel = torch.where(scale > 0, (hg - fd).abs() / scale, torch.zeros_like(scale))
        resolved = scale > res

        def plain(t: Tensor, shape: torch.Size = r.shape) -> Any:
            return t.reshape(-1)[0].item() if len(shape) == 0 else t.reshape(shape).tolist()

        result[name] = {
            "hypergrad": plain(hg),
            "finite_difference": plain(fd),
            "rel_error": plain(rel),
            "resolution": plain(res),
            "resolved": plain(resolved),
            "val_loss": val_loss,
        }
    return result
