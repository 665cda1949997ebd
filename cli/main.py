"""The ``metakd`` command line.

Every command that runs something takes an optional YAML config followed by ``key=value``
overrides with dotted keys (``meta.unroll=5 forecast.forecaster=linear``), so a W&B sweep agent can
call ``metakd train CONFIG ${args_no_hyphens}``. Options (``--seed``, ``--device``, ``--out``,
``--wandb``) set the matching config keys and win over the file and the overrides.

Errors a user can cause (a bad config, a missing file, a value the library rejects, a loss that
became NaN) print one ``Error: ...`` line per problem on stderr and exit with code 2, without a
traceback; anything else is a bug and keeps its traceback (exit code 1). A full disk and a run directory held by another process are user errors
too (exit code 2; the run directory is kept and the message gives the ``--resume`` command). Set
``METAKD_TRACEBACK=1`` to see the traceback of user errors too. Results go to stdout, progress and messages to stderr.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import errno
import inspect
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from metakd import __version__
from metakd.config import SEED_MAX, ConfigError, load_config
from metakd.runs.rundir import RunDirLockedError, read_config_file

if TYPE_CHECKING:
    from metakd.config import Config

__all__ = ["app", "main"]

app = typer.Typer(
    name="metakd",
    help=(
        "Tune knowledge-distillation metaparameters λ = (β1, β2, T) by hypergradient descent "
        "through unrolled training, and forecast their trajectory to skip hypergradient steps."
    ),
    epilog=(
        "[bold]Examples[/bold]\n\n"
        "  metakd train                       [dim]# the synthetic experiment[/dim]\n\n"
        "  metakd train configs/cifar10.yaml meta.unroll=5 --seed 1\n\n"
        "  metakd experiment configs/synthetic.yaml --methods baseline,hypergrad\n\n"
        "  metakd report runs/synthetic-experiment-* --out reports/synthetic\n\n"
        "Run [bold]metakd COMMAND --help[/bold] for the options of each command."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: exceptions that a user causes: reported as one ``Error:`` line, exit code 2
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,
    RunDirLockedError,
)
#: OSError numbers that a user fixes (a full disk or quota, a file name longer than the system allows)
_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG)
EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 3

out_console = Console(highlight=False)  # results (stdout)
err_console = Console(stderr=True, highlight=False)  # messages (stderr)
_log_handler: logging.Handler | None = None


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


# --------------------------------------------------------------------------- shared options

ArgsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[CONFIG] [KEY=VALUE]",
        help="Optional YAML config (default: the synthetic experiment), then dotted key=value "
        "overrides, e.g. [green]meta.unroll=5 train.epochs=100[/green].",
        show_default=False,
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed", min=0, max=SEED_MAX, help="Random seed, 0 .. 2**32 - 1 (config key seed)."
    ),
]
DeviceOpt = Annotated[
    Device | None,
    typer.Option(
        "--device",
        help="auto: CUDA when present, else CPU (config key device).",
        case_sensitive=False,
    ),
]
WandbOpt = Annotated[
    WandbMode | None,
    typer.Option(
        "--wandb", help="W&B mode (config key wandb.mode; default offline).", case_sensitive=False
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or info messages (stderr).")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="torch intra-op threads per run (default: 1 for small models, else torch's; "
        "OMP_NUM_THREADS is honoured).",
    ),
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"metakd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """metakd: exact hypergradients for knowledge-distillation metaparameters."""


def _setup_logging(quiet: bool) -> Console:
    """Log records of ``metakd.*`` (e.g. the W&B warning) go to stderr through rich; returns that
    console, which progress bars share so log lines print above the bar."""
    global _log_handler
    from rich.logging import RichHandler

    console = Console(stderr=True)
    logger = logging.getLogger("metakd")
    if _log_handler is not None:
        logger.removeHandler(_log_handler)
    if console.is_terminal:
        _log_handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    else:  # a log file or CI: one unwrapped line per record (rich would wrap it at 80 columns)
        _log_handler = logging.StreamHandler(sys.stderr)
        _log_handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    _log_handler.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.addHandler(_log_handler)
    logger.setLevel(logging.INFO)
    return console


def _error(message: str) -> None:
    for line in str(message).strip().splitlines() or [""]:
        typer.echo(f"Error: {line}", err=True)


def _short(value: Any, limit: int = 120) -> str:
    """``value`` as text, cut to ``limit`` characters (a 100,000-character override stays one line)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _os_error_text(exc: OSError, resume: str) -> str:
    """One line for a user-fixable OSError; ``resume`` is how to continue after fixing it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"writing {exc.filename}" if exc.filename else "writing the run's files"
        what = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is exceeded"
        return f"{what} ({where}); {resume}"
    if exc.errno == errno.ENAMETOOLONG:
        return (
            f"file name too long: {_short(exc.filename)}; a config value used in a path (e.g. name "
            "or out) is too long for the file system, use a shorter one"
        )
    if isinstance(exc, FileExistsError) and exc.filename is not None:
        return (
            f"{_short(exc.filename)} already exists and is not a directory; pass another --out "
            "(or remove it)"
        )
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {_short(exc.filename)}"
    return str(exc)


@contextlib.contextmanager
def _user_errors(run_dir: list[Path] | None = None, resume: str | None = None) -> Iterator[None]:
    """Turn user-caused exceptions into ``Error: ...`` on stderr and exit code 2. ``run_dir`` (filled
    once known) is kept and named with its ``--resume`` command; ``resume`` overrides that command
    (e.g. rerunning an experiment)."""
    try:
        yield
    except (*USER_ERRORS, OSError) as exc:
        user = isinstance(exc, USER_ERRORS) or (
            isinstance(exc, OSError) and exc.errno in _USER_ERRNOS
        )
        if not user or os.environ.get("METAKD_TRACEBACK"):
            raise
        kept = run_dir[0] if run_dir and run_dir[0].is_dir() else None
        if resume is None and kept is not None:
            resume = f"continue it with: metakd train --resume {kept}"
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            kept_text = f"the run directory {kept} is kept: " if kept is not None else ""
            then = resume or "run the command again"
            _error(_os_error_text(exc, f"{kept_text}free some space, then {then}"))
            raise typer.Exit(EXIT_USER_ERROR) from None
        text = _os_error_text(exc, "") if isinstance(exc, OSError) else str(exc)
        _error(text or type(exc).__name__)
        # An error that says the run cannot be continued (its fix is a new --out) gets no --resume hint.
        if kept is not None and not isinstance(exc, RunDirLockedError) and "new --out" not in text:
            typer.echo(
                f"Error: the run directory {kept} is kept; after fixing the problem, {resume}",
                err=True,
            )
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        if run_dir and run_dir[0].is_dir():
            typer.echo(f"Continue with: metakd train --resume {run_dir[0]}", err=True)
        raise typer.Exit(130) from None


def split_args(args: Sequence[str] | None) -> tuple[str | None, list[str]]:
    """``[CONFIG] [KEY=VALUE]...`` -> (config path or None, overrides). The first argument is the
    config when it has no ``=``."""
    items = list(args or [])
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _check_config_arg(path: str) -> None:
    p = Path(path)
    if p.exists():
        return
    hint = ""
    if p.suffix not in (".yaml", ".yml") and "/" not in path:
        hint = f"; overrides are written key=value (e.g. {path}=VALUE)"
    raise ConfigError(f"config file {path!r} does not exist{hint}")


def load_cli_config(
    args: Sequence[str] | None,
    *,
    seed: int | None = None,
    device: Device | None = None,
    out: Path | None = None,
    wandb: WandbMode | None = None,
) -> Config:
    """Config from ``[CONFIG] [KEY=VALUE]...`` plus the options (options win)."""
    path, overrides = split_args(args)
    if path is not None:
        _check_config_arg(path)
    cfg = load_config(path, overrides)
    if seed is not None:
        cfg.seed = seed
    if device is not None:
        cfg.device = device.value
    if out is not None:
        cfg.out = str(out)
    if wandb is not None:
        cfg.wandb.mode = wandb.value
    return cfg


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_fmt(v, digits) for v in value[:4])
        return f"[{shown}{', ...' if len(value) > 4 else ''}]"
    return str(value)


# --------------------------------------------------------------------------- train

TRAIN_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  metakd train                       [dim]# synthetic task, defaults[/dim]\n\n"
    "  metakd train configs/forecasters.yaml forecast.window=20 --seed 3\n\n"
    "  metakd train configs/cifar10.yaml --device cuda --wandb online\n\n"
    "  metakd train train.epochs=200 teacher.epochs=200 --out runs/quick --quiet\n\n"
    "  metakd train --resume runs/quick   [dim]# continue a stopped run[/dim]\n\n"
    "  metakd train --json -q | jq .test_accuracy\n\n"
    "The run directory holds config.yaml, metrics.jsonl, summary.json, checkpoints/, run.log and "
    "wandb/ (offline W&B files; upload with [bold]wandb sync[/bold])."
)


def _resolve_resume(
    args: list[str] | None, out: Path | None, resume: bool
) -> tuple[list[str] | None, Path | None]:
    """``metakd train --resume RUN_DIR [KEY=VALUE]...``: read RUN_DIR/config.yaml, keep RUN_DIR."""
    path, overrides = split_args(args)
    is_run_dir = path is not None and (
        Path(path).is_dir() or (resume and Path(path).suffix not in (".yaml", ".yml"))
    )
    if path is not None and is_run_dir:
        run_dir = Path(path)
        if not resume:
            raise ConfigError(
                f"{path!r} is a directory; to continue the run in it, add --resume "
                f"(metakd train --resume {path})"
            )
        if out is not None and Path(out) != run_dir:
            raise ConfigError(f"--resume {path} and --out {out} name different run directories")
        return [_run_config(run_dir), *overrides], run_dir
    if resume and path is None:
        given = out if out is not None else _out_override(overrides)
        if given is None:
            raise ConfigError(
                "--resume needs the run directory: metakd train --resume RUN_DIR (or --out RUN_DIR)"
            )
        return [_run_config(Path(given)), *overrides], Path(given)
    if resume and out is None and _out_override(overrides) is None:
        raise ConfigError(
            f"--resume with the config {path} needs the run directory: add --out RUN_DIR"
        )
    return args, out


def _run_config(run_dir: Path) -> str:
    """The resolved config of an existing run directory (what ``--resume`` continues)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"nothing to resume: the run directory {run_dir} does not exist")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"nothing to resume: {run_dir} has no config.yaml (is it a metakd run directory?)"
        )
    read_config_file(path)  # empty or unreadable: refused, never resumed as the default config
    return str(path)


