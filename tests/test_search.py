"""`metakd search` (Optuna grid/random/TPE over a fixed λ), the metakd pipeline and the compute
ledger, on tiny synthetic configs: grid coverage and validation-only choice against the trials' own
run directories, retrains against independent train_run calls, resume of a killed study in a fresh
process, two worker processes sharing one journal study, and the plain-run costs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from metakd.config import ConfigError
from metakd.reporting.report import build_report
from metakd.runs import ledger
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd.runs.search import SearchSpace, parse_grid, run_search, storage_for
from metakd.training.trainer import Callback
from metakd_cli.main import app

TINY = [
    "device=cpu", "teacher.epochs=100", "train.epochs=60", "train.eval_every=20",
    "train.log_every=10", "train.checkpoint_every=10", "wandb.mode=disabled",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))  # teacher logits and ledger shared by the module


def _cfg(cache: str, *extra: str):
    return load_config(None, [*TINY, f"data.cache_dir={cache}", *extra])


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_share_space_maps_to_beta_and_temperature_and_checks_the_grid():
    cfg = load_config(None, [])
    sp = SearchSpace.from_config(cfg, "share")
    assert sp.dims["beta1_share"].log and (
        sp.dims["beta1_share"].lo,
        sp.dims["beta1_share"].hi,
    ) == (
        0.01,
        0.99,
    )
    assert 0.1 < sp.dims["temperature"].lo < 0.12 and 9.98 < sp.dims["temperature"].hi < 10.0
    assert sp.values({"beta1_share": 0.1, "temperature": 4.0}) == {
        "beta1": 0.1, "beta2": 0.9, "temperature": 4.0,
    }  # fmt: skip
    raw = SearchSpace.from_config(cfg, "raw")
    assert sorted(raw.dims) == ["beta1", "beta2", "temperature"]
    grid = parse_grid(["beta1_share=0.01,0.1,0.5", "temperature=1,4,8"], sp)
    assert grid == {"beta1_share": [0.01, 0.1, 0.5], "temperature": [1.0, 4.0, 8.0]}
    with pytest.raises(ConfigError, match="missing \\['temperature'\\]"):
        parse_grid(["beta1_share=0.1"], sp)
    with pytest.raises(ConfigError, match="outside the range"):
        parse_grid(["beta1_share=0.1", "temperature=20"], sp)
    with pytest.raises(ConfigError, match="not a searched dimension"):
        parse_grid(["beta1=0.1", "temperature=2"], sp)
    soft = load_config(None, ["meta.params.temperature.constraint=softplus"])
    with pytest.raises(ConfigError, match="sigmoid"):
        SearchSpace.from_config(soft, "raw")


GRID = ["beta1_share=0.1,0.5", "temperature=1,4"]


def test_grid_study_covers_the_grid_chooses_by_validation_and_retrains(cache, tmp_path):
    cfg = _cfg(cache)
    out = tmp_path / "grid"
    first = run_search(cfg, sampler="grid", trials=2, out_dir=out, grid=GRID)
    assert len(first["trials"]) == 2
    # continuing the study (a larger budget) visits the rest of the grid, no point twice
    res = run_search(cfg, sampler="grid", trials=10, out_dir=out, grid=GRID, retrain_seeds=[1])
    trials = res["trials"]
    assert len(trials) == 4 and {t["state"] for t in trials} == {"COMPLETE"}  # capped to the grid
    points = {(t["params"]["beta1_share"], t["params"]["temperature"]) for t in trials}
    assert points == {(0.1, 1.0), (0.1, 4.0), (0.5, 1.0), (0.5, 4.0)}
    # every trial is a fixed-λ run whose own summary holds the score; the best is by validation
    vals = {}
    for t in trials:
        s = _summary(out / t["run_dir"])
        assert s["method"] == "fixed" and s["meta"]["beta2"] == pytest.approx(
            1 - t["values"]["beta1"]
        )
        assert t["val_accuracy"] == s["val_accuracy"] and t["test_accuracy"] == s["test_accuracy"]
        vals[t["number"]] = s["val_accuracy"]
    best = max(vals.values())
    assert res["best"]["number"] == min(n for n, v in vals.items() if v == best)
    # the study is its own plain-run reference: n complete trials cost n plain runs
    assert res["cost"]["plain_runs"] == pytest.approx(4.0)
    assert trials[-1]["cum_cost"] == pytest.approx(4.0)
    # the retrain is an ordinary fixed-λ run at the chosen λ on the other seed
    ref = train_run(
        _cfg(cache, "seed=1", "meta.method=fixed",
             *(f"meta.values.{k}={v!r}" for k, v in res["best"]["values"].items())),
        tmp_path / "independent",
    )  # fmt: skip
    assert res["retrain"][0]["test_accuracy"] == ref["test_accuracy"]
    md = (out / "results.md").read_text()
    assert "test acc (not used)" in md and "Retrained at trial" in md
    assert (out / "trials.csv").read_text().count("\n") == 5
    # a rerun is a resume: nothing is trained again, the same results come back
    again = run_search(cfg, sampler="grid", trials=4, out_dir=out, grid=GRID, train_fn=_no_training)
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in trials]
    with pytest.raises(ConfigError, match="different sampler"):
        run_search(cfg, sampler="random", trials=4, out_dir=out)
    # a study written before a config key existed continues (the key keeps its default) ...
    settings = json.loads((out / "search.json").read_text())
    del settings["config"]["meta"]["hypergrad"]["online_decay"]
    (out / "search.json").write_text(json.dumps(settings))
    run_search(cfg, sampler="grid", trials=4, out_dir=out, grid=GRID, train_fn=_no_training)
    # ... a changed setting is refused, naming the key
    with pytest.raises(ConfigError, match=r"different config \(config keys train.lr\)"):
        run_search(_cfg(cache, "train.lr=0.5"), sampler="grid", trials=4, out_dir=out, grid=GRID)
    # metakd report adds the search table and figure
    report = build_report([out], tmp_path / "report")
    text = report.read_text()
    assert "## Search studies and the metakd pipeline" in text and "search.png" in text
    assert (tmp_path / "report" / "search.png").is_file()


def _no_training(*args, **kwargs):
    raise AssertionError("a finished study trained again")


DRIVER = """
import json, pathlib, sys, time
import torch
torch.set_num_threads(1)
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd.runs.search import run_search
from metakd.training.trainer import Callback

