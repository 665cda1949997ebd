"""metakd.runs.experiment.run_experiment: grid layout, per-run configs, skipping/resuming, the ``optimal``
retrain, results tables (mean and sample std, ddof=1, computed here with numpy), process workers.

Most tests use a fake ``train_run`` that writes a run directory in the contract format of
docs/architecture.md; one test runs the real trainer on tiny synthetic settings.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from metakd.config import Config, config_to_dict
from metakd.runs.config import load_config
from metakd.runs.experiment import run_dir_for, run_experiment

sys.path.insert(0, str(Path(__file__).parent))
from test_report import write_run  # synthetic run directories in the contract format


def fake_train_run(
    cfg: Config, run_dir: Path | None = None, *, resume: bool = False, callbacks: Any = ()
) -> dict[str, Any]:
    """Stands in for metakd.runs.run.train_run: a finished run dir for ``cfg`` (fixed λ = meta.values)."""
    import torch

    run_dir = Path(run_dir if run_dir is not None else cfg.out)  # type: ignore[arg-type]
    call = {
        "resume": resume,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "callbacks": len(list(callbacks)),
    }
    summary = write_run(
        run_dir, method=cfg.meta.method, seed=cfg.seed, values=dict(cfg.meta.values) or None
    )
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (run_dir / "fake_call.json").write_text(json.dumps(call))
    return summary


@pytest.fixture
def patched_train_run(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Patch metakd.runs.run.train_run with the fake (a stand-in module while metakd.runs.run is missing);
    returns the list of run dirs it was called with."""
    calls: list[Path] = []

    def fake(cfg: Config, run_dir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
        calls.append(Path(run_dir) if run_dir is not None else Path(str(cfg.out)))
        return fake_train_run(cfg, run_dir, **kwargs)

    try:
        module = importlib.import_module("metakd.runs.run")
    except ImportError:
        module = types.ModuleType("metakd.runs.run")
        monkeypatch.setitem(sys.modules, "metakd.runs.run", module)
    monkeypatch.setattr(module, "train_run", fake, raising=False)
    return calls


def _cfg() -> Config:
    return load_config(None, ["name=tiny", "wandb.mode=disabled", "wandb.tags=[paper]"])


def test_grid_layout_configs_optimal_and_results(
    tmp_path: Path, patched_train_run: list[Path]
) -> None:
    out = tmp_path / "exp"
    factory_calls: list[tuple[str, Path]] = []

    def factory(cfg: Config, run_dir: Path) -> list[object]:
        factory_calls.append((cfg.meta.method, run_dir))
        return [object()]

    summaries = run_experiment(
        _cfg(), methods=["optimal", "baseline", "hypergrad"], seeds=[0, 1], out_dir=out,
        callbacks_factory=factory, quiet=True,
    )  # fmt: skip
    assert [(s.get("label") or s["method"], s["seed"]) for s in summaries] == [
        ("optimal", 0), ("optimal", 1), ("baseline", 0), ("baseline", 1), ("hypergrad", 0), ("hypergrad", 1),
    ]  # fmt: skip
    assert len(patched_train_run) == 6 and len(factory_calls) == 6
    # optimal runs after the hypergrad run of its seed
    order = [p.relative_to(out).as_posix() for p in patched_train_run]
    for s in (0, 1):
        assert order.index(f"hypergrad/seed-{s}") < order.index(f"optimal/seed-{s}")
    for method in ("baseline", "hypergrad", "optimal"):
        for seed in (0, 1):
            run_dir = run_dir_for(out, method, seed)
            assert run_dir == out / method / f"seed-{seed}"
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert cfg["meta"]["method"] == ("fixed" if method == "optimal" else method)
            assert cfg["seed"] == seed and cfg["out"] == str(run_dir)
            assert cfg["wandb"]["group"] == f"tiny-{method}"
            assert {"paper", method, f"seed-{seed}"} <= set(cfg["wandb"]["tags"])
            call = json.loads((run_dir / "fake_call.json").read_text())
            assert call["resume"] is False and call["callbacks"] == 1
    for seed in (0, 1):
        hyper = json.loads((out / "hypergrad" / f"seed-{seed}" / "summary.json").read_text())
        optimal_cfg = yaml.safe_load((out / "optimal" / f"seed-{seed}" / "config.yaml").read_text())
        assert optimal_cfg["meta"]["values"] == pytest.approx(hyper["meta"])
        optimal = json.loads((out / "optimal" / f"seed-{seed}" / "summary.json").read_text())
        assert optimal["label"] == "optimal" and optimal["meta"] == pytest.approx(hyper["meta"])

    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["methods"]] == ["baseline", "hypergrad", "optimal"]
    with (out / "results.csv").open() as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    md = (out / "results.md").read_text()
    for row in results["methods"]:
        group = [s for s in summaries if (s.get("label") or s["method"]) == row["method"]]
        for key in ("test_accuracy", "best_test_accuracy", "hypergradient_steps", "wall_seconds"):
            values = np.array([s[key] for s in group], dtype=float)
            assert row[f"{key}_mean"] == pytest.approx(values.mean())
            assert row[f"{key}_std"] == pytest.approx(values.std(ddof=1))
            assert float(table[row["method"]][f"{key}_mean"]) == pytest.approx(values.mean())
        for name in ("beta1", "beta2", "temperature"):
            assert row["meta_mean"][name] == pytest.approx(
                np.mean([s["meta"][name] for s in group])
            )
        acc = np.array([s["test_accuracy"] for s in group])
        assert f"| {row['method']} | 2 | {acc.mean():.4f} ± {acc.std(ddof=1):.4f} |" in md