def _out_override(overrides: Sequence[str]) -> Path | None:
    for item in reversed(overrides):
        key, _, value = item.partition("=")
        if key.strip().lstrip("-") == "out" and value:
            return Path(value)
    return None


@app.command(epilog=TRAIN_EPILOG)
def train(
    args: ArgsArg = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Run directory (default runs/<name>-<method>-<timestamp>)."
        ),
    ] = None,
    wandb: WandbOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out (or RUN_DIR) from its newest good checkpoint.",
        ),
    ] = False,
    quiet: QuietOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Train one student with tuned distillation metaparameters (one run).

    Loads the config (the synthetic experiment when none is given), trains or loads the \
    teacher, trains the student while tuning λ by the configured method, and writes a \
    complete run directory. At the end it prints where the run is, the test accuracy, the \
    final λ, the number of hypergradient steps and the wall time.
    """
    from metakd.reporting.progress import ProgressCallback
    from metakd.reporting.tracking import WandbCallback

    console = _setup_logging(quiet)
    run_dir: list[Path] = []  # filled as soon as it is known, for the error messages
    with _user_errors(run_dir):
        args, out = _resolve_resume(args, out, resume)
        cfg = load_cli_config(args, seed=seed, device=device, out=out, wandb=wandb)
        if cfg.out is not None:
            run_dir.append(Path(cfg.out))

        from metakd.runs.run import train_run

        if threads is not None:
            from metakd.threads import set_threads

            set_threads(threads)
        progress = ProgressCallback(quiet=quiet, console=console)
        tracker = WandbCallback(cfg, cfg.out, quiet=quiet)
        ok = False
        try:
            summary = train_run(cfg, cfg.out, resume=resume, callbacks=[progress, tracker])
            ok = True
        finally:
            progress.close()
            if progress.run_dir is not None:
                run_dir[:] = [progress.run_dir]
            if not ok:
                tracker.finish(exit_code=1)
    where = run_dir[0] if run_dir else Path(str(summary.get("run_dir", "?")))
    _print_train_summary(summary, where, tracker, as_json=as_json)


def _print_train_summary(
    summary: dict[str, Any], run_dir: Path, tracker: Any, *, as_json: bool
) -> None:
    if as_json:
        typer.echo(json.dumps({"run_dir": str(run_dir), **summary}, default=str))
        return
    from metakd.reporting.progress import format_meta

    def acc(key: str) -> str:
        value = summary.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    wall = summary.get("wall_seconds")
    skipped = summary.get("skipped_meta_steps")
    lines = [
        f"[bold]Run directory:[/bold] {run_dir}",
        f"  method               {summary.get('method', '-')} (seed {summary.get('seed', '-')})",
        f"  test accuracy        {acc('test_accuracy')} (best {acc('best_test_accuracy')})",
        f"  val accuracy         {acc('val_accuracy')}",
        f"  λ                    {format_meta(summary.get('meta')) or '-'}",
        f"  hypergradient steps  {_fmt(summary.get('hypergradient_steps'))} "
        f"(predicted {_fmt(summary.get('predicted_steps'))}"
        + (f", skipped as non-finite {skipped}" if skipped else "")
        + ")",
        f"  wall time            {_fmt_seconds(wall)} on {summary.get('device', '-')}",
        f"  cost                 {_fmt_cost(summary.get('cost'))}",
        "  files                summary.json, metrics.jsonl, config.yaml, run.log, checkpoints/",
    ]
    if tracker.url:
        lines.append(f"  W&B                  {tracker.url}")
    elif tracker.sync_hint is not None:
        lines.append(f"  W&B (offline)        upload with: {tracker.sync_hint}")
    for line in lines:
        out_console.print(line, soft_wrap=True)


def _fmt_cost(cost: Any) -> str:
    """The ledger entry: plain-run equivalents by wall and CPU seconds, and the reference."""
    if not isinstance(cost, dict) or cost.get("plain_runs") is None:
        return "- (no fixed-λ reference on this machine)"
    cpu = cost.get("plain_runs_cpu")
    src = (cost.get("reference") or {}).get("source", "?")
    cpu_text = f", {cpu:.2f} by CPU" if isinstance(cpu, (int, float)) else ""
    return f"{cost['plain_runs']:.2f} plain runs by wall{cpu_text} (reference: {src})"


def _fmt_seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


# --------------------------------------------------------------------------- teacher


@app.command(
    epilog=(
        "[bold]Examples[/bold]\n\n"
        "  metakd teacher configs/teacher_tiny.yaml --out runs/teachers/cifar_tiny.pt\n\n"
        "  metakd teacher configs/synthetic.yaml teacher.epochs=2000 --out runs/teachers/syn.pt\n\n"
        "Point a student config at it with teacher.checkpoint=PATH."
    )
)
def teacher(
    args: ArgsArg = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Checkpoint to write (default: teacher.checkpoint, else runs/teachers/<name>.pt).",
        ),
    ] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing checkpoint.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a teacher on the configured data and save its checkpoint."""
    console = _setup_logging(quiet)
    with _user_errors():
        cfg = load_cli_config(args, seed=seed, device=device)
        if out is None:
            out = Path(cfg.teacher.checkpoint or Path("runs") / "teachers" / f"{cfg.name}.pt")
        if out.is_dir():
            raise IsADirectoryError(
                f"--out {out} is a directory; give the checkpoint file to write, e.g. "
                f"--out {out / (cfg.name + '.pt')}"
            )
        if out.exists() and not force:
            raise ConfigError(
                f"teacher checkpoint {out} already exists; pass --force to overwrite it"
            )

        from metakd.runs.run import resolve_device

        dev = resolve_device(cfg.device)
        from metakd.data import load_data
        from metakd.data.teacher import save_teacher, train_teacher
        from metakd.reporting.progress import TeacherProgress

        splits = load_data(cfg.data, cfg.seed, dev)
        with TeacherProgress(cfg.teacher.epochs, quiet=quiet, console=console) as bar:
            model, metrics = train_teacher(cfg, splits, dev, progress=bar)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_teacher(out, model, cfg, metrics)
    out_console.print(f"[bold]Teacher checkpoint:[/bold] {out}", soft_wrap=True)
    for key, value in metrics.items():
        out_console.print(f"  {key:<20} {_fmt(value)}", soft_wrap=True)