a = json.loads(sys.argv[1])

class Slow(Callback):  # gives the test time to act while a trial trains
    def on_step(self, row):
        if a.get("barrier"):  # both workers in a trial at once (tests/test_search.py: _Barrier)
            b = pathlib.Path(a["barrier"])
            (b / f"worker-{a['worker']}").touch()
            deadline = time.time() + 120
            while len(list(b.glob("worker-*"))) < 2 and time.time() < deadline:
                time.sleep(0.01)
            a["barrier"] = None
        time.sleep(a["sleep"])

run_search(load_config(None, a["overrides"]), sampler=a["sampler"], trials=a["trials"],
           out_dir=a["out"], storage=a.get("storage"), worker=a.get("worker", 0),
           callbacks_factory=lambda cfg, run_dir: [Slow()])
"""


def _driver(tmp: Path, **args) -> list[str]:
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    return [sys.executable, str(script), json.dumps(args)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


class _Slow(Callback):
    """Sleeps at every logged step: gives a test time to act while a trial trains."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_step(self, row) -> None:
        time.sleep(self.sleep)


class _Barrier(_Slow):
    """At its first step, waits (≤ 120 s) until every one of ``n`` workers has reached a trial's first
    step (a file per worker in ``folder``), then sleeps per step like :class:`_Slow`."""

    def __init__(self, sleep: float, folder: Path, worker: int, n: int = 2) -> None:
        super().__init__(sleep)
        self.folder, self.worker, self.n, self.waited = folder, worker, n, False

    def on_step(self, row) -> None:
        if not self.waited:
            (self.folder / f"worker-{self.worker}").touch()
            deadline = time.time() + 120
            while len(list(self.folder.glob("worker-*"))) < self.n and time.time() < deadline:
                time.sleep(0.01)
            self.waited = True
        super().on_step(row)


