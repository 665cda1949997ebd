"""``metakd bench``: time and memory of hypergradients (and the scaling and step benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metakd.config import ConfigError
from metakd_cli.app import Device, QuietOpt, _setup_logging, _user_errors, app, err_console

__all__ = ["bench"]


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
