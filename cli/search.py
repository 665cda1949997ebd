"""``metakd search``: grid, random and TPE search over a fixed λ (Optuna), or the metakd pipeline."""

from __future__ import annotations

import json
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from metakd.config import ConfigError
from metakd_cli import launch
from metakd_cli.app import (
    ArgsArg,
    DeviceOpt,
    QuietOpt,
    SeedOpt,
    WandbOpt,
    WandbRunCallbacks,
    _setup_logging,
    _user_errors,
    app,
    err_console,
    load_cli_config,
    parse_seeds,
)

__all__ = ["search"]


class Sampler(str, Enum):
    grid = "grid"
    random = "random"
    tpe = "tpe"
    hypergrad = "hypergrad"


class Space(str, Enum):
    share = "share"
    raw = "raw"


class Pruner(str, Enum):
    none = "none"
    median = "median"
    halving = "halving"


EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  metakd search configs/synthetic.yaml --sampler grid "
    "--grid beta1_share=0.01,0.1,0.5 --grid temperature=1,4,8\n\n"
    "  metakd search configs/synthetic.yaml --sampler tpe --trials 8 --retrain-seeds 0,1,2,3,4\n\n"
    "  metakd search configs/synthetic.yaml --sampler hypergrad --finder-epochs 1000 "
    "--retrain-seeds 5\n\n"
    "  metakd search CFG --sampler random --out runs/s --storage journal:runs/s/study.journal "
    "--worker 1   [dim]# a second worker on one study[/dim]\n\n"
    "  metakd search CFG --sampler grid --grid ... --out runs/g "
    "--import-results docs/reproduction/g   [dim]# continue a committed study[/dim]\n\n"
    "Rerun the same command to continue a study: finished trials are kept, interrupted ones rerun. "
    "Trials are fixed-λ runs in OUT/trials/, scored on validation accuracy; results.md, "
    "results.json and trials.csv in OUT; [bold]metakd report OUT[/bold] draws search.png."
)