def test_killed_study_resumes_in_a_fresh_process(cache, tmp_path):
    """A study killed (SIGKILL) mid-trial in one process is continued by another one (this one)."""
    out = tmp_path / "study"
    overrides = [*TINY, f"data.cache_dir={cache}", "train.log_every=1"]
    cmd = _driver(
        tmp_path, overrides=overrides, sampler="random", trials=3, out=str(out), sleep=0.02
    )
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    ckpts = out / "trials" / "trial-0001" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts.is_dir() and any(ckpts.glob("epoch-*.pt"))) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # trial 1 dies between two checkpoints
    proc.wait()
    study = optuna.load_study(study_name="study", storage=storage_for(None, out))
    assert [t.state.name for t in study.trials][:2] == ["COMPLETE", "RUNNING"]
    assert not (out / "trials/trial-0001/summary.json").exists()
    res = run_search(load_config(None, overrides), sampler="random", trials=3, out_dir=out)
    study = optuna.load_study(study_name="study", storage=storage_for(None, out))
    by_state: dict[str, list] = {}
    for t in study.trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert len(by_state["COMPLETE"]) == 3 and [t.number for t in by_state["FAIL"]] == [1]
    failed = by_state["FAIL"][0]
    rerun = [t for t in by_state["COMPLETE"] if t.params == failed.params]
    assert len(rerun) == 1 and rerun[0].user_attrs["run_dir"] == "trials/trial-0001"
    log = (out / "trials" / "trial-0001" / "run.log").read_text()
    assert "resumed" in log  # the interrupted run continued from its checkpoint
    s = _summary(out / "trials" / "trial-0001")
    assert s["status"] == "completed" and s["steps"] == 60
    assert len({json.dumps(t.params, sort_keys=True) for t in by_state["COMPLETE"]}) == 3
    assert [t["number"] for t in res["trials"]] == sorted(t.number for t in by_state["COMPLETE"])


def test_two_workers_share_one_journal_study(cache, tmp_path):
    """Two processes (a subprocess and this one) fill one journal-file study together. Each waits at
    its first trial's first step until the other is in a trial too (a file barrier), so both train
    trials whatever the scheduling: neither can take the whole study before the other starts."""
    out = tmp_path / "shared"
    journal = f"journal:{tmp_path / 'shared.journal'}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    overrides = [*TINY, f"data.cache_dir={cache}", "train.log_every=1"]
    cmd = _driver(tmp_path, overrides=overrides, sampler="random", trials=4, out=str(out),
                  storage=journal, worker=1, sleep=0.03, barrier=str(barrier))  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    mine = _Barrier(0.03, barrier, worker=0)
    run_search(load_config(None, overrides), sampler="random", trials=4, out_dir=out,
               storage=journal, worker=0,
               callbacks_factory=lambda c, d: [mine])  # fmt: skip
    _, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=storage_for(journal, out))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5  # MaxTrialsCallback counts running trials; a race may add one
    pids = {t.user_attrs["worker"]["pid"] for t in complete}
    assert pids == {proc.pid, os.getpid()}  # both workers trained trials (the barrier)
    dirs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(dirs)) == len(dirs)
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == len(complete)
    for d in dirs:
        assert _summary(out / d)["status"] == "completed"


