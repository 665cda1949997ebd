"""Typer command-line front end of metakd (console script ``metakd``)."""
