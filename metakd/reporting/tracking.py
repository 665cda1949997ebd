"""Weights & Biases logging that never breaks training.

:class:`WandbCallback` mirrors the local run record (``metrics.jsonl``, ``summary.json``) to W&B:
the resolved config, every metrics row on the ``step`` axis (nested dicts flattened to
``meta/beta1``, ``hypergrad/temperature``, ``forecast_error/beta2`` ...), the summary, and tags and a
group per experiment so the seeds of one method group together on the dashboard.

Modes (``cfg.wandb.mode``): ``offline`` (default; works without an account, the run folder lands
in ``<run_dir>/wandb/offline-run-*`` and ``wandb sync`` uploads it later), ``online``, ``disabled``.
Any W&B exception (no network, bad API key, server error) logs one warning and turns the callback
off; the local record is complete either way. ``wandb`` is imported only inside functions, so
``import metakd`` never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metakd.training.trainer import Callback

if TYPE_CHECKING:
    from metakd.config import Config

__all__ = ["WandbCallback", "flatten_row", "log_report", "sync_command"]

log = logging.getLogger(__name__)

_PHASE_IDS = {"train": 0, "optimize": 1, "predict": 2}
_MAX_LIST = 32  # lists longer than this (large non-scalar λ) are logged as histograms
_ID_FILE = "wandb-run-id"


def flatten_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a metrics row for ``wandb.log``.

    ``{"meta": {"beta1": 0.4}}`` -> ``{"meta/beta1": 0.4}``; a short list ``[a, b]`` under key ``k``
    -> ``k/0, k/1``; ``None`` values are dropped (W&B would plot them as gaps anyway); the string
    ``phase`` becomes the number ``phase_id`` (train 0, optimize 1, predict 2) so it can be charted.
    Longer lists are kept as lists (the caller turns them into histograms).
    """
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if key == "phase" and not prefix and isinstance(value, str):
            out["phase_id"] = _PHASE_IDS.get(value, -1)
        elif isinstance(value, Mapping):
            out.update(flatten_row(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            if len(value) <= _MAX_LIST and all(isinstance(v, numbers.Number) for v in value):
                out.update({f"{name}/{i}": v for i, v in enumerate(value)})
            else:
                out[name] = list(value)
        elif isinstance(value, (bool, numbers.Number, str)):
            out[name] = value
    return out


def sync_command(run_dir: str | Path) -> str:
    """The command that uploads an offline run kept under ``run_dir``."""
    return f"wandb sync {Path(run_dir) / 'wandb'}/offline-run-*"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class WandbCallback(Callback):
    """Trainer callback that logs a run to W&B (see the module docstring).

    ``cfg`` and ``run_dir`` are the ones given to :func:`metakd.runs.run.train_run`; both are replaced by
    the resolved config and the actual run directory when the trainer calls :meth:`on_run_start`.
    A directory that already holds a W&B run id (a resumed run) continues that W&B run.
    """

    def __init__(
        self,
        cfg: Config | None = None,
        run_dir: str | Path | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quiet = quiet
        self.run: Any = None  # the wandb Run while logging works
        self.failed = False  # set after the one warning
        self.mode = cfg.wandb.mode if cfg is not None else "offline"
        self.url: str | None = None  # the run page (online mode)
        # step rows beyond wandb.max_rows_per_second are not sent (metrics.jsonl keeps every row):
        # each wandb.log call costs the training process and the W&B service CPU time, a visible share
        # of a fast run such as the compiled default (2,000 rows in well under a minute)
        rate = cfg.wandb.max_rows_per_second if cfg is not None else 0.0
        self._min_gap = 1.0 / rate if rate > 0 else 0.0
        self._last = -math.inf
        self.throttled = 0  # step rows not sent

    # ------------------------------------------------------------------ failure handling
    def _fail(self, what: str, exc: BaseException) -> None:
        """Warn once, drop the run, keep training."""
        if not self.failed:
            where = f" in {self.run_dir}" if self.run_dir is not None else ""
            log.warning(
                "W&B %s failed (%s); W&B logging is off for this run, local logging continues%s",
                what,
                _first_line(exc),
                where,
            )
        self.failed = True
        run, self.run = self.run, None
        if run is not None:
            with contextlib.suppress(Exception):  # the run is already broken
                run.finish(exit_code=1)

    @property
    def active(self) -> bool:
        """True while a W&B run is open and healthy."""
        return self.run is not None and not self.failed

    # ------------------------------------------------------------------ callback interface
    def on_run_start(self, cfg: Config, run_dir: Path | None, info: Mapping[str, Any]) -> None:
        """Open the W&B run: resolved config, tags, group, ``step`` as the x-axis of every metric."""
        self.cfg = cfg
        if run_dir is not None:
            self.run_dir = Path(run_dir)
        self.mode = cfg.wandb.mode
        if self.mode == "disabled" or self.failed:
            return
        try:
            self.run = self._init(cfg, self.run_dir, info)
            self.url = getattr(self.run, "url", None) if self.mode == "online" else None
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            for key in ("val_accuracy", "test_accuracy"):
                self.run.define_metric(key, step_metric="step", summary="max")
        except Exception as exc:
            self._fail("init", exc)

    def _init(self, cfg: Config, run_dir: Path | None, info: Mapping[str, Any]) -> Any:
        import wandb

        from metakd.config import config_to_dict

        wb = cfg.wandb
        method = cfg.meta.method
        tags = [*wb.tags, method, cfg.data.name]
        if method == "forecast":
            tags.append(f"forecaster:{cfg.forecast.forecaster}")
        wandb_dir = Path(wb.dir) if wb.dir is not None else run_dir
        if wandb_dir is not None:
            wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / _ID_FILE if run_dir is not None else None
        run_id = id_file.read_text().strip() if id_file is not None and id_file.is_file() else None
        config = config_to_dict(cfg)
        config["run_dir"] = str(run_dir) if run_dir is not None else None
        config["info"] = {
            k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None
        }
        run = wandb.init(
            project=wb.project,
            entity=wb.entity,
            group=wb.group or f"{cfg.name}-{method}",
            job_type="train",
            name=f"{cfg.name}-{method}-seed{cfg.seed}",
            tags=list(dict.fromkeys(tags)),
            config=config,
            dir=str(wandb_dir) if wandb_dir is not None else None,
            mode=wb.mode,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
            settings=wandb.Settings(
                init_timeout=wb.init_timeout,
                console="off",  # run.log is the console record; do not wrap stdout/stderr
                quiet=True,  # no run-history sparklines at finish; metakd prints the summary
                silent=self.quiet,
            ),
        )
        if run_id is None and id_file is not None:
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(run.id)
            tmp.replace(id_file)
        return run

    def on_step(self, row: Mapping[str, Any]) -> None:
        """Log one metrics row at ``row["step"]`` (at most ``wandb.max_rows_per_second``)."""
        if not self.active:
            return
        now = time.monotonic()
        if now - self._last < self._min_gap:
            self.throttled += 1
            return
        self._last = now
        self._log(row)

    def _log(self, row: Mapping[str, Any]) -> None:
        try:
            import wandb

            data = flatten_row(row)
            for key, value in list(data.items()):
                if isinstance(value, list):
                    finite = [
                        float(v) for v in value if isinstance(v, (int, float)) and math.isfinite(v)
                    ]
                    data[key] = wandb.Histogram(finite) if finite else None
            self.run.log({k: v for k, v in data.items() if v is not None})
        except Exception as exc:
            self._fail("log", exc)

    def on_eval(self, row: Mapping[str, Any]) -> None:
        """Evaluation rows carry accuracies; they go on the same ``step`` axis, every one of them."""
        if self.active:
            self._log(row)

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        """Write the summary (flattened) and close the run."""
        if self.active:
            try:
                self.run.summary.update(flatten_row(summary))
            except Exception as exc:
                self._fail("summary", exc)
        self.finish(0)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (also after a failed training run, with ``exit_code=1``)."""
        if not self.active:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:
            self._fail("finish", exc)

    @property
    def sync_hint(self) -> str | None:
        """``wandb sync ...`` for an offline run that logged successfully, else None."""
        if self.mode != "offline" or self.failed or self.run_dir is None or self.cfg is None:
            return None
        base = Path(self.cfg.wandb.dir) if self.cfg.wandb.dir is not None else self.run_dir
        return sync_command(base)


def log_report(
    target: str | Path | Any,
    figures: Mapping[str, str | Path],
    table_rows: Sequence[Mapping[str, Any]],
    *,
    mode: str = "offline",
    project: str = "metakd",
    entity: str | None = None,
    name: str = "report",
    init_timeout: float = 30.0,
) -> bool:
    """Log a report's figures (as images) and its results table (as a ``wandb.Table``).

    ``target`` is a directory (a new W&B run of job type ``report`` is created under it, in
    ``mode``) or an open W&B run. Returns True when everything was logged; on any W&B error it logs
    one warning and returns False.
    """
    if mode == "disabled":
        return False
    try:
        import wandb

        run: Any = target
        own = isinstance(target, (str, Path))
        if own:
            out = Path(target)
            out.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                job_type="report",
                dir=str(out),
                mode=mode,  # type: ignore[arg-type]
                reinit="create_new",
                settings=wandb.Settings(init_timeout=init_timeout, console="off"),
            )
        try:
            payload: dict[str, Any] = {
                f"figures/{key}": wandb.Image(str(path)) for key, path in figures.items()
            }
            if table_rows:
                flat = [flatten_row(r) for r in table_rows]
                columns: list[Any] = list(dict.fromkeys(k for r in flat for k in r))
                data = [[_cell(r.get(c)) for c in columns] for r in flat]
                payload["results"] = wandb.Table(columns=columns, data=data)
            run.log(payload)
        finally:
            if own:
                run.finish()
        return True
    except Exception as exc:
        log.warning(
            "W&B report logging failed (%s); the local report is unaffected", _first_line(exc)
        )
        return False


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, numbers.Number, str)):
        return value
    return str(value)
