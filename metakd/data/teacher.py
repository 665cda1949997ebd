"""Teachers: training, checkpoints, and the teacher-logit cache.

The student's training loss (eq. 4) needs the teacher's logits f(x) on D_train, and evaluation uses them on
D_val and D_test. :func:`teacher_logits` computes them **once** with the teacher in eval mode and caches
them on disk under ``cfg.data.cache_dir``, keyed by

* the SHA-256 of the teacher checkpoint file (``teacher.checkpoint`` set), of the weights file and the
  model config (``teacher.weights``: any ``nn.Module`` with a state_dict, never trained,
  :mod:`metakd.data.pretrained`), or the teacher config, the data fingerprint, ``data.augment`` and the
  run seed (neither set: the teacher is trained in-process with :func:`train_teacher`, as the paper's
  synthetic experiment does), and
* ``splits.info["fingerprint"]`` (the exact data).

A cache hit loads the tensors and never builds or runs the teacher; either way one log line says which
(``metakd.data.teacher`` logger: the cache file, the teacher's source and the data fingerprint), and an
in-process teacher's training reports each epoch to the ``progress`` factory (a bar on the CLI).

Cached logits are right only for a deterministic input pipeline (:func:`metakd.data.targets.deterministic_inputs`).
With ``data.augment`` the student is fed random crops and flips, so the run evaluates the teacher module itself
on every batch as fed (:class:`metakd.data.targets.LiveTeacher`); :func:`teacher_module` gives that module,
an in-process one trained once and cached as a teacher checkpoint under the same kind of key.

Checkpoints (:func:`save_teacher`) hold only plain containers and tensors — the state dict, the teacher's
``ModelConfig`` as a dict, the input shape, the number of classes, the metrics, the full config and the
data fingerprints — so ``torch.load(path, weights_only=True)`` reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metakd.config import Config, ConfigError, ModelConfig, TeacherConfig, config_to_dict
from metakd.data import Split, Splits, augment_batch, pretrained
from metakd.data.models import build_model
from metakd.files import atomic_torch_save, file_sha256
from metakd.status import StatusLine

__all__ = [
    "CHECKPOINT_FORMAT",
    "ProgressFactory",
    "check_checkpoint_path",
    "evaluate",
    "load_teacher",
    "predict_logits",
    "save_teacher",
    "teacher_logits",
    "teacher_module",
    "train_teacher",
]

CHECKPOINT_FORMAT = "metakd-teacher/1"
_LOGITS_FORMAT = "metakd-teacher-logits/1"
_EVAL_BATCH = 1024
Progress = Callable[[int, dict[str, Any]], None]
#: ``factory(epochs)`` -> a context manager giving the :data:`Progress` callback of one teacher training
#: (e.g. :class:`metakd.reporting.progress.TeacherProgress`), or None for no progress.
ProgressFactory = Callable[[int], AbstractContextManager[Progress | None]]

log = logging.getLogger(__name__)


def _sha256_json(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _optimizer(cfg: TeacherConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _scheduler(cfg: TeacherConfig, opt: torch.optim.Optimizer, steps: int) -> Any:
    """torch's per-batch scheduler of ``teacher.lr_schedule`` over ``steps`` batches (None: constant)."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if cfg.lr_schedule == "onecycle":  # peak lr = teacher.lr; momentum stays teacher.momentum
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=steps, cycle_momentum=False
        )
    return None


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = _EVAL_BATCH) -> Tensor:
    """Logits (N, K) float32 of ``model`` on x (N, ...) in batches; sets ``model.eval()``."""
    model.eval()
    return torch.cat([model(chunk).float() for chunk in x.split(batch_size)])


