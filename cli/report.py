"""``metakd report``: figures and tables (report.md) from run directories."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from metakd_cli.app import QuietOpt, WandbMode, _setup_logging, _user_errors, app, out_console

__all__ = ["report"]


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
