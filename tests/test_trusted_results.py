"""Results a user can trust (issue 34): a study never reports another study's runs, a checkpoint
with a missing key never makes a run unresumable, a rerun without --resume never deletes a run, and
a completed run whose ledger entry was lost gets it back on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from metakd.config import ConfigError
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd.runs.rundir import RunDir
from metakd_cli.main import app

TINY = [
    "device=cpu", "teacher.epochs=20", "train.epochs=20", "train.eval_every=10",
    "train.log_every=5", "train.checkpoint_every=5", "wandb.mode=disabled",
]  # fmt: skip
EXACT = ("meta", "meta_raw", "test_accuracy", "val_accuracy", "steps", "train_loss")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))  # teacher logits and ledger shared by the module


def _overrides(cache: str, *extra: str) -> list[str]:
    return [*TINY, f"data.cache_dir={cache}", *extra]


def _cfg(cache: str, *extra: str):
    return load_config(None, _overrides(cache, *extra))


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory) -> dict:
    """A finished fixed-λ run with plain SGD with momentum (checkpoints at epochs 15 and 20)."""
    root = tmp_path_factory.mktemp("trust")
    extra = ("meta.method=fixed", "meta.values.beta1=0.3", "meta.values.beta2=0.7",
             "meta.values.temperature=2.0", "train.optimizer=sgd", "train.momentum=0.9")  # fmt: skip
    torch.set_num_threads(1)
    summary = train_run(_cfg(cache, *extra), root / "A")
    return {"run": root / "A", "extra": extra, "summary": summary}


def _interrupted(finished: dict, tmp_path: Path) -> Path:
    """A copy of the finished run as a kill after its epoch-15 checkpoint leaves it."""
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run, ignore=shutil.ignore_patterns(".lock"))
    (run / "summary.json").unlink()
    RunDir(run).checkpoint_path(20).unlink()
    return run


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


# --------------------------------------------------------------------------- item 1


def test_a_new_study_in_an_old_out_scores_its_own_lambdas(cache, tmp_path):
    """A second study (another journal, another sampler seed) in an OUT that holds the first one's
    trials trains its own λ: every reported score is that of a run at the trial's λ, and the first
    study's runs are left as they were."""
    from metakd.runs.search import run_search

    cfg = _cfg(cache)
    out = tmp_path / "study"
    first = run_search(cfg, sampler="random", trials=2, out_dir=out, retrain_seeds=[1],
                       storage=f"journal:{tmp_path / 'a.journal'}", sampler_seed=0)  # fmt: skip
    before = {t["run_dir"]: (out / t["run_dir"] / "config.yaml").read_text()
              for t in first["trials"]}  # fmt: skip
    second = run_search(cfg, sampler="random", trials=2, out_dir=out, retrain_seeds=[1],
                        storage=f"journal:{tmp_path / 'b.journal'}", sampler_seed=5)  # fmt: skip
    assert [t["values"] for t in second["trials"]] != [t["values"] for t in first["trials"]]
    for t in second["trials"]:
        run = out / t["run_dir"]
        conf = yaml.safe_load((run / "config.yaml").read_text())
        assert conf["meta"]["values"] == pytest.approx(t["values"])
        assert t["val_accuracy"] == _summary(run)["val_accuracy"]
        assert t["run_dir"] not in before  # a directory of its own
    for row in second["retrain"]:
        if not row.get("reused_trial"):
            conf = yaml.safe_load((out / row["run_dir"] / "config.yaml").read_text())
            assert conf["meta"]["values"] == pytest.approx(second["best"]["values"])
    for rd, text in before.items():  # the first study's runs are untouched
        assert (out / rd / "config.yaml").read_text() == text


# --------------------------------------------------------------------------- item 2


def test_a_checkpoint_without_counters_resumes_with_one_warning(finished, tmp_path, caplog):
    run = _interrupted(finished, tmp_path)
    path = RunDir(run).checkpoint_path(15)
    state = torch.load(path, weights_only=True)
    del state["trainer"]["counters"]["skipped_meta_steps"]
    del state["trainer"]["epoch_loss"]
    torch.save(state, path)
    with caplog.at_level("WARNING", logger="metakd"):
        summary = train_run(load_config(run / "config.yaml"), run, resume=True)
    lines = [r.getMessage() for r in caplog.records if "skipped_meta_steps" in r.getMessage()]
    assert len(lines) == 1 and "epoch_loss" in lines[0], lines
    assert summary["skipped_meta_steps"] == 0
    for key in EXACT:  # epoch 15 ended an epoch: the defaults are the values it had
        assert summary[key] == finished["summary"][key], key