# --------------------------------------------------------------------------- experiment


def _method_names() -> list[str]:
    from metakd.runs.experiment import METHODS

    return list(METHODS)


def parse_methods(text: str) -> list[str]:
    """``"baseline,hypergrad"`` -> list, checked against the configured methods."""
    valid = _method_names()
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods is empty; choose from {valid}")
    for m in methods:
        if m not in valid:
            close = difflib.get_close_matches(m, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--methods: unknown method {m!r} (choose from {valid}){hint}")
    return methods


def parse_seeds(text: str, first: int = 0, option: str = "--seeds") -> list[int]:
    """``"5"`` -> five seeds from ``first``; ``"0,3,7"`` -> those seeds; ``"3,"`` -> seed 3 alone."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            if count < 1:
                raise ConfigError(
                    f"{option} needs a count >= 1 or a list like 0,1,2, got {text!r}; for seed "
                    f"{count} alone write {count},"
                )
            seeds = list(range(first, first + count))
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{option} needs a count (5) or a list (0,1,2), got {text!r}") from None
    if not seeds:
        raise ConfigError(f"{option} gave no seeds: {text!r}")
    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad:
        raise ConfigError(f"{option} {text!r}: seeds must be 0 .. 2**32 - 1, got {bad}")
    return seeds


class WandbRunCallbacks:
    """Picklable per-run callback factory (for worker processes): one W&B callback per run."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        from metakd.reporting.tracking import WandbCallback

        return [WandbCallback(quiet=self.quiet)]


@app.command(
    epilog=(
        "[bold]Examples[/bold]\n\n"
        "  metakd experiment configs/synthetic.yaml --seeds 10 --out runs/syn-exp\n\n"
        "  metakd experiment configs/forecasters.yaml --methods hypergrad,forecast --seeds 0,1,2\n\n"
        "  metakd experiment configs/cifar10.yaml --seeds 5 --workers 2 --device cuda\n\n"
        "Each run gets its own directory under --out; results.md/csv/json summarise them."
    )
)
def experiment(
    args: ArgsArg = None,
    seeds: Annotated[
        str,
        typer.Option(
            "--seeds", help="A count (5: seeds from --seed, default 0) or a list (0,3,7)."
        ),
    ] = "5",
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods to compare.")
    ] = "baseline,random,hypergrad,forecast",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Runs in parallel.")] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Experiment directory (default runs/<name>-experiment-<time>)."
        ),
    ] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    wandb: WandbOpt = None,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Run a grid of methods × seeds and tabulate the results."""
    from metakd.reporting.progress import ExperimentProgress

    console = _setup_logging(quiet)
    exp_dir: list[Path] = []  # for the error messages: it is kept, the same command continues it
    with _user_errors(exp_dir, resume="run the same command again to continue it"):
        cfg = load_cli_config(args, seed=seed, device=device, wandb=wandb)
        method_list = parse_methods(methods)
        seed_list = parse_seeds(seeds, first=cfg.seed)
        out_dir = out or Path("runs") / f"{cfg.name}-experiment-{_timestamp()}"
        exp_dir.append(out_dir)

        from metakd.runs.experiment import run_experiment

        if workers == 1:
            total = len(method_list) * len(seed_list)
            with ExperimentProgress(total, quiet=quiet, console=console) as bar:
                wb = WandbRunCallbacks(quiet)

                def factory(*a: Any, **k: Any) -> list[Any]:
                    return [bar.run_callback(), *wb()]

                rows = run_experiment(
                    cfg,
                    methods=method_list,
                    seeds=seed_list,
                    out_dir=out_dir,
                    workers=1,
                    callbacks_factory=factory,
                    quiet=True,
                    threads=threads,
                )
        else:
            rows = run_experiment(
                cfg,
                methods=method_list,
                seeds=seed_list,
                out_dir=out_dir,
                workers=workers,
                callbacks_factory=WandbRunCallbacks(quiet),
                quiet=quiet,
                threads=threads,
            )
    results = out_dir / "results.md"
    if results.is_file():
        typer.echo(results.read_text().rstrip())
    else:
        _print_rows(rows)
    err_console.print(f"Experiment directory: {out_dir}", soft_wrap=True)


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    cols = ["method", "seed", "test_accuracy", "best_test_accuracy", "val_accuracy", "wall_seconds"]
    table = Table(*cols)
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in cols))
    out_console.print(table)


# --------------------------------------------------------------------------- report


@app.command(
    epilog=(
        "[bold]Examples[/bold]\n\n"
        "  metakd report runs/syn-exp --out reports/synthetic\n\n"
        "  metakd report runs/cifar-a runs/cifar-b --out reports/cifar --logx --wandb offline"
    )
)
def report(
    dirs: Annotated[
        list[Path], typer.Argument(help="Run or experiment directories.", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report directory (default: FIRST_DIR/report)."),
    ] = None,
    logx: Annotated[bool, typer.Option("--logx", help="Logarithmic step axis.")] = False,
    wandb: Annotated[
        WandbMode,
        typer.Option("--wandb", help="Also log figures and table to W&B.", case_sensitive=False),
    ] = WandbMode.disabled,
    quiet: QuietOpt = False,
) -> None:
    """Build figures and tables (report.md) from run directories."""
    _setup_logging(quiet)
    with _user_errors():
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise FileNotFoundError(f"not a run or experiment directory: {', '.join(missing)}")
        out_dir = out or dirs[0] / "report"

        from metakd.reporting.report import build_report

        path = build_report(list(dirs), out_dir, logx=logx)
    out_console.print(f"[bold]Report:[/bold] {path}", soft_wrap=True)
    if wandb is not WandbMode.disabled:
        from metakd.reporting.tracking import log_report, sync_command

        figures = {
            p.relative_to(out_dir).with_suffix("").as_posix(): p
            for p in sorted(out_dir.rglob("*.png"))
        }
        rows = _summaries(dirs)
        if log_report(out_dir, figures, rows, mode=wandb.value) and wandb is WandbMode.offline:
            out_console.print(
                f"W&B (offline): upload with: {sync_command(out_dir)}", soft_wrap=True
            )


def _summaries(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        for f in sorted(d.rglob("summary.json")):
            with contextlib.suppress(ValueError, OSError):
                rows.append({"run_dir": str(f.parent), **json.loads(f.read_text())})
    return rows


# --------------------------------------------------------------------------- bench


@app.command(
    epilog=(
        "[bold]Examples[/bold]\n\n"
        "  metakd bench                       [dim]# CUDA when present[/dim]\n\n"
        "  metakd bench --model cifar_very_tiny --batch-size 128 --etas 1,4,16 --device cuda "
        "--out bench-out\n\n"
        "  metakd bench --scaling --device cpu --out docs/bench   [dim]# cost against H[/dim]"
    )
)
def bench(
    model: Annotated[
        str, typer.Option("--model", help="Student model to benchmark.")
    ] = "cifar_very_tiny",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    device: Annotated[Device, typer.Option("--device", case_sensitive=False)] = Device.auto,
    etas: Annotated[
        str, typer.Option("--etas", help="Unroll lengths η, comma-separated.")
    ] = "1,4,16,64",
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 3,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory for the results files.")
    ] = None,
    engines: Annotated[
        str | None,
        typer.Option(
            "--engines", help="Comma-separated engines (default: all), e.g. plain,metakd/reverse."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="torch intra-op threads (default: torch's)."),
    ] = None,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e", help="Also time one training epoch per method (baseline, hypergrad, forecast)."
        ),
    ] = False,
    scaling: Annotated[
        bool,
        typer.Option(
            "--scaling",
            help="Instead: cost against the number of metaparameters H = 1..100, every method "
            "(metakd.bench.scaling; --repeats/--threads/--device/--out apply, "
            "python -m metakd.bench.scaling for its other options).",
        ),
    ] = False,
    step: Annotated[
        bool,
        typer.Option(
            "--step",
            help="Instead: the Trainer's step against a minimal eager loop of the same math, "
            "synthetic default and CIFAR student, and online vs plain (metakd.bench.e2e, CPU).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Time and measure memory of hypergradients for several unroll lengths η."""
    _setup_logging(quiet)
    with _user_errors():
        if step:
            from metakd.bench.e2e import run_step_bench
            from metakd.threads import set_threads

            set_threads(threads or 1)
            run_step_bench(out=out, quiet=quiet)
            if out is not None:
                err_console.print(f"Results written to {out}", soft_wrap=True)
            return
        if scaling:
            from metakd.bench.scaling import run_scaling_bench

            run_scaling_bench(repeats=repeats, device=device.value, threads=threads or 1, out=out)
            if out is not None:
                err_console.print(f"Results written to {out}", soft_wrap=True)
            return
        try:
            eta_list = [int(e) for e in etas.split(",") if e.strip()]
        except ValueError:
            raise ConfigError(
                f"--etas needs comma-separated integers like 1,4,16, got {etas!r}"
            ) from None
        if not eta_list or min(eta_list) < 1:
            raise ConfigError(f"--etas needs integers >= 1, got {etas!r}")
        from metakd.bench.engines import run_bench, run_epoch_bench

        engine_list = [e.strip() for e in engines.split(",") if e.strip()] if engines else None
        run_bench(
            model, batch_size, device.value, eta_list, repeats, out, engine_list, threads=threads
        )
        if e2e:
            run_epoch_bench(model, device.value, threads=threads, out=out)
    if out is not None:
        err_console.print(f"Results written to {out}", soft_wrap=True)


