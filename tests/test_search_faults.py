"""`metakd search` when things break (issue 34, items 3, 4 and 7): a worker that dies mid-trial
while another one runs, a journal file whose last line a kill cut, and storage, driver, config and
interrupt failures, each one ``Error:`` line (exit code 2) naming the cause and the fix, never a
traceback. Trials are a stand-in for ``train_run`` (a deterministic score of λ): no training."""

from __future__ import annotations

import json
import logging
import math
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from typer.testing import CliRunner

from metakd.runs.config import load_config
from metakd.runs.search import SearchSpace, parse_grid, run_search, storage_for
from metakd.runs.study import make_sampler
from metakd_cli.main import app

TINY = ["device=cpu", "train.epochs=20", "train.eval_every=10", "wandb.mode=disabled"]
GRID = ["beta1_share=0.1,0.5", "temperature=1,4"]


def _fake_train(calls: list, hook=None):
    """A stand-in for train_run: a deterministic score of λ; ``hook(call_number)`` runs first."""

    def train(cfg, run_dir, resume=False, callbacks=()):
        if hook is not None:
            hook(len(calls))
        v = dict(cfg.meta.values)
        calls.append(v)
        score = 0.5 + 0.1 * math.sin(7 * v["beta1"] + v["temperature"])
        return {"status": "completed", "steps": cfg.train.epochs, "wall_seconds": 1.0,
                "cpu_seconds": 1.0, "val_accuracy": score, "test_accuracy": score,
                "meta": v, "method": "fixed"}  # fmt: skip

    return train


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _other_worker_trial(out: Path, sampler: str, host: str, pid: int, storage: str | None = None):
    """What another worker leaves when it dies mid-trial: a RUNNING trial with its point drawn by
    its own sampler and its worker's host and pid."""
    cfg = load_config(None, TINY)
    sp = SearchSpace.from_config(cfg, "share")
    grid = parse_grid(GRID, sp) if sampler == "grid" else None
    seed = 0 if sampler == "grid" else 99  # grid workers share the seed (its trial → point map)
    out.mkdir(parents=True, exist_ok=True)
    store = storage_for(storage, out)
    study = optuna.create_study(study_name=out.name, storage=store, direction="maximize",
                                load_if_exists=True,
                                sampler=make_sampler(sampler, grid, seed, 4))  # fmt: skip
    trial = study.ask()
    trial.set_user_attr("worker", {"host": host, "pid": pid})
    values = sp.values(sp.suggest(trial))
    trial.set_user_attr("run_dir", f"trials/trial-{trial.number:04d}")
    trial.set_user_attr("values", values)
    return trial.number, dict(trial.params)


def _states(out: Path, storage: str | None = None) -> dict[str, list]:
    study = optuna.load_study(study_name=out.name, storage=storage_for(storage, out))
    by: dict[str, list] = {}
    for t in study.trials:
        by.setdefault(t.state.name, []).append(t)
    return by


# ------------------------------------------------------------------ item 3: a dead worker


@pytest.mark.parametrize("sampler", ["random", "grid"])
def test_a_worker_that_dies_mid_study_has_its_trial_rerun_by_the_survivor(tmp_path, sampler):
    """The other worker dies (its pid is dead) while this one runs: this one's loop would stop with
    3 of 4 trials (MaxTrialsCallback counts the dead RUNNING trial); it reruns that point instead."""
    out = tmp_path / "study"
    dead: dict = {}

    def die_during_first_trial(n: int) -> None:
        if n == 0:
            dead["number"], dead["params"] = _other_worker_trial(
                out, sampler, platform.node(), _dead_pid()
            )

    calls: list = []
    res = run_search(load_config(None, TINY), sampler=sampler, trials=4, out_dir=out,
                     grid=GRID if sampler == "grid" else (),
                     train_fn=_fake_train(calls, die_during_first_trial))  # fmt: skip
    by = _states(out)
    assert len(by.get("COMPLETE", [])) == 4 and "RUNNING" not in by
    assert [t.number for t in by["FAIL"]] == [dead["number"]]
    assert [t.params for t in by["COMPLETE"]].count(dead["params"]) == 1  # its point, rerun
    assert len(res["trials"]) == 4 and "missing" not in res
    assert "missing" not in (out / "results.md").read_text()


