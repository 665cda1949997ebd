"""The ``metakd`` Typer app and what every command shares: options, error handling, logging, config.

Every command that runs something takes an optional YAML config followed by ``key=value``
overrides with dotted keys (``meta.unroll=5 forecast.forecaster=linear``), so a W&B sweep agent can
call ``metakd train CONFIG ${args_no_hyphens}``. Options (``--seed``, ``--device``, ``--out``,
``--wandb``) set the matching config keys and win over the file and the overrides. The W&B mode is
``--wandb``, else W&B's own ``WANDB_MODE`` environment variable, else the config's ``wandb.mode``.

Errors a user can cause (a bad config, a missing file, a value the library rejects, a loss that
became NaN) print one ``Error: ...`` line per problem on stderr and exit with code 2, without a
traceback; anything else is a bug and keeps its traceback (exit code 1). A full disk and a run directory held by another process are user errors
too (exit code 2; the run directory is kept and the message gives the ``--resume`` command). Set
``METAKD_TRACEBACK=1`` to see the traceback of user errors too. Results go to stdout, progress and messages to stderr.

The commands live in one module each and register on :data:`app` when imported; ``metakd_cli.main``
imports them all. This module imports none of them.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from metakd import __version__
from metakd.config import SEED_MAX, ConfigError
from metakd.runs.rundir import RunDirLockedError  # light: torch is imported inside its functions

if TYPE_CHECKING:
    from metakd.config import Config

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_USER_ERROR",
    "USER_ERRORS",
    "ArgsArg",
    "Device",
    "DeviceOpt",
    "QuietOpt",
    "SeedOpt",
    "ThreadsOpt",
    "WandbMode",
    "WandbOpt",
    "WandbRunCallbacks",
    "app",
    "err_console",
    "load_cli_config",
    "out_console",
    "parse_seeds",
    "split_args",
    "wandb_env_mode",
]

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
        "--wandb",
        help="W&B mode; wins over the WANDB_MODE environment variable, which wins over the config "
        "key wandb.mode (default offline).",
        case_sensitive=False,
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
    wandb_env: bool = False,
) -> Config:
    """Config from ``[CONFIG] [KEY=VALUE]...`` plus the options (options win). ``wandb_env`` (the
    commands that log to W&B): without ``--wandb``, W&B's ``WANDB_MODE`` wins over ``wandb.mode``."""
    from metakd.runs.config import load_config  # the registries import torch: not for --help

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
    mode = wandb.value if wandb is not None else wandb_env_mode() if wandb_env else None
    if mode is not None:
        cfg.wandb.mode = mode  # type: ignore[assignment]  # one of WandbMode's values
    return cfg


#: WANDB_MODE values W&B accepts besides ours, as the mode they mean
_WANDB_ENV_ALIASES = {"dryrun": "offline", "run": "online"}


def wandb_env_mode() -> str | None:
    """The W&B mode W&B's own ``WANDB_MODE`` environment variable asks for (None: unset or empty).
    It wins over the config's ``wandb.mode``; an explicit ``--wandb`` wins over it."""
    text = os.environ.get("WANDB_MODE", "").strip().lower()
    if not text:
        return None
    mode = _WANDB_ENV_ALIASES.get(text, text)
    if mode not in {m.value for m in WandbMode}:
        raise ConfigError(
            f"the environment variable WANDB_MODE={text!r} is not a W&B mode; set it to online, "
            "offline or disabled (or unset it), or pass --wandb"
        )
    return mode


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


# --------------------------------------------------------------------------- seeds, W&B


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