def test_a_resume_with_another_optimizer_is_one_clear_error(finished, tmp_path):
    run = _interrupted(finished, tmp_path)
    config = (run / "config.yaml").read_text()
    kept = sorted(p.name for p in RunDir(run).checkpoints())
    result = CliRunner().invoke(
        app, ["train", "--resume", str(run), "train.optimizer=adam", "-q", "--wandb", "disabled"]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr  # (after the warning naming train.optimizer)
    assert "betas" in errors[0] and "new --out" in errors[0] and "original" in errors[0]
    assert "Traceback" not in result.output and "KeyError" not in result.output
    # nothing was lost: the config and checkpoints are as they were, and the run resumes
    assert (run / "config.yaml").read_text() == config
    assert sorted(p.name for p in RunDir(run).checkpoints()) == kept
    summary = train_run(load_config(run / "config.yaml"), run, resume=True)
    for key in EXACT:
        assert summary[key] == finished["summary"][key], key


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_last_good_one(
    tmp_path, monkeypatch
):
    import metakd.runs.rundir as rundir

    rd = RunDir(tmp_path / "run")
    rd.save_checkpoint({"trainer": {"step": 1}, "rng": {}}, 1)

    def torn(obj, path):  # a write that leaves an unreadable file (a bad disk, a torn copy)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"not a checkpoint")

    monkeypatch.setattr(rundir, "atomic_torch_save", torn)
    rd.save_checkpoint({"trainer": {"step": 2}, "rng": {}}, 2)
    rd.save_checkpoint({"trainer": {"step": 3}, "rng": {}}, 3)
    assert rd.checkpoint_path(1).is_file()
    state = rd.load_checkpoint(required=("trainer", "rng"))
    assert state is not None and state["trainer"]["step"] == 1


# --------------------------------------------------------------------------- item 5


def test_train_without_resume_on_an_interrupted_run_is_refused(finished, cache, tmp_path):
    run = _interrupted(finished, tmp_path)
    kept = sorted(p.name for p in RunDir(run).checkpoints())
    args = ["train", *_overrides(cache, *finished["extra"]), "--out", str(run), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: "), errors
    assert "--resume" in errors[0] and "new --out" in errors[0] and "--overwrite" in errors[0]
    assert sorted(p.name for p in RunDir(run).checkpoints()) == kept
    with pytest.raises(ConfigError, match="--resume"):
        train_run(load_config(run / "config.yaml"), run)
    # asked for, the run starts over and ends as the original did
    over = CliRunner().invoke(app, [*args, "--overwrite", "--json"])
    assert over.exit_code == 0, over.output
    summary = _summary(run)
    for key in EXACT:
        assert summary[key] == finished["summary"][key], key


# --------------------------------------------------------------------------- item 6


def test_resume_of_a_completed_run_without_its_cost_fills_it(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run, ignore=shutil.ignore_patterns(".lock"))
    old = _summary(run)
    assert "cost" in old
    del old["cost"], old["plain_runs"]
    (run / "summary.json").write_text(json.dumps(old))
    metrics = (run / "metrics.jsonl").read_text()
    summary = train_run(load_config(run / "config.yaml"), run, resume=True)
    assert summary["cost"]["plain_runs"] == 1.0  # a fixed-λ run is its own plain run
    assert _summary(run)["cost"] == summary["cost"]
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained again
    for key in (*EXACT, "wall_seconds", "cpu_seconds"):
        assert summary[key] == old[key], key


def test_pipeline_fills_the_cost_of_a_finder_killed_in_calibration(cache, tmp_path):
    from metakd.runs.pipeline import run_pipeline

    cfg = _cfg(cache, "meta.method=hypergrad", "train.epochs=10")
    out = tmp_path / "pipe"
    run_pipeline(cfg, out_dir=out, seeds=[0], finder_epochs=5)
    finder = out / "finder" / "seed-0"
    old = _summary(finder)
    assert old["cost"]["plain_runs"] is not None
    del old["cost"], old["plain_runs"]
    (finder / "summary.json").write_text(json.dumps(old))
    calls: list = []

    def counting(c, run_dir, **kw):
        calls.append((Path(run_dir), kw.get("resume")))
        return train_run(c, run_dir, **kw)

    res = run_pipeline(cfg, out_dir=out, seeds=[0], finder_epochs=5, train_fn=counting)
    assert calls == [(finder, True)]  # only the finder, resumed: nothing trained again
    filled = _summary(finder)
    assert filled["cost"]["plain_runs"] is not None
    assert filled["wall_seconds"] == old["wall_seconds"] and filled["meta"] == old["meta"]
    assert res["runs"][0]["finder"]["wall_seconds"] == old["wall_seconds"]
