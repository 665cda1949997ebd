"""``metakd experiment``: a grid of methods × seeds, tabulated."""

from __future__ import annotations

import datetime as _dt
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from metakd.config import ConfigError
from metakd_cli import launch
from metakd_cli.app import (
    ArgsArg,
    DeviceOpt,
    QuietOpt,
    SeedOpt,
    ThreadsOpt,
    WandbOpt,
    WandbRunCallbacks,
    _fmt,
    _setup_logging,
    _user_errors,
    app,
    err_console,
    load_cli_config,
    out_console,
    parse_seeds,
)

__all__ = ["experiment", "parse_methods"]


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


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


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

    main_rank = launch.rank() == 0  # under torchrun only rank 0 shows progress and prints
    quiet = quiet or not main_rank
    console = _setup_logging(quiet)
    exp_dir: list[Path] = []  # for the error messages: it is kept, the same command continues it
    with _user_errors(exp_dir, resume="run the same command again to continue it"):
        cfg = load_cli_config(args, seed=seed, device=device, wandb=wandb, wandb_env=True)
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
    if not main_rank:
        return
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