def evaluate(model: nn.Module, split: Split, batch_size: int = _EVAL_BATCH) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on the teacher inputs of ``split``."""
    logits = predict_logits(model, split.x_teacher, batch_size)
    return {
        "loss": float(F.cross_entropy(logits, split.y)),
        "accuracy": float((logits.argmax(1) == split.y).float().mean()),
    }


def train_teacher(
    cfg: Config,
    splits: Splits,
    device: torch.device | str,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``cfg.teacher.model`` on ``splits.teacher`` (teacher inputs) with cross-entropy.

    ``teacher.optimizer``/``lr``/``momentum``/``weight_decay``; ``teacher.epochs`` passes over the data in
    batches of ``teacher.batch_size`` (None: full batch, so an epoch is one step — the paper's synthetic
    teacher is 10,000 full-batch Adam steps at lr 1e-3); ``teacher.lr_schedule`` steps torch's cosine or
    one-cycle scheduler per batch (``final_lr`` in the metrics), ``teacher.bf16`` autocasts the forward
    pass, ``teacher.channels_last`` stores 4-D weights and batches channels-last. Image batches are
    augmented (random crop + flip) when ``data.augment``, transformed by ``splits.train_transform`` when
    ``data.train_transform``. Initialisation and batch order are seeded by
    ``cfg.seed`` without touching the global RNG. ``progress(epoch, row)`` gets ``{"loss": mean training
    loss}`` every epoch, plus ``test_accuracy``/``test_loss`` on the ~20 evaluation epochs (every
    ``max(1, epochs // 20)``, and the last). Returns the model (eval mode, on ``device``) and metrics:
    ``teacher_accuracy``, ``teacher_loss``, ``test_accuracy``, ``test_loss``, ``final_lr``, ``epochs``,
    ``steps``, ``wall_seconds``, ``device``, ``input_shape``, ``num_classes`` and the data fingerprints.
    """
    dev = torch.device(device)
    tcfg = cfg.teacher
    data = splits.teacher
    input_shape = tuple(int(s) for s in data.x_teacher.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(tcfg.model, input_shape, splits.num_classes)
    channels_last = tcfg.channels_last and data.x_teacher.dim() == 4
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _optimizer(tcfg, model.parameters())
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = data.x_teacher.to(dev), data.y.to(dev)
    n = len(data)
    batch = n if tcfg.batch_size is None else min(tcfg.batch_size, n)
    sched = _scheduler(tcfg, opt, tcfg.epochs * -(-n // batch))
    augment = cfg.data.augment and x_all.dim() == 4
    eval_every = max(1, tcfg.epochs // 20)
    steps = 0
    start = time.perf_counter()
    row: dict[str, Any] = {}
    for epoch in range(tcfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(dev) if batch < n else None
        total = torch.zeros((), device=dev)
        # A long epoch (CIFAR on a CPU: a minute) reaches ``progress`` only at its end: log a status
        # line every 10 s inside it (nothing for epochs shorter than that).
        status = StatusLine(log, f"teacher: epoch {epoch + 1}/{tcfg.epochs}, batch", -(-n // batch))
        for lo in range(0, n, batch):
            if order is None:
                xb, yb = x_all, y_all
            else:
                idx = order[lo : lo + batch]
                xb, yb = x_all[idx], y_all[idx]
            if augment:
                xb = augment_batch(xb, gen)
            elif splits.train_transform is not None:  # data.train_transform: seeded by the stream
                xb = splits.train_transform(xb, int(torch.randint(2**62, (), generator=gen)))
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tcfg.bf16):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach() * len(yb)
            steps += 1
            status.update()
        row = {"loss": float(total) / n}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == tcfg.epochs:
            test = evaluate(model, splits.test)
            row.update(test_accuracy=test["accuracy"], test_loss=test["loss"])
        if progress is not None:
            progress(epoch, row)
    wall = time.perf_counter() - start
    model.eval()
    fit = evaluate(model, data)
    test = evaluate(model, splits.test)
    metrics: dict[str, Any] = {
        "teacher_accuracy": fit["accuracy"],
        "teacher_loss": fit["loss"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "final_train_loss": row.get("loss"),
        "final_lr": float(opt.param_groups[0]["lr"]),
        "epochs": tcfg.epochs,
        "steps": steps,
        "wall_seconds": wall,
        "device": str(dev),
        "model": tcfg.model.name,
        "input_shape": list(input_shape),
        "num_classes": splits.num_classes,
        "data_fingerprint": splits.info.get("fingerprint"),
        "teacher_fingerprint": splits.info.get("teacher_fingerprint"),
        "data_seed": splits.info.get("data_seed"),
    }
    return model, metrics


def save_teacher(
    path: str | Path,
    model: nn.Module,
    cfg: Config,
    metrics: dict[str, Any],
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> Path:
    """Write a teacher checkpoint atomically; returns its path.

    ``input_shape``/``num_classes`` default to ``metrics["input_shape"]``/``metrics["num_classes"]``
    (which :func:`train_teacher` fills in). ``metrics`` must be JSON-serialisable.
    """
    shape = input_shape if input_shape is not None else metrics.get("input_shape")
    classes = num_classes if num_classes is not None else metrics.get("num_classes")
    if shape is None or classes is None:
        raise ValueError(
            "save_teacher needs the input shape and number of classes: pass input_shape= and "
            "num_classes=, or metrics from train_teacher"
        )
    try:
        plain_metrics = json.loads(json.dumps(metrics))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"teacher metrics must be JSON-serialisable ({exc})") from None
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model": config_to_dict(cfg.teacher.model),
        "input_shape": [int(s) for s in shape],
        "num_classes": int(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": plain_metrics,
        "config": config_to_dict(cfg),
        "data": {
            "fingerprint": plain_metrics.get("data_fingerprint"),
            "teacher_fingerprint": plain_metrics.get("teacher_fingerprint"),
        },
    }
    out = Path(path)
    atomic_torch_save(checkpoint, out)
    return out


def check_checkpoint_path(path: str | Path) -> None:
    """Raise the user-facing error when ``path`` is not a file (a directory, or missing)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"teacher checkpoint {str(path)!r} is a directory; pass the .pt file that "
            "`metakd teacher CONFIG --out FILE` wrote"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {str(path)!r} does not exist; train one with `metakd teacher CONFIG` "
            "or set teacher.checkpoint=null to train the teacher in-process"
        )


def _read_checkpoint(path: Path) -> dict[str, Any]:
    check_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"teacher checkpoint {str(path)!r} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
            "retrain it with `metakd teacher CONFIG`"
        ) from None
    missing = {"format", "model", "input_shape", "num_classes", "state_dict"} - set(
        ckpt if isinstance(ckpt, dict) else ()
    )
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or missing:
        raise ValueError(
            f"{str(path)!r} is not a metakd teacher checkpoint (format {CHECKPOINT_FORMAT!r}; missing "
            f"{sorted(missing)}); retrain it with `metakd teacher CONFIG`"
        )
    return ckpt


def load_teacher(path: str | Path, device: torch.device | str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_teacher`: the model in eval mode on ``device`` and the
    checkpoint's other entries (format, model, input_shape, num_classes, metrics, config, data).

    Raises FileNotFoundError for a missing file and ValueError for a corrupt or foreign one.
    """
    p = Path(path)
    ckpt = _read_checkpoint(p)
    model = build_model(
        ModelConfig(**ckpt["model"]), tuple(ckpt["input_shape"]), int(ckpt["num_classes"])
    )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(
            f"teacher checkpoint {str(p)!r} does not match its model config ({exc})"
        ) from None
    model.to(torch.device(device)).eval()
    return model, {k: v for k, v in ckpt.items() if k != "state_dict"}


def _check_compatible(path: Path, info: dict[str, Any], splits: Splits) -> None:
    shape = list(splits.train.x_teacher.shape[1:])
    if list(info["input_shape"]) != shape or int(info["num_classes"]) != splits.num_classes:
        raise ConfigError(
            f"teacher checkpoint {str(path)!r} takes inputs {info['input_shape']} with "
            f"{info['num_classes']} classes, but the data has {shape} with {splits.num_classes}; "
            "use a teacher trained on this dataset"
        )
    trained_on = (info.get("data") or {}).get("teacher_fingerprint")
    here = splits.info.get("teacher_fingerprint")
    if trained_on is not None and here is not None and trained_on != here:
        seed = (info.get("metrics") or {}).get("data_seed")
        raise ConfigError(
            f"teacher checkpoint {str(path)!r} was trained on another teacher/test split "
            f"({trained_on}, data seed {seed}) than this data's ({here}, data seed "
            f"{splits.info.get('data_seed')}); its training images may include this test split. Use "
            f"the teacher's data settings (data.data_seed={seed}, data.n_test, data.normalize, "
            "data.root) or retrain the teacher"
        )


def _teacher_source(cfg: Config, splits: Splits) -> tuple[str, str, str]:
    """(source key, its description, the data fingerprint) of this config's teacher on this data."""
    fingerprint = splits.info.get("fingerprint")
    if not isinstance(fingerprint, str):
        raise ValueError(
            "splits.info['fingerprint'] is missing; build splits with metakd.data.load_data"
        )
    if cfg.teacher.checkpoint is not None:
        ckpt = Path(cfg.teacher.checkpoint)
        if not ckpt.is_file():
            _read_checkpoint(ckpt)  # raises the clear FileNotFoundError
        digest = file_sha256(ckpt)
        source = f"checkpoint:{digest}"
        what = f"teacher checkpoint {str(ckpt)!r} (sha256 {digest[:12]})"
    elif cfg.teacher.weights is not None:
        source, what = pretrained.source(cfg.teacher)
    else:
        digest = _sha256_json(config_to_dict(cfg.teacher), fingerprint, cfg.data.augment, cfg.seed)
        source = "in-process:" + digest
        what = (
            f"in-process teacher {cfg.teacher.model.name} ({cfg.teacher.epochs} epochs, "
            f"seed {cfg.seed}, teacher config {digest[:12]})"
        )
    return source, what, fingerprint


def _logits_cache_path(cfg: Config, splits: Splits) -> tuple[Path, str]:
    """The cache file of this teacher's logits on this data, and a short description of the key."""
    source, what, fingerprint = _teacher_source(cfg, splits)
    key = _sha256_json(source, fingerprint)
    path = Path(cfg.data.cache_dir) / f"teacher-logits-{key[:24]}.pt"
    return path, f"{what} on data {fingerprint[:12]}"


def _build_teacher(
    cfg: Config, splits: Splits, dev: torch.device, what: str, cached_in: Path,
    progress: ProgressFactory | None,
) -> tuple[nn.Module, dict[str, Any] | None]:  # fmt: skip
    """The teacher of ``cfg`` in eval mode on ``dev`` and its training metrics: loaded from
    ``teacher.checkpoint`` (checked against the data; metrics None) or built with ``teacher.weights`` (never
    trained; metrics None), else trained in-process (what it gives is cached in ``cached_in``, logged)."""
    if cfg.teacher.weights is not None:
        log.info("teacher: the %s, used as it is (not trained)", what)
        x = splits.train.x_teacher[:1]
        return pretrained.load_weights_teacher(cfg.teacher, x, splits.num_classes, dev), None
    if cfg.teacher.checkpoint is not None:
        ckpt = Path(cfg.teacher.checkpoint)
        model, info = load_teacher(ckpt, dev)
        _check_compatible(ckpt, info, splits)
        return model, None
    log.info(
        "teacher: training the %s (%d examples); the result is cached in %s for later "
        "runs with this teacher config, seed and data",
        what, len(splits.teacher), cached_in,
    )  # fmt: skip
    bar = progress(cfg.teacher.epochs) if progress is not None else contextlib.nullcontext()
    with bar as callback:
        model, metrics = train_teacher(cfg, splits, dev, progress=callback)
    log.info(
        "teacher: trained in %.1f s (%d steps), test accuracy %.4f",
        metrics["wall_seconds"], metrics["steps"], metrics["test_accuracy"],
    )  # fmt: skip
    return model, metrics


def teacher_module(
    cfg: Config,
    splits: Splits,
    device: torch.device | str,
    *,
    progress: ProgressFactory | None = None,
) -> nn.Module:
    """The teacher ``nn.Module`` itself (eval mode, on ``device``), for a run that evaluates it on each
    batch (:class:`metakd.data.targets.LiveTeacher`, ``data.augment``): loaded from ``teacher.checkpoint``,
    built with ``teacher.weights``, or trained in-process with :func:`train_teacher` once and cached as a
    teacher checkpoint under ``cfg.data.cache_dir`` (keyed like the logit cache), so a resumed run gets
    the very same weights."""
    dev = torch.device(device)
    source, what, fingerprint = _teacher_source(cfg, splits)
    what = f"{what} on data {fingerprint[:12]}"
    path = Path(cfg.data.cache_dir) / f"teacher-model-{_sha256_json(source, fingerprint)[:24]}.pt"
    if cfg.teacher.checkpoint is None and cfg.teacher.weights is None and path.is_file():
        try:
            model, _ = load_teacher(path, dev)
        except ValueError as exc:
            warnings.warn(f"ignoring unreadable cached teacher {str(path)!r} ({exc})", stacklevel=2)
        else:
            log.info("teacher: cached %s for the %s; not retrained", path, what)
            return model
    model, metrics = _build_teacher(cfg, splits, dev, what, path, progress)
    if metrics is not None:
        save_teacher(path, model, cfg, metrics)
    return model


def _load_cached(path: Path, splits: Splits) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        logits = {k: cached["logits"][k] for k in ("train", "val", "test")}
    except Exception as exc:
        warnings.warn(
            f"ignoring unreadable teacher-logit cache {str(path)!r} ({exc})", stacklevel=3
        )
        return None
    for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if tuple(logits[name].shape) != (len(split), splits.num_classes):
            warnings.warn(
                f"teacher-logit cache {str(path)!r} does not fit the data; recomputing",
                stacklevel=3,
            )
            return None
    return logits


def teacher_logits(
    cfg: Config,
    splits: Splits,
    device: torch.device | str,
    *,
    progress: ProgressFactory | None = None,
) -> dict[str, Tensor]:
    """Teacher logits f(x) for the student's splits: {"train", "val", "test"} → (N, K) float32 on
    ``device``, computed once (teacher in eval mode) and cached on disk; see the module docstring for
    the cache key. The teacher comes from ``teacher.checkpoint``, ``teacher.weights`` or, when both are
    None, is trained in-process with :func:`train_teacher` on ``splits.teacher``, reporting to
    ``progress(epochs)``."""
    dev = torch.device(device)
    path, what = _logits_cache_path(cfg, splits)
    logits = _load_cached(path, splits)
    if logits is not None:
        log.info("teacher logits: cached %s for the %s; not recomputed", path, what)
    else:
        model, _ = _build_teacher(cfg, splits, dev, what, path, progress)
        logits = {
            name: predict_logits(model, split.x_teacher.to(dev)).cpu()
            for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test))
        }
        atomic_torch_save(
            {"format": _LOGITS_FORMAT, "fingerprint": splits.info["fingerprint"], "logits": logits},
            path,
        )
    return {k: v.to(dev, torch.float32) for k, v in logits.items()}
