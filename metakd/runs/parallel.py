"""One run on several ranks: rank 0 writes the run directory, the others follow it.

Under ``torchrun`` (or ``metakd train --nproc N``) every rank executes :func:`metakd.runs.run.train_run`
with the same config; the trainer shards every batch and reduces gradients and hypergradients
(:mod:`metakd.training.distributed`). Only rank 0 (:attr:`World.is_main`) touches the run directory:
config.yaml, metrics.jsonl, checkpoints, summary.json, run.log and W&B. The other ranks
(:func:`follow`) read the checkpoint rank 0 chose to resume from, train, and write nothing. What must
agree is decided on rank 0 and broadcast: the run directory (a default ``runs/<name>-<timestamp>``
differs between processes), where to start (:class:`Start`), and whether the ledger's calibration
run happens (:class:`Calibration`: every rank takes part in that short fixed-λ run, which is priced
as a plain run of the same world size).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metakd.config import Config
from metakd.runs.build import build, resolve_device, set_rng_state
from metakd.runs.rundir import RunDir
from metakd.training.distributed import World, from_env
from metakd.training.trainer import Trainer

__all__ = ["Calibration", "Start", "broadcast", "follow", "world_for"]

log = logging.getLogger(__name__)


def world_for(cfg: Config) -> World:
    """The ranks a command runs on (torchrun's environment; one process outside it). The grid of
    ``metakd experiment`` and the pipeline take their per-cell decisions (skip a finished run,
    resume a started one) on rank 0 and :func:`broadcast` them, and only rank 0 writes results."""
    return from_env(resolve_device(cfg.device))


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; itself without several ranks)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class Start:
    """Rank 0's decision at the start of a run: ``done`` (a finished run, nothing to train) or the
    ``epoch`` of the checkpoint to resume from (None: from the beginning)."""

    done: bool = False
    epoch: int | None = None


class Calibration:
    """The ledger's ``calibrate`` callable on rank 0: it tells the other ranks to join the timed
    fixed-λ run (all ranks train it, sharded like the priced run). :meth:`close` tells them when
    it was not needed."""

    def __init__(
        self, world: World, calibrate: Callable[[Config, World], dict[str, float]]
    ) -> None:
        self.world, self.calibrate, self.asked = world, calibrate, False

    def __call__(self, cfg: Config) -> dict[str, float]:
        self.asked = True
        broadcast(True, self.world)
        return self.calibrate(cfg, self.world)

    def close(self) -> None:
        if not self.asked:
            broadcast(False, self.world)

    @staticmethod
    def join(cfg: Config, world: World, calibrate: Callable[[Config, World], Any]) -> None:
        """On a rank > 0: take part in rank 0's calibration when it runs one."""
        if broadcast(None, world):
            calibrate(cfg, world)


def follow(
    cfg: Config,
    path: Path,
    device: torch.device,
    world: World,
    calibrate: Callable[[Config, World], Any],
) -> dict[str, Any]:
    """A rank > 0: the same trainer on this rank's shards, from the checkpoint rank 0 resumes from;
    returns its summary (rank 0 writes the run's). Reads ``path``, writes nothing."""
    start: Start = broadcast(None, world)
    summary: dict[str, Any] = {}
    if not start.done:
        state: Mapping[str, Any] | None = None
        if start.epoch is not None:
            state = torch.load(
                RunDir.checkpoint_file(path, start.epoch), map_location="cpu", weights_only=True
            )
        with contextlib.ExitStack() as stack:
            splits, logits, model = build(cfg, device, (), stack)
            trainer = Trainer(cfg, model, splits, logits, device=device, world=world)
            if state is not None:
                trainer.load_state_dict(state["trainer"])
                set_rng_state(state["rng"])
            summary = trainer.train()
    Calibration.join(cfg, world, calibrate)
    return summary