# --------------------------------------------------------------------------- check-grad


# Without a CONFIG, check-grad checks a setting whose hypergradient is far above float noise: at the
# train defaults (Adam, lr 1e-3, η = 1) it is ~1e-10 — Adam's first step is sign-like, so λ barely
# moves w_1 — and float32 round-off is then as large as the signal (issue 23).
CHECK_GRAD_DEFAULTS = ("train.lr=0.05", "meta.unroll=3")


@app.command(
    "check-grad",
    epilog=(
        "[bold]Examples[/bold]\n\n"
        "  metakd check-grad                  [dim]# synthetic task, train.lr=0.05 meta.unroll=3[/dim]\n\n"
        "  metakd check-grad meta.unroll=5 meta.hypergrad.backend=torchopt --eps 1e-4\n\n"
        f"Exit code {EXIT_CHECK_FAILED} when a relative error exceeds --tol, or when both sides "
        "are below what the check can resolve (the finite differences' own error estimate)."
    ),
)
def check_grad(
    args: ArgsArg = None,
    eps: Annotated[
        float, typer.Option("--eps", help="Finite-difference step on the raw λ (> 0).")
    ] = 1e-3,
    tol: Annotated[
        float, typer.Option("--tol", min=0.0, help="Largest accepted relative error.")
    ] = 1e-2,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compare the configured hypergradient with central finite differences.

    Uses the configured student, data, optimizer, unroll η and backend at initialisation; \
    prints per metaparameter the hypergradient, the finite-difference estimate, their \
    relative error and the check's resolution. Without a CONFIG the synthetic task is checked \
    at train.lr=0.05 meta.unroll=3 (overrides win): at the train defaults the hypergradient \
    is ~1e-10, float noise.
    """
    console = _setup_logging(quiet)
    with _user_errors():
        path, overrides = split_args(args)
        if path is None:
            args = [*CHECK_GRAD_DEFAULTS, *overrides]
        cfg = load_cli_config(args, seed=seed, device=device)
        from metakd.reporting.progress import ProgressCallback
        from metakd.runs.run import check_grad as _check

        result = _check(cfg, eps=eps, callbacks=[ProgressCallback(quiet=quiet, console=console)])
    train = cfg.train
    table = Table(
        "metaparameter",
        "hypergradient",
        "finite diff.",
        "rel. error",
        "resolution",
        "ok",
        title=(
            f"{cfg.meta.hypergrad.method} / {cfg.meta.hypergrad.backend}, η = {cfg.meta.unroll}, "
            f"{train.optimizer} lr {train.lr:g}, eps {eps:g}"
        ),
    )
    worst, scale, floor, unresolved = 0.0, 0.0, 0.0, []
    for name, entry in result.items():
        rel = entry.get("rel_error")
        rel_max = _max_abs(rel)
        worst = max(worst, rel_max) if not math.isnan(rel_max) else math.inf
        scale = max(
            scale, _max_abs(entry.get("hypergrad")), _max_abs(entry.get("finite_difference"))
        )
        floor = max(floor, _max_abs(entry.get("resolution", 0.0)))
        resolved = _all_true(entry.get("resolved", True))
        if not resolved:
            unresolved.append(name)
        ok = rel_max <= tol and resolved
        table.add_row(
            name,
            _fmt(entry.get("hypergrad"), 4),
            _fmt(entry.get("finite_difference"), 4),
            _fmt(rel, 2),
            _fmt(entry.get("resolution"), 2),
            "yes" if ok else ("[red]NO[/red]" if resolved else "[red]noise[/red]"),
        )
    out_console.print(table)
    out_console.print(
        f"scale: max |hypergradient|, |finite difference| = {scale:.3g}; check resolution "
        f"{floor:.3g} (the finite differences' error estimate)",
        soft_wrap=True,
    )
    if unresolved:
        out_console.print(
            f"max relative error {worst:.3g} (tolerance {tol:g}): UNRESOLVED: "
            f"{', '.join(unresolved)}: both sides are below what the check can resolve "
            "(noise), so agreement there means nothing",
            soft_wrap=True,
        )
        _error(
            f"the hypergradient of {', '.join(unresolved)} is below the check's resolution "
            f"({floor:.3g}); check a setting with a larger signal (larger train.lr or meta.unroll, "
            "e.g. metakd check-grad CONFIG train.lr=0.05 meta.unroll=3) or a larger --eps"
        )
        raise typer.Exit(EXIT_CHECK_FAILED)
    verdict = "OK" if worst <= tol else "MISMATCH"
    out_console.print(f"max relative error {worst:.3g} (tolerance {tol:g}): {verdict}")
    if worst > tol:
        val_loss = max((_max_abs(e.get("val_loss", 0.0)) for e in result.values()), default=0.0)
        float32 = 1.1920929e-07 * val_loss  # float32 round-off of L_val
        if scale < float32:
            out_console.print(
                f"note: the hypergradient's scale {scale:.3g} is below the float32 round-off of "
                f"L_val ({float32:.3g}); the float32 engine may be what differs: check a setting "
                "with a larger signal (larger train.lr or meta.unroll)",
                soft_wrap=True,
            )
        raise typer.Exit(EXIT_CHECK_FAILED)


def _all_true(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_all_true(v) for v in value)
    return bool(value)


def _max_abs(value: Any) -> float:
    if isinstance(value, (list, tuple)):
        return max((_max_abs(v) for v in value), default=0.0)
    try:
        return abs(float(value))
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- forecasters


@app.command(
    epilog="[bold]Example[/bold]\n\n  metakd forecasters\n\n"
    "Use one with forecast.forecaster=NAME (meta.method=forecast). Packages add their "
    "own through the entry-point group [bold]metakd.forecasters[/bold]."
)
def forecasters() -> None:
    """List the registered trajectory forecasters (built-in and entry-point ones)."""
    with _user_errors():
        from metakd.training.forecast import available

        names = available()
    if sys.stdout.isatty():
        table = Table("forecaster", "description")
        for name, text in sorted(names.items()):
            table.add_row(name, text)
        out_console.print(table)
    else:
        for name, text in sorted(names.items()):
            typer.echo(f"{name}\t{text}")


from metakd_cli import search as _search  # noqa: E402, F401  (registers ``metakd search``)

# --------------------------------------------------------------------------- help text


def _flag_type(self: Any, ctx: Any) -> str | None:
    """No ``<bool>`` after an on/off flag (typer >= 0.2x shows one): a flag takes no value."""
    return None if getattr(self, "is_flag", False) else _typer_display_type(self, ctx)


_typer_display_type = getattr(typer.core.TyperOption, "display_type_rich", None)
if _typer_display_type is not None:
    typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _tidy_paragraphs(text: str) -> str:
    """Collapse the whitespace that line continuations leave inside paragraphs
    (``"the \\\n    teacher"`` rendered as ``the     teacher``)."""
    return "\n\n".join(" ".join(par.split()) for par in inspect.cleandoc(text).split("\n\n"))


def _tidy_epilog(text: str) -> str:
    """Consecutive example lines ("  metakd ...") one per line, not a blank line apart, where typer
    keeps single newlines in a rich epilog (fastapi/typer#1405); elsewhere typer joins them."""
    import typer.rich_utils

    if not hasattr(typer.rich_utils, "_fix_linebreaks"):
        return text
    out: list[str] = []
    for par in text.split("\n\n"):
        if out and par.startswith("  metakd") and out[-1].split("\n")[-1].startswith("  metakd"):
            out[-1] += "\n" + par
        else:
            out.append(par)
    return "\n\n".join(out)


def _tidy_help(typer_app: typer.Typer) -> None:
    typer_app.info.epilog = _tidy_epilog(typer_app.info.epilog or "") or None
    for info in typer_app.registered_commands:
        if info.epilog:
            info.epilog = _tidy_epilog(info.epilog)
        if info.callback is not None and info.callback.__doc__:
            info.callback.__doc__ = _tidy_paragraphs(info.callback.__doc__)


_tidy_help(app)


def main() -> None:
    """Entry point (``python -m metakd_cli.main``)."""
    app()


if __name__ == "__main__":
    main()