def test_ledger_fixed_run_is_the_reference_of_a_hypergrad_run(tmp_path):
    """The prices against clocks read here, around the runs: a callback sleeps a known time per step
    (0.01 s in the plain run, 0.04 s in the hypergradient run) inside the runs' timed loops, and the
    test's own wall and CPU clocks enclose each run. So a plain step costs between 0.01 s and the
    plain run's enclosing time / 60, and the hypergradient run (30 steps) costs at least
    30 · 0.04 s and at most its enclosing time, in those plain steps."""
    cache = str(tmp_path / "cache")
    fixed_cfg = _cfg(cache, "meta.method=fixed", "meta.values.beta1=0.3", "meta.values.beta2=0.7",
                     "meta.values.temperature=2", "train.log_every=1")  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    fixed = train_run(fixed_cfg, tmp_path / "f", callbacks=[_Slow(0.01)])
    wall_f, cpu_f = time.perf_counter() - t0, time.process_time() - c0
    assert fixed["plain_runs"] == 1.0 and fixed["cost"]["reference"]["source"] == "self"
    assert (
        fixed["cpu_seconds"] > 0 and fixed["cpu_seconds"] == _summary(tmp_path / "f")["cpu_seconds"]
    )
    ref = ledger.lookup_reference(_cfg(cache, "train.log_every=1"))
    assert ref is not None and 0.01 <= ref["wall_per_step"] <= wall_f / 60
    assert 0 < ref["cpu_per_step"] <= cpu_f / 60
    t0, c0 = time.perf_counter(), time.process_time()
    hyper = train_run(_cfg(cache, "train.epochs=30", "train.log_every=1"), tmp_path / "h",
                      callbacks=[_Slow(0.04)])  # fmt: skip
    wall_h, cpu_h = time.perf_counter() - t0, time.process_time() - c0
    cost = hyper["cost"]
    assert cost["reference"]["source"] == "cache"
    # at least the 30 · 0.04 s slept, in plain steps of at most wall_f / 60 s (clocks of this test) ...
    assert cost["plain_runs"] * 30 >= 30 * 0.04 / (wall_f / 60)
    # ... and at most the time that enclosed the run
    assert cost["plain_runs"] * 30 * ref["wall_per_step"] <= wall_h
    assert 0 < cost["plain_runs_cpu"] * 30 * ref["cpu_per_step"] <= cpu_h
    # without any reference on record, a short fixed-λ calibration is timed and cached
    other = str(tmp_path / "cache2")
    cal = train_run(_cfg(other), tmp_path / "h2")
    assert cal["cost"]["reference"]["source"] == "calibration" and cal["plain_runs"] > 0
    assert ledger.lookup_reference(_cfg(other)) is not None


