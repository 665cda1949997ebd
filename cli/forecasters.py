"""``metakd forecasters``: list the registered trajectory forecasters."""

from __future__ import annotations

import sys

import typer
from rich.table import Table

from metakd_cli.app import _user_errors, app, out_console

__all__ = ["forecasters"]


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
