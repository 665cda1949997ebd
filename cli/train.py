"""``metakd train``: one student run (``--resume`` continues a stopped one), and its summary."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from metakd.config import ConfigError
from metakd.runs.rundir import read_config_file
from metakd_cli import launch
from metakd_cli.app import (
    ArgsArg,
    DeviceOpt,
    QuietOpt,
    SeedOpt,
    ThreadsOpt,
    WandbOpt,
    _fmt,
    _setup_logging,
    _user_errors,
    app,
    load_cli_config,
    out_console,
    split_args,
)

__all__ = ["train"]


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
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Delete the run already in --out (checkpoints, summary) and start it over.",
        ),
    ] = False,
    quiet: QuietOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
    threads: ThreadsOpt = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Ranks on this node (torchrun, data parallel: each takes an equal shard of every "
            "batch; the hypergradient is the global batch's). Several nodes: torchrun yourself.",
        ),
    ] = 1,
) -> None:
    """Train one student with tuned distillation metaparameters (one run).

    Loads the config (the synthetic experiment when none is given), trains or loads the \
    teacher, trains the student while tuning λ by the configured method, and writes a \
    complete run directory. At the end it prints where the run is, the test accuracy, the \
    final λ, the number of hypergradient steps and the wall time.
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_ranks(nproc, out, resume)
        return
    from metakd.reporting.progress import ProgressCallback
    from metakd.reporting.tracking import WandbCallback

    main_rank = launch.rank() == 0  # under torchrun only rank 0 shows progress, logs to W&B, prints
    quiet = quiet or not main_rank
    console = _setup_logging(quiet)
    run_dir: list[Path] = []  # filled as soon as it is known, for the error messages
    with _user_errors(run_dir):
        if resume and overwrite:
            raise ConfigError(
                "--resume continues the run in --out and --overwrite deletes it: pass one"
            )
        args, out = _resolve_resume(args, out, resume)
        cfg = load_cli_config(args, seed=seed, device=device, out=out, wandb=wandb, wandb_env=True)
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
            more = {"overwrite": True} if overwrite else {}
            callbacks = [progress, tracker] if main_rank else []
            with (
                launch.peer_loss_exits()
            ):  # a rank that lost a peer: the launcher names the dead one
                summary = train_run(cfg, cfg.out, resume=resume, callbacks=callbacks, **more)
            ok = True
        finally:
            progress.close()
            if progress.run_dir is not None:
                run_dir[:] = [progress.run_dir]
            if not ok:
                tracker.finish(exit_code=1)
    if not main_rank:
        return
    where = run_dir[0] if run_dir else Path(str(summary.get("run_dir", "?")))
    _print_train_summary(summary, where, tracker, as_json=as_json)


def _launch_ranks(nproc: int, out: Path | None, resume: bool) -> None:
    """``--nproc N``: this command on N local ranks (torchrun's launcher, metakd_cli.launch);
    a rank that fails ends the others and is reported in one line, exit code 2."""
    failed = launch.launch(nproc, launch.without_nproc(sys.argv[1:]))
    if failed is None:
        return
    hint = (
        f"; the run directory stays resumable: metakd train --resume {out} --nproc {nproc}"
        if out is not None
        else f"; resume the run directory rank 0 printed with --resume ... --nproc {nproc}"
    )
    typer.echo(f"Error: {failed}{hint}", err=True)
    raise typer.Exit(2)


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
        f"  method               {summary.get('method', '-')} (seed {summary.get('seed', '-')}"
        + ("; meta.preset=practice" if summary.get("meta_preset") == "practice" else "")
        + ")",
        f"  test accuracy        {acc('test_accuracy')} (best {acc('best_test_accuracy')})",
        f"  val accuracy         {acc('val_accuracy')}",
        f"  λ                    {format_meta(summary.get('meta')) or '-'}",
        f"  hypergradient steps  {_fmt(summary.get('hypergradient_steps'))} "
        f"(predicted {_fmt(summary.get('predicted_steps'))}"
        + (f", skipped as non-finite {skipped}" if skipped else "")
        + ")",
        f"  wall time            {_fmt_seconds(wall)} on {summary.get('device', '-')}",
        f"  cost                 {_fmt_cost(summary.get('cost'))}",
        "  files                summary.json, metrics.jsonl, config.yaml, run.log, checkpoints/"
        + (", per_sample.pt" if (run_dir / "per_sample.pt").is_file() else ""),
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
