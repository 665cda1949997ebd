"""The ``metakd`` command line's entry point (console script ``metakd = metakd_cli.main:app``).

Importing this module registers every command on :data:`metakd_cli.app.app`; each command lives
in its own module and imports the app and the shared options from :mod:`metakd_cli.app`.
"""

from __future__ import annotations

from typer.models import CommandInfo

from metakd_cli import (  # noqa: F401  (importing a command module registers its command)
    bench,
    check_grad,
    experiment,
    forecasters,
    report,
    search,
    teacher,
    train,
)
from metakd_cli.app import _tidy_help, app

__all__ = ["app", "main"]

#: the order of the command list in ``metakd --help``, whatever order the modules were imported in
COMMANDS = (
    "train",
    "teacher",
    "experiment",
    "report",
    "bench",
    "check-grad",
    "forecasters",
    "search",
)


def _command_rank(info: CommandInfo) -> int:
    name = info.name or (info.callback.__name__ if info.callback is not None else "")
    return COMMANDS.index(name) if name in COMMANDS else len(COMMANDS)


app.registered_commands.sort(key=_command_rank)
_tidy_help(app)


def main() -> None:
    """Entry point (``python -m metakd_cli.main``)."""
    app()


if __name__ == "__main__":
    main()
