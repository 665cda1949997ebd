"""``metakd teacher``: train a teacher and save its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metakd.config import ConfigError
from metakd_cli.app import (
    ArgsArg,
    DeviceOpt,
    QuietOpt,
    SeedOpt,
    _fmt,
    _setup_logging,
    _user_errors,
    app,
    load_cli_config,
    out_console,
)

__all__ = ["teacher"]


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
    """Train a teacher on the configured data and save its checkpoint.

    Logs nothing to W&B (hence no --wandb option): its record is the checkpoint and the \
    metrics printed at the end.
    """
    console = _setup_logging(quiet)
    with _user_errors():
        cfg = load_cli_config(args, seed=seed, device=device)
        if cfg.teacher.weights is not None:
            raise ConfigError(
                f"teacher.weights={cfg.teacher.weights} is a teacher already (loaded, never trained); "
                "give it to metakd train as it is, or drop it to train a teacher here"
            )
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
