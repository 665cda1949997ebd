"""The epoch bench.

:func:`run_epoch_bench` times one training epoch through :class:`metakd.training.trainer.Trainer` on the CIFAR
protocol's shape (79 batches of 128 random 3x32x32 images, cached random teacher logits) for the
``baseline``, ``hypergrad`` (η = 1 every step) and ``forecast`` (n = 2, window 10) methods.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metakd.bench.cases import NUM_CLASSES, _input_shape, _synthetic_splits
from metakd.bench.common import _fmt, _progress, _ratio, _resolve_device, _sync, _versions
from metakd.config import ConfigError, MetaConfig, ModelConfig
from metakd.data.models import build_model

__all__ = ["epoch_markdown", "run_epoch_bench"]


def _epoch(
    method: str, model: str, splits: Any, logits: dict[str, Tensor], batch_size: int,
    device: torch.device, unroll: int = 1,
) -> dict[str, Any]:  # fmt: skip
    from metakd.config import Config, ForecastConfig, TrainConfig
    from metakd.training.trainer import Trainer

    meta = MetaConfig.model_validate(
        {"method": method, "unroll": unroll, "every": 1, "optimizer": "sgd", "lr": 1.0,
         "clip": 1.0, "val_batch_size": batch_size}
    )  # fmt: skip
    cfg = Config(
        name="epoch-bench",
        student=ModelConfig(name=model),
        train=TrainConfig(optimizer="adam", lr=1e-3, epochs=1, batch_size=batch_size, eval_every=0),
        meta=meta,
        forecast=ForecastConfig(window=10, optimize=1, predict=1, forecaster="linear"),
    )  # fmt: skip
    torch.manual_seed(0)
    student = build_model(cfg.student, _input_shape(model), NUM_CLASSES).to(device)
    trainer = Trainer(cfg, student, splits, logits, device=device)
    spent = {"data_train": 0.0, "data_meta": 0.0, "meta_update": 0.0}
    in_meta = [False]
    batch_fn, val_fn = trainer.stream.batch, trainer.stream.val_batch
    meta_step_fn, apply_fn = trainer.meta_step, trainer.apply_meta_grad

    def timed(fn: Callable[..., Any], key: Callable[[], str]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[key()] += time.perf_counter() - t0

        return wrapper

    def data_key() -> str:
        return "data_meta" if in_meta[0] else "data_train"

    def meta_step(step: int) -> Any:
        in_meta[0] = True
        try:
            return meta_step_fn(step)
        finally:
            in_meta[0] = False

    # instance attributes shadow the methods for this trainer only (timing probes)
    trainer.stream.batch = timed(batch_fn, data_key)  # type: ignore[method-assign]
    trainer.stream.val_batch = timed(val_fn, data_key)  # type: ignore[method-assign]
    trainer.apply_meta_grad = timed(apply_fn, lambda: "meta_update")  # type: ignore[method-assign]
    trainer.meta_step = meta_step  # type: ignore[method-assign]
    _sync(device)
    summary = trainer.train()
    _sync(device)
    ph = summary["phase_seconds"]
    split = {
        "data": spent["data_train"] + spent["data_meta"],
        "forward": ph["train"] - spent["data_train"],
        "hypergrad": ph["hypergrad"] - spent["data_meta"] - spent["meta_update"],
        "meta": spent["meta_update"] + ph["forecast"],
        "eval": ph["eval"],
    }
    split["other"] = summary["wall_seconds"] - sum(split.values())
    return {
        "method": method,
        "wall_s": summary["wall_seconds"],
        "wall_without_eval_s": summary["wall_seconds"] - ph["eval"],
        "split_s": split,
        "steps": summary["steps"],
        "hypergradient_steps": summary["hypergradient_steps"],
        "predicted_steps": summary["predicted_steps"],
    }


def run_epoch_bench(
    model: str = "cifar_very_tiny",
    device: str = "auto",
    methods: Sequence[str] = ("baseline", "hypergrad", "forecast"),
    *,
    steps: int = 79,
    batch_size: int = 128,
    n_eval: int = 10_000,
    threads: int | None = None,
    out: Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Wall time of one training epoch per method through :class:`metakd.training.trainer.Trainer`.

    The CIFAR protocol's shape without real data: ``steps`` batches of ``batch_size`` random inputs
    (79 x 128 ≈ the paper's 10,112 images), random cached teacher logits, validation and test splits of
    ``n_eval`` images (evaluated once, at the end of the epoch), Adam(1e-3) real steps, meta SGD(lr 1,
    clip 1), η = 1 every step (``hypergrad``) or the n = 2 forecast schedule with windows of 10 steps
    (``forecast``). Reports the wall time split into data (batch gathering), forward (real step:
    forward, backward, optimizer), hypergrad (the hypergradient), meta (meta update + forecasting),
    eval and other, and the ratios to ``baseline``. With ``out``, writes ``epoch.json``.
    """
    dev = _resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    bad = [m for m in methods if m not in ("baseline", "fixed", "random", "hypergrad", "forecast")]
    if bad:
        raise ConfigError(
            f"unknown methods {bad}; choose from baseline, fixed, random, hypergrad, forecast"
        )
    splits, logits = _synthetic_splits(model, steps, batch_size, n_eval, dev)
    small, small_logits = _synthetic_splits(model, 3, batch_size, batch_size, dev, seed=1)
    _epoch("hypergrad", model, small, small_logits, batch_size, dev)  # warm-up
    rows = []
    for m in methods:
        _progress(quiet, f"epoch   {m}")
        rows.append(_epoch(m, model, splits, logits, batch_size, dev))
    base = next((r for r in rows if r["method"] == "baseline"), None)
    for r in rows:
        r["ratio_to_baseline"] = _ratio(r["wall_s"], base["wall_s"]) if base else None
        r["ratio_to_baseline_without_eval"] = (
            _ratio(r["wall_without_eval_s"], base["wall_without_eval_s"]) if base else None
        )
    result = {
        "config": {"model": model, "device": str(dev), "steps": steps, "batch_size": batch_size,
                   "n_eval": n_eval, "threads": torch.get_num_threads(), "train": "adam(1e-3)",
                   "meta": "sgd(lr=1, clip=1), η = 1", "forecast": "window 10, optimize 1, predict 1"},
        "env": _versions(dev),
        "epochs": rows,
    }  # fmt: skip
    if not quiet:
        print(epoch_markdown(result), flush=True)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "epoch.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "epoch.md").write_text(epoch_markdown(result))
    return result


def epoch_markdown(result: dict[str, Any]) -> str:
    """The epoch benchmark as a Markdown table."""
    cfg = result["config"]
    lines = [
        f"One epoch, `{cfg['model']}`, {cfg['steps']} steps x batch {cfg['batch_size']}, "
        f"eval on 2 x {cfg['n_eval']} images, device `{cfg['device']}`, {cfg['threads']} thread(s); seconds:",
        "",
        "| method | epoch wall | data | forward | hypergrad | meta | eval | other "
        "| / baseline | / baseline without eval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["epochs"]:
        s = r["split_s"]
        lines.append(
            f"| {r['method']} | {r['wall_s']:.2f} | {s['data']:.3f} | {s['forward']:.2f} | "
            f"{s['hypergrad']:.2f} | {s['meta']:.3f} | {s['eval']:.2f} | {s['other']:.3f} | "
            f"{_fmt(r['ratio_to_baseline'], '.2f')} | {_fmt(r['ratio_to_baseline_without_eval'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"