def test_finished_runs_are_skipped_and_unfinished_resumed(
    tmp_path: Path, patched_train_run: list[Path]
) -> None:
    out = tmp_path / "exp"
    done = write_run(out / "hypergrad" / "seed-0", method="hypergrad", seed=0)
    partial = out / "baseline" / "seed-0"  # started (config.yaml), no summary: resumed
    partial.mkdir(parents=True)
    (partial / "config.yaml").write_text(yaml.safe_dump(config_to_dict(_cfg())))
    (partial / "metrics.jsonl").write_text(json.dumps({"step": 0, "phase": "train"}) + "\n")
    failed = out / "baseline" / "seed-1"  # a failed run's summary says status failed: resumed
    write_run(failed, method="baseline", seed=1)
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "method": "baseline"}))
    empty = out / "hypergrad" / "seed-1"  # an empty directory: started afresh
    empty.mkdir(parents=True)

    summaries = run_experiment(
        _cfg(), methods=["baseline", "hypergrad"], seeds=[0, 1], out_dir=out, quiet=True
    )
    ran = sorted(p.relative_to(out).as_posix() for p in patched_train_run)
    assert ran == ["baseline/seed-0", "baseline/seed-1", "hypergrad/seed-1"]
    assert json.loads((partial / "fake_call.json").read_text())["resume"] is True
    assert json.loads((failed / "fake_call.json").read_text())["resume"] is True
    assert json.loads((empty / "fake_call.json").read_text())["resume"] is False
    assert summaries[2] == done  # the finished run's summary, read back

    patched_train_run.clear()  # a second call finds everything finished
    again = run_experiment(
        _cfg(), methods=["baseline", "hypergrad"], seeds=[0, 1], out_dir=out, quiet=True
    )
    assert patched_train_run == [] and again == summaries