def test_a_dead_worker_on_another_host_is_reported_with_the_command_to_finish(
    tmp_path, monkeypatch
):
    out = tmp_path / "study"
    _other_worker_trial(out, "random", "elsewhere.example", 4242)
    monkeypatch.setattr("metakd.runs.run.train_run", _fake_train([]))
    res = CliRunner().invoke(app, ["search", *TINY, "--sampler", "random", "--trials", "3",
                                   "--out", str(out), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["missing"]["trials"] == 1 and results["cost"]["trials"] == 2
    md = (out / "results.md").read_text()
    for text in (md, res.output):
        assert "1 of 3 trials missing" in text and "elsewhere.example" in text
        assert "metakd search" in text and f"--out {out}" in text


# ------------------------------------------------------------------ item 4: a torn journal


def _errors(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_a_torn_journal_is_refused_naming_the_offset_and_repaired_with_a_backup(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("metakd.runs.run.train_run", _fake_train([]))
    out, journal = tmp_path / "study", tmp_path / "db" / "s.journal"
    journal.parent.mkdir()
    args = ["search", *TINY, "--sampler", "random", "--out", str(out), "-q",
            "--storage", f"journal:{journal}"]  # fmt: skip
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--trials", "2"]).exit_code == 0
    whole = journal.read_bytes()
    last = whole.rstrip(b"\n").rfind(b"\n") + 1
    offset = len(whole)
    torn = whole + whole[last : last + 25]  # a kill cut the next write
    journal.write_bytes(torn)
    res = runner.invoke(app, [*args, "--trials", "3"])
    assert res.exit_code == 2, res.output
    (line,) = _errors(res.output)
    assert str(journal) in line and f"byte {offset}" in line and "--repair-journal" in line
    assert journal.read_bytes() == torn  # nothing appended onto the torn line
    res = runner.invoke(app, [*args, "--trials", "3", "--repair-journal"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "db" / "s.journal.bak").read_bytes() == torn
    assert len(_states(out, f"journal:{journal}")["COMPLETE"]) == 3
    # a line corrupted in the middle: one line naming the journal file, not Optuna's traceback
    lines = journal.read_bytes().split(b"\n")
    lines[2] = lines[2][:10] + b"#" + lines[2][11:]
    journal.write_bytes(b"\n".join(lines))
    res = runner.invoke(app, [*args, "--trials", "4"])
    assert res.exit_code == 2, res.output
    (line,) = _errors(res.output)
    assert f"the journal file {journal} is corrupt" in line


# ------------------------------------------------------------------ item 7: one line each


class _OptunaLog(logging.Handler):
    """Records of Optuna's trial loop (it logs a failed trial with its traceback)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def optuna_log():
    handler = _OptunaLog()
    logger = logging.getLogger("optuna.study._optimize")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _one_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    (line,) = _errors(res.output)
    for needle in needles:
        assert needle in line, line
    return line


def _search(out: Path, *extra: str):
    return CliRunner().invoke(app, ["search", *TINY, "--sampler", "random", "--trials", "2",
                                    "--out", str(out), "-q", *extra])  # fmt: skip


def test_a_corrupt_study_db_is_one_line(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.db").write_bytes(b"\x13garbage, not SQLite" * 500)
    _one_error(
        _search(out), f"{out / 'study.db'}", "is damaged (file is not a database)", "move it"
    )


def test_sqlite_disk_full_is_one_line_without_optunas_trial_log(tmp_path, monkeypatch, optuna_log):
    monkeypatch.setattr("metakd.runs.run.train_run", _fake_train([]))
    full = sqlalchemy.exc.OperationalError(
        "UPDATE trial_user_attributes", {}, sqlite3.OperationalError("database or disk is full")
    )

    def no_space(self, *args, **kwargs):
        raise full

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_user_attr", no_space)
    out = tmp_path / "study"
    _one_error(_search(out), "disk is full", str(out / "study.db"), "free some space")
    assert optuna_log.records == [], [r.getMessage() for r in optuna_log.records]


def test_a_database_server_url_without_its_driver_fails_fast_writing_nothing(tmp_path):
    out = tmp_path / "study"
    res = _search(out, "--storage", "postgresql://u:p@127.0.0.1:1/db")
    line = _one_error(res, "postgresql://u:***@127.0.0.1:1/db", "pip install")
    assert ":p@" not in line  # the password is not printed
    assert not (out / "search.json").exists() and not out.exists()
    _one_error(_search(out, "--storage", f"sqlite:///{tmp_path}/no/such/dir/s.db"),
               "cannot open", "--storage")  # fmt: skip


def test_a_learning_rate_that_overflows_is_one_line_and_not_retried(tmp_path, optuna_log):
    """train.lr=1e38 overflows inside Adam's step (lr / (1 - beta1) past float32's range)."""
    out = tmp_path / "s"
    args = ("teacher.epochs=5", "train.epochs=3", "train.lr=1e38")
    _one_error(_search(out, *args), "without overflow", "train.lr (now 1e+38)", "lower train.lr")
    assert optuna_log.records == []
    first = _states(out)["FAIL"][0]
    assert "overflow" in first.user_attrs["error"]
    _one_error(_search(out, *args), "without overflow")  # a rerun: another point
    failed = _states(out)["FAIL"]
    assert len(failed) == 2 and failed[1].params != first.params


@pytest.mark.parametrize("raised", [FloatingPointError, KeyboardInterrupt])
def test_a_failed_or_interrupted_trial_is_not_logged_by_optuna(
    tmp_path, monkeypatch, optuna_log, raised
):
    def fail(n: int) -> None:
        raise raised("loss became NaN at step 3; lower train.lr")

    monkeypatch.setattr("metakd.runs.run.train_run", _fake_train([], fail))
    res = _search(tmp_path / "s")
    assert optuna_log.records == [], [r.getMessage() for r in optuna_log.records]
    if raised is KeyboardInterrupt:
        assert res.exit_code == 130 and "Interrupted." in res.output
        assert "Traceback" not in res.output
    else:
        _one_error(res, "loss became NaN")
    # a rerun does not retry the crashed point: its trial is failed with its error
    by = _states(tmp_path / "s")
    if raised is FloatingPointError:
        assert "error" in by["FAIL"][0].user_attrs


def test_a_journal_in_a_missing_directory_is_refused_talking_about_storage(tmp_path, monkeypatch):
    out = tmp_path / "study"
    missing = tmp_path / "no" / "dir" / "x.journal"
    _one_error(_search(out, "--storage", f"journal:{missing}"),
               f"the directory {missing.parent} does not exist", "create it", "--storage")  # fmt: skip
    assert not missing.parent.exists() and not out.exists()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    line = _one_error(_search(out, "--storage", f"journal:{afile}/x.journal"), "--storage")
    assert "--out" not in line
    # a journal inside the study directory is made with it (the documented two-worker example)
    monkeypatch.setattr("metakd.runs.run.train_run", _fake_train([]))
    res = _search(tmp_path / "s2", "--storage", f"journal:{tmp_path}/s2/study.journal")
    assert res.exit_code == 0, res.output


def _open_at_once(args) -> str:
    """A worker process: wait at the barrier, then open the (new) study storage; 'ok' or the error."""
    barrier, study_dir = args
    barrier.wait()
    try:
        storage_for(None, Path(study_dir))
    except Exception as exc:  # the test reports what failed
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_workers_opening_a_new_sqlite_study_at_once_all_get_it(tmp_path):
    """Two `metakd search --worker` processes started together on a fresh OUT both create Optuna's
    tables; the slower one used to stop with 'table study_directions already exists'."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for attempt in range(2):  # fresh studies: the race is on table creation
        study_dir = tmp_path / f"study-{attempt}"
        with ctx.Manager() as manager:
            barrier = manager.Barrier(4)
            with ctx.Pool(4) as pool:
                results = pool.map(_open_at_once, [(barrier, str(study_dir))] * 4)
        assert results == ["ok"] * 4, results


def test_the_table_creation_race_is_retried_and_other_errors_are_not(tmp_path, monkeypatch):
    real = optuna.storages.RDBStorage
    calls: list[str] = []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:  # what the loser of the race gets from SQLite
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE", {}, Exception("table x already exists")
            )
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    assert storage_for(None, tmp_path / "a") is not None and len(calls) == 2

    def locked(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", locked)
    calls.clear()
    with pytest.raises(Exception, match="database is locked"):
        storage_for(None, tmp_path / "b")
    assert len(calls) == 1  # not retried


_RECOVER_WORKER = """
import sys, time
from pathlib import Path
import optuna
from metakd.runs.study import recover
from metakd.runs.study_storage import storage_for
out = Path(sys.argv[1])
store = storage_for(None, out)
study = optuna.load_study(study_name="s", storage=store)
while not (out / "go").exists():  # both workers are loaded: start together
    time.sleep(0.001)
recover(study, store, "grid", out / "recover.lock")
"""


def test_an_interrupted_point_is_enqueued_once_by_repeated_or_simultaneous_recovery(tmp_path):
    """A failed trial without an error (interrupted) has its point enqueued once: a WAITING trial's point
    (its fixed_params; its params stay empty until it runs) counts as held, and two workers recovering
    at the same moment take turns under the lock (the noise study's grid once ran two points twice)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from metakd.runs.study import recover

    def interrupted_study(out: Path) -> optuna.Study:
        store = storage_for(None, out)
        study = optuna.create_study(study_name="s", storage=store)
        dist = {"beta1_share": FloatDistribution(0.01, 0.5), "temperature": FloatDistribution(1, 4)}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, distributions=dist,
                                     params={"beta1_share": 0.5, "temperature": 1.0}))  # fmt: skip
        for point in (
            {"beta1_share": 0.1, "temperature": 4.0},
            {"beta1_share": 0.01, "temperature": 4.0},
        ):
            study.add_trial(create_trial(state=TrialState.FAIL, params=point, distributions=dist))
        return study

    def waiting(out: Path) -> list[dict]:
        study = optuna.load_study(study_name="s", storage=storage_for(None, out))
        return sorted((t.system_attrs["fixed_params"] for t in study.get_trials(states=(TrialState.WAITING,))),
                      key=lambda p: p["beta1_share"])  # fmt: skip

    want = [{"beta1_share": 0.01, "temperature": 4.0}, {"beta1_share": 0.1, "temperature": 4.0}]
    one = tmp_path / "one"
    one.mkdir()
    study = interrupted_study(one)
    for _ in range(2):  # e.g. a worker's start, then its loop's end before the points ran
        recover(study, storage_for(None, one), "grid")
    assert waiting(one) == want

    two = tmp_path / "two"
    two.mkdir()
    interrupted_study(two)
    procs = [subprocess.Popen([sys.executable, "-c", _RECOVER_WORKER, str(two)]) for _ in range(2)]
    (two / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert waiting(two) == want