def _command_line() -> str | None:
    """This command line, to repeat it (None when not run as ``metakd``)."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return shlex.join(["metakd", *sys.argv[1:]]) if argv0.startswith("metakd") else None


@app.command(epilog=EPILOG)
def search(
    args: ArgsArg = None,
    sampler: Annotated[
        Sampler,
        typer.Option("--sampler", help="Optuna sampler, or hypergrad: the metakd pipeline."),
    ] = Sampler.tpe,
    trials: Annotated[
        int | None,
        typer.Option(
            "--trials", min=1, help="Finished trials the study holds (default: grid size, or 8)."
        ),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", help="NAME=V1,V2,... per searched dimension (--sampler grid)."),
    ] = None,
    space: Annotated[
        Space,
        typer.Option("--space", help="share: β1/(β1+β2) and T; raw: each metaparameter."),
    ] = Space.share,
    pruner: Annotated[
        Pruner, typer.Option("--pruner", help="Prune trials on intermediate val accuracy.")
    ] = Pruner.none,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Optuna storage URL (default sqlite:///OUT/study.db), e.g. postgresql://..., "
            "or journal:PATH for a journal file.",
        ),
    ] = None,
    repair_journal: Annotated[
        bool,
        typer.Option(
            "--repair-journal",
            help="Truncate a journal storage's torn last line (a write cut by a kill), keeping a "
            "copy as PATH.bak.",
        ),
    ] = False,
    study_name: Annotated[
        str | None, typer.Option("--study-name", help="Default: the name of OUT.")
    ] = None,
    sampler_seed: Annotated[int, typer.Option("--sampler-seed", help="Sampler seed.")] = 0,
    worker: Annotated[
        int,
        typer.Option("--worker", min=0, help="Distinct per process sharing a study (seeds)."),
    ] = 0,
    retrain_seeds: Annotated[
        str | None,
        typer.Option(
            "--retrain-seeds",
            help="Retrain the validation-best λ on these seeds (a count or a list); for "
            "hypergrad: the seeds of the pipeline (default: --seed).",
        ),
    ] = None,
    finder_epochs: Annotated[
        int | None,
        typer.Option("--finder-epochs", min=1, help="hypergrad: epochs of the finder run."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Study directory (default runs/<name>-search-<sampler>)."),
    ] = None,
    import_results: Annotated[
        Path | None,
        typer.Option(
            "--import-results",
            help="Continue from an earlier study's or pipeline's results.json (or its directory) "
            "whose run directories are gone, e.g. one committed from another machine.",
        ),
    ] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    wandb: WandbOpt = None,
    quiet: QuietOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json on stdout.")] = False,
) -> None:
    """Search λ by grid, random or TPE search (Optuna), or run the metakd pipeline.

    Each trial is one fixed-λ training run, scored on the final validation accuracy; the \
    study lives in an Optuna storage and resumes when the command is rerun. \
    [bold]--sampler hypergrad[/bold] runs the pipeline instead: a hypergradient finder run of \
    --finder-epochs, then a fixed-λ retrain at the λ it found, per seed. Every result has its \
    cost in plain (fixed-λ) runs.
    """
    from metakd.reporting.progress import ExperimentProgress

    main_rank = launch.rank() == 0  # under torchrun (the pipeline) only rank 0 shows and prints
    quiet = quiet or not main_rank
    console = _setup_logging(quiet)
    with _user_errors():
        cfg = load_cli_config(args, seed=seed, device=device, wandb=wandb, wandb_env=True)
        out_dir = out or Path("runs") / f"{cfg.name}-search-{sampler.value}"
        seeds = (parse_seeds(retrain_seeds, first=cfg.seed, option="--retrain-seeds")
                 if retrain_seeds else [])  # fmt: skip
        wb = WandbRunCallbacks(quiet)
        if sampler is Sampler.hypergrad:
            from metakd.runs.pipeline import run_pipeline

            if grid:
                raise ValueError("--grid is for --sampler grid; hypergrad tunes λ itself")
            seeds = seeds or [cfg.seed]
            epochs = finder_epochs or max(1, cfg.train.epochs // 4)
            with ExperimentProgress(2 * len(seeds), quiet=quiet, console=console) as bar:
                results: dict[str, Any] = run_pipeline(
                    cfg, out_dir=out_dir, seeds=seeds, finder_epochs=epochs,
                    callbacks_factory=lambda *a: [bar.run_callback(), *wb()],
                    import_results=import_results,
                )  # fmt: skip
        else:
            from metakd.runs.search import run_search

            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError(
                    f"--sampler {sampler.value} under torchrun would start one study per rank; a "
                    "search spreads over GPUs and machines as one Optuna study with one worker "
                    "per GPU (metakd search ... --storage URL --worker K, docs/distributed.md)"
                )
            if finder_epochs is not None:
                raise ValueError("--finder-epochs is for --sampler hypergrad")
            n_grid = 1
            for item in grid or []:
                n_grid *= max(1, len(item.partition("=")[2].split(",")))
            n_trials = trials or (n_grid if grid else 8)
            n_runs = (min(n_trials, n_grid) if grid else n_trials) + len(seeds)
            with ExperimentProgress(n_runs, quiet=quiet, console=console) as bar:
                last: list[Any] = []

                def factory(*a: Any) -> list[Any]:
                    last[:] = [bar.run_callback()]
                    return [*last, *wb()]

                def on_trial(row: dict[str, Any]) -> None:
                    if row["state"] == "PRUNED" and last:  # the run's bar never reached its end
                        last[0].close()
                        bar.advance()
                    if not quiet:
                        score = row.get("val_accuracy")
                        shown = f", val accuracy {score:.4f}" if score is not None else ""
                        console.print(f"trial {row['number']}: {row['state'].lower()}{shown}")

                results = run_search(
                    cfg, sampler=sampler.value, trials=n_trials, out_dir=out_dir,
                    space=space.value, grid=grid or [], pruner=pruner.value, storage=storage,
                    study_name=study_name, sampler_seed=sampler_seed, worker=worker,
                    retrain_seeds=seeds, callbacks_factory=factory, on_trial=on_trial,
                    import_results=import_results, repair_journal=repair_journal,
                    command=_command_line(),
                )  # fmt: skip
    if not main_rank:
        return
    if as_json:
        typer.echo(json.dumps(results, default=str))
    else:
        typer.echo((out_dir / "results.md").read_text().rstrip())
    err_console.print(f"Study directory: {out_dir}", soft_wrap=True)