def test_cli_pipeline_costs_finder_plus_retrain_and_errors_exit_2(cache, tmp_path):
    runner = CliRunner()
    out = tmp_path / "pipe"
    args = ["search", *TINY, f"data.cache_dir={cache}", "--sampler", "hypergrad",
            "--finder-epochs", "20", "--retrain-seeds", "0,1", "--out", str(out), "-q"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    for row in results["runs"]:
        s = row["seed"]
        finder, retrain = _summary(out / f"finder/seed-{s}"), _summary(out / f"retrain/seed-{s}")
        assert finder["method"] == "hypergrad" and finder["steps"] == 20
        assert retrain["method"] == "fixed" and retrain["steps"] == 60
        assert retrain["meta"] == pytest.approx(
            finder["meta"], rel=1e-5
        )  # retrained at the found λ
        expect = (finder["wall_seconds"] + retrain["wall_seconds"]) / retrain["wall_seconds"]
        assert (
            row["cost"] == pytest.approx(expect)
            and row["test_accuracy"] == retrain["test_accuracy"]
        )
    mean = sum(r["test_accuracy"] for r in results["runs"]) / 2
    assert results["summary"]["test_accuracy_mean"] == pytest.approx(mean)
    assert "metakd pipeline" in res.output
    bad = runner.invoke(app, ["search", *TINY, "--sampler", "grid", "--grid", "temperature=1",
                              "--out", str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 2 and "missing ['beta1_share']" in bad.output
    assert "Traceback" not in bad.output
    zero = runner.invoke(app, ["search", *TINY, "--sampler", "hypergrad", "--retrain-seeds", "0",
                               "--out", str(tmp_path / "z")])  # fmt: skip
    assert zero.exit_code == 2 and "--retrain-seeds needs a count >= 1" in zero.output
    assert "for seed 0 alone write 0," in zero.output


def test_median_pruner_prunes_on_validation_and_counts_the_saving(cache, tmp_path):
    res = run_search(_cfg(cache, "train.eval_every=5", "train.epochs=40", "train.lr=0.05"), sampler="grid",
                     trials=5, out_dir=tmp_path / "pruned", pruner="median",
                     grid=["beta1_share=0.01,0.5,0.99", "temperature=0.2,8"])  # fmt: skip
    states = [t["state"] for t in res["trials"]]
    assert len(states) == 5 and states[:2] == ["COMPLETE", "COMPLETE"]  # the start-up trials run
    for t in res["trials"]:
        if t["state"] == "PRUNED":
            assert t["test_accuracy"] is None and t["cost"] < 1 and t["steps"] < 40
    pruned = [t for t in res["trials"] if t["state"] == "PRUNED"]
    assert pruned  # at lr 0.05 the extreme grid points fall below the median early
    assert res["cost"]["pruned"] == len(pruned)
    assert res["cost"]["pruning_saved"] == pytest.approx(sum(1 - t["cost"] for t in pruned))
    assert res["cost"]["plain_runs"] == pytest.approx(sum(t["cost"] for t in res["trials"]))
    assert math.isclose(res["cost"]["plain_runs"] + res["cost"]["pruning_saved"], 5, rel_tol=1e-9)


def _fake_train(calls: list):
    """A stand-in for train_run: a deterministic score of λ (no training), recording each call."""

    def train(cfg, run_dir, resume=False, callbacks=()):
        v = dict(cfg.meta.values) if cfg.meta.method == "fixed" else {"beta1": 0.3, "beta2": 0.7,
                                                                       "temperature": 2.0}  # fmt: skip
        calls.append((cfg.meta.method, cfg.seed, v))
        score = 0.5 + 0.1 * math.sin(7 * v["beta1"] + v["temperature"]) + 0.01 * cfg.seed
        return {"status": "completed", "steps": cfg.train.epochs, "wall_seconds": 2.0,
                "cpu_seconds": 2.0, "val_accuracy": score, "test_accuracy": score - 0.01,
                "meta": v, "method": cfg.meta.method}  # fmt: skip

    return train


def _commit(out: Path, to: Path) -> Path:
    """What a sitting commits of a study: its report, not its runs (the directory is deleted)."""
    import shutil

    to.mkdir(parents=True)
    for name in ("results.json", "search.json"):
        if (out / name).is_file():
            shutil.copyfile(out / name, to / name)
    shutil.rmtree(out)
    return to


def test_grid_study_continues_from_its_committed_report_alone(cache, tmp_path):
    cfg = _cfg(cache)
    whole = run_search(cfg, sampler="grid", trials=4, out_dir=tmp_path / "whole", grid=GRID,
                       retrain_seeds=[0, 1])  # fmt: skip
    # the retrain on the search's own seed is the best trial's run: an independent run agrees
    own = whole["retrain"][0]
    assert own["reused_trial"] and own["cost"] == 0.0 and whole["retrain"][1]["cost"] > 0
    assert not list((tmp_path / "whole" / "retrain").rglob("seed-0"))
    ref = train_run(
        _cfg(cache, "seed=0", "meta.method=fixed",
             *(f"meta.values.{k}={v!r}" for k, v in whole["best"]["values"].items())),
        tmp_path / "independent",
    )  # fmt: skip
    assert own["test_accuracy"] == ref["test_accuracy"]
    # a sitting runs half the grid and commits its report; the next continues from it alone
    run_search(cfg, sampler="grid", trials=2, out_dir=tmp_path / "part", grid=GRID)
    committed = _commit(tmp_path / "part", tmp_path / "committed")
    calls: list = []

    def counting(c, run_dir, **kw):
        calls.append(c.meta.values)
        return train_run(c, run_dir, **kw)

    cont = run_search(cfg, sampler="grid", trials=4, out_dir=tmp_path / "cont", grid=GRID,
                      retrain_seeds=[0, 1], import_results=committed, train_fn=counting)  # fmt: skip
    keys = ("number", "state", "params", "val_accuracy", "test_accuracy", "steps")
    assert [[t[k] for k in keys] for t in cont["trials"]] == [
        [t[k] for k in keys] for t in whole["trials"]
    ]  # the same study as the uninterrupted one, the same best and retrains
    assert cont["best"]["params"] == whole["best"]["params"]
    assert [r["test_accuracy"] for r in cont["retrain"]] == [
        r["test_accuracy"] for r in whole["retrain"]
    ]
    assert len(calls) == 3  # the two trials not in the report, and the retrain on seed 1
    # importing again into the continued study adds nothing; a report of another kind is refused
    run_search(cfg, sampler="grid", trials=4, out_dir=tmp_path / "cont", grid=GRID,
               import_results=committed, train_fn=_no_training)  # fmt: skip
    with pytest.raises(ConfigError, match="different sampler, grid"):
        run_search(cfg, sampler="random", trials=4, out_dir=tmp_path / "other",
                   import_results=committed / "results.json")  # fmt: skip
    with pytest.raises(ConfigError, match="does not exist"):
        run_search(cfg, sampler="grid", trials=4, out_dir=tmp_path / "x", grid=GRID,
                   import_results=tmp_path / "nowhere")  # fmt: skip


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_continue_a_report_with_new_points(cache, tmp_path, sampler):
    cfg = _cfg(cache)
    calls: list = []
    first = run_search(cfg, sampler=sampler, trials=3, out_dir=tmp_path / "a",
                       train_fn=_fake_train(calls))  # fmt: skip
    committed = _commit(tmp_path / "a", tmp_path / "committed")
    calls.clear()
    cont = run_search(cfg, sampler=sampler, trials=6, out_dir=tmp_path / "b",
                      import_results=committed, train_fn=_fake_train(calls))  # fmt: skip
    assert len(calls) == 3  # only the new trials train
    assert [t["params"] for t in cont["trials"][:3]] == [t["params"] for t in first["trials"]]
    assert [t["cost"] for t in cont["trials"][:3]] == [t["cost"] for t in first["trials"]]
    points = [tuple(t["params"].values()) for t in cont["trials"]]
    assert len(set(points)) == 6  # the sampler does not redraw the report's points
    # a settings change against the committed search.json is refused
    with pytest.raises(ConfigError, match="different config"):
        run_search(_cfg(cache, "train.lr=0.5"), sampler=sampler, trials=6,
                   out_dir=tmp_path / "c", import_results=committed)  # fmt: skip


def test_pipeline_continues_from_its_committed_report(cache, tmp_path):
    from metakd.runs.pipeline import run_pipeline

    cfg = _cfg(cache)
    calls: list = []
    first = run_pipeline(cfg, out_dir=tmp_path / "p", seeds=[0, 1], finder_epochs=20,
                         train_fn=_fake_train(calls))  # fmt: skip
    assert json.loads((tmp_path / "p" / "results.json").read_text())["seeds"] == [0, 1]
    # a second process on other seeds of the same directory adds its rows to the same report
    side = run_pipeline(cfg, out_dir=tmp_path / "p", seeds=[3], finder_epochs=20,
                        train_fn=_fake_train(calls))  # fmt: skip
    assert side["seeds"] == [0, 1, 3] and side["runs"][:2] == first["runs"]
    assert json.loads((tmp_path / "p" / "results.json").read_text())["seeds"] == [0, 1, 3]
    committed = _commit(tmp_path / "p", tmp_path / "committed")
    calls.clear()
    cont = run_pipeline(cfg, out_dir=tmp_path / "q", seeds=[0, 1, 2], finder_epochs=20,
                        train_fn=_fake_train(calls), import_results=committed)  # fmt: skip
    assert [c[:2] for c in calls] == [("hypergrad", 2), ("fixed", 2)]  # seed 2 only
    assert cont["seeds"] == [0, 1, 2, 3]  # seed 3: the report's, not asked for, still listed
    assert cont["runs"][:2] == [{**r, "imported_from": str(committed / "results.json")}
                                for r in first["runs"]]  # fmt: skip
    with pytest.raises(ConfigError, match="finder_epochs=20, this command 30"):
        run_pipeline(cfg, out_dir=tmp_path / "r", seeds=[0], finder_epochs=30,
                     train_fn=_fake_train(calls), import_results=committed)  # fmt: skip
    with pytest.raises(ConfigError, match=r"config keys train.lr"):
        run_pipeline(_cfg(cache, "train.lr=0.5"), out_dir=tmp_path / "s", seeds=[0],
                     finder_epochs=20, train_fn=_fake_train(calls), import_results=committed)  # fmt: skip
    with pytest.raises(ConfigError, match="of kind 'pipeline'"):
        run_search(cfg, sampler="grid", trials=4, out_dir=tmp_path / "t", grid=GRID,
                   import_results=committed)  # fmt: skip


def test_pipeline_retrains_at_a_per_class_lambda(cache, tmp_path):
    from metakd.runs.pipeline import run_pipeline

    cfg = _cfg(cache, "meta.params.temperature.shape=[2]", "meta.optimizer=adam", "meta.lr=0.05")
    res = run_pipeline(cfg, out_dir=tmp_path / "p", seeds=[0], finder_epochs=20)
    found = _summary(tmp_path / "p" / "finder" / "seed-0")["meta"]["temperature"]
    assert isinstance(found, list) and len(found) == 2 and found[0] != found[1]  # moved apart
    retrain = _summary(tmp_path / "p" / "retrain" / "seed-0")
    assert retrain["method"] == "fixed" and retrain["meta"]["temperature"] == pytest.approx(found)
    values = res["runs"][0]["values"]
    ref = train_run(
        _cfg(cache, "meta.params.temperature.shape=[2]", "meta.method=fixed",
             *(f"meta.values.{k}={v!r}" for k, v in values.items())),
        tmp_path / "independent",
    )  # fmt: skip
    assert res["runs"][0]["test_accuracy"] == ref["test_accuracy"]
    with pytest.raises(
        ValueError,
        match=r"values.temperature has 3 entries, but params.temperature is shape \[2\]",
    ):
        _cfg(cache, "meta.params.temperature.shape=[2]", "meta.values.temperature=[1,2,3]")
    with pytest.raises(ValueError, match="is a scalar: give one number"):
        _cfg(cache, "meta.values.temperature=[1,2]")
    with pytest.raises(ValueError, match="must be > 0"):
        _cfg(cache, "meta.params.temperature.shape=[2]", "meta.values.temperature=[1,-2]")


def test_a_study_continued_with_another_teacher_file_is_refused(cache, tmp_path):
    from metakd.runs.search import _check_settings

    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"the first teacher")
    cfg = _cfg(cache, f"teacher.checkpoint={teacher}")
    sp = SearchSpace.from_config(cfg, "share")
    out = tmp_path / "study"
    out.mkdir()
    _check_settings(out, cfg, "random", sp, None, "none")
    _check_settings(out, cfg, "random", sp, None, "none")  # the same file: continues
    import shutil

    elsewhere = tmp_path / "other-checkout" / "teacher.pt"  # the same file at another path
    elsewhere.parent.mkdir()
    shutil.copyfile(teacher, elsewhere)
    _check_settings(out, _cfg(cache, f"teacher.checkpoint={elsewhere}"), "random", sp, None, "none")
    teacher.write_bytes(b"a teacher retrained in another sitting")
    with pytest.raises(ConfigError, match="different teacher_sha256"):
        _check_settings(out, cfg, "random", sp, None, "none")
    settings = json.loads((out / "search.json").read_text())
    del settings["teacher_sha256"]  # a study recorded before the digest was: not compared
    (out / "search.json").write_text(json.dumps(settings))
    _check_settings(out, cfg, "random", sp, None, "none")