def test_optimal_needs_a_hypergrad_run(tmp_path: Path, patched_train_run: list[Path]) -> None:
    out = tmp_path / "exp"
    with pytest.raises(ValueError, match=r"missing for seeds \[0\].*add 'hypergrad'"):
        run_experiment(_cfg(), methods=["optimal"], seeds=[0], out_dir=out, quiet=True)
    assert patched_train_run == []
    hyper = write_run(out / "hypergrad" / "seed-0", method="hypergrad", seed=0)
    (summary,) = run_experiment(_cfg(), methods=["optimal"], seeds=[0], out_dir=out, quiet=True)
    assert summary["label"] == "optimal" and summary["meta"] == pytest.approx(hyper["meta"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": ["hypergrad", "splines"]}, "unknown methods \\['splines'\\]"),
        ({"methods": ["baseline", "baseline"]}, "without repeats"),
        ({"seeds": []}, "seeds must be a non-empty"),
        ({"workers": 0}, "workers must be >= 1"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "methods": ["baseline"],
        "seeds": [0],
        "out_dir": tmp_path,
        "quiet": True,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        run_experiment(_cfg(), **args)


def test_workers_run_in_spawned_processes(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    summaries = run_experiment(
        _cfg(), methods=["hypergrad", "optimal"], seeds=[0, 1], out_dir=out, workers=2, quiet=True,
        train_fn=fake_train_run,
    )  # fmt: skip
    calls = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed-*/fake_call.json"))]
    assert len(calls) == 4
    assert all(c["pid"] != os.getpid() for c in calls)  # ran in worker processes
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    assert all(c["threads"] == max(1, cores // 2) for c in calls)
    for seed in (0, 1):
        hyper = json.loads((out / "hypergrad" / f"seed-{seed}" / "summary.json").read_text())
        optimal = summaries[2 + seed]
        assert optimal["label"] == "optimal" and optimal["meta"] == pytest.approx(hyper["meta"])
    assert (out / "results.md").is_file()


def failing_train_run(cfg: Config, run_dir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """fake_train_run, except that seed 1 fails with a user error (as a mismatched teacher does)."""
    from metakd.config import ConfigError

    if cfg.seed == 1:
        raise ConfigError("teacher checkpoint 't.pt' was trained on another teacher/test split")
    return fake_train_run(cfg, run_dir, **kwargs)


def test_a_user_error_in_a_worker_stays_a_user_error_and_keeps_finished_runs(
    tmp_path: Path,
) -> None:
    from metakd.config import ConfigError

    out = tmp_path / "exp"
    with pytest.raises(
        ConfigError,
        match=r"1 run\(s\) failed: hypergrad seed 1; first error: "
        r"teacher checkpoint 't.pt' was trained on another",
    ):
        run_experiment(
            _cfg(), methods=["hypergrad"], seeds=[0, 1], out_dir=out, workers=2, quiet=True,
            train_fn=failing_train_run,
        )  # fmt: skip
    assert (out / "hypergrad" / "seed-0" / "summary.json").is_file()  # the finished run is kept
    assert not (out / "hypergrad" / "seed-1" / "summary.json").exists()


def _real_train_run_available() -> bool:
    try:
        return hasattr(importlib.import_module("metakd.runs.run"), "train_run")
    except ImportError:
        return False


@pytest.mark.skipif(
    not _real_train_run_available(), reason="metakd.runs.run.train_run is not implemented yet"
)
def test_two_seed_experiment_with_the_real_trainer(tmp_path: Path) -> None:
    from metakd.reporting.report import build_report

    cfg = load_config(
        None,
        [
            "name=tiny",
            "train.epochs=60",
            "teacher.epochs=50",
            "train.eval_every=20",
            "wandb.mode=disabled",
            "device=cpu",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    out = tmp_path / "exp"
    methods = ["baseline", "hypergrad", "optimal"]
    summaries = run_experiment(cfg, methods=methods, seeds=[0, 1], out_dir=out, quiet=True)
    assert len(summaries) == 6
    assert all((run_dir_for(out, m, s) / "summary.json").is_file() for m in methods for s in (0, 1))
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["methods"]] == methods
    for s in (0, 1):
        hyper = json.loads((run_dir_for(out, "hypergrad", s) / "summary.json").read_text())
        optimal_cfg = yaml.safe_load((run_dir_for(out, "optimal", s) / "config.yaml").read_text())
        assert optimal_cfg["meta"]["values"] == pytest.approx(hyper["meta"])
    report = build_report([out], tmp_path / "report")
    assert report.is_file() and (tmp_path / "report" / "metaparams.png").stat().st_size > 0
    with (tmp_path / "report" / "results.csv").open() as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    for method in methods:
        acc = np.array(
            [s["test_accuracy"] for s in summaries if (s.get("label") or s["method"]) == method]
        )
        assert float(table[method]["test_accuracy_mean"]) == pytest.approx(acc.mean())
        assert float(table[method]["test_accuracy_std"]) == pytest.approx(acc.std(ddof=1))
