"""``metakd check-grad``: the configured hypergradient against central finite differences."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer
from rich.table import Table

from metakd_cli.app import (
    EXIT_CHECK_FAILED,
    ArgsArg,
    DeviceOpt,
    QuietOpt,
    SeedOpt,
    _error,
    _fmt,
    _setup_logging,
    _user_errors,
    app,
    load_cli_config,
    out_console,
    split_args,
)

__all__ = ["check_grad"]


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
