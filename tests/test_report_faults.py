"""Reports on damaged or mixed run directories (issue 23, items 5 and 14): every unreadable run is
named with its file and skipped with one line; report files get ordinary permissions; runs on
different data are not pooled silently; the commands section shows how each run was made."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from test_report import write_run
from typer.testing import CliRunner

from metakd.reporting.report import load_run
from metakd_cli.main import app

runner = CliRunner()

# (file, bytes written over it, what the message says)
DAMAGE = {
    "bad-yaml": ("config.yaml", b"seed: [1\n", "not valid YAML"),
    "list-config": ("config.yaml", b"- 1\n- 2\n", "holds a list"),
    "bytes-config": ("config.yaml", b"seed: 1\n\xff\xfe\n", "not UTF-8"),
    "list-summary": ("summary.json", b"[1, 2]\n", "holds a JSON list"),
    "bytes-summary": ("summary.json", b'{"seed": "\xff"}\n', "not UTF-8"),
    "bytes-metrics": ("metrics.jsonl", b'{"step": 0}\n{"step": \xff}\n{"step": 2}\n', "not UTF-8"),
}


def _damage(run: Path, kind: str) -> Path:
    name, data, _ = DAMAGE[kind]
    (run / name).write_bytes(data)
    return run / name


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_load_run_names_the_damaged_file_and_the_fix(tmp_path, kind):
    run = tmp_path / "r"
    write_run(run, method="hypergrad", seed=0, steps=40)
    path = _damage(run, kind)
    with pytest.raises(ValueError) as info:
        load_run(run)
    text = str(info.value)
    assert str(path) in text and DAMAGE[kind][2] in text, text
    assert any(fix in text for fix in ("delete", "restore", "repair")), text


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict:
    """An experiment directory with two good runs and one run per kind of damage."""
    root = tmp_path_factory.mktemp("damaged")
    for seed in (0, 1):
        write_run(root / "hypergrad" / f"seed-{seed}", method="hypergrad", seed=seed, steps=40)
    bad = {}
    for i, kind in enumerate(sorted(DAMAGE)):
        run = root / "baseline" / f"seed-{i}"
        write_run(run, method="baseline", seed=i, steps=40)
        bad[kind] = _damage(run, kind)
    return {"root": root, "bad": bad}


def test_report_skips_each_unreadable_run_with_one_line(damaged, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(damaged["root"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    flat = " ".join(result.stderr.split())  # one warning per skipped run, whatever the wrapping
    assert flat.count("skipped the unreadable run") == len(DAMAGE), result.stderr
    text = (out / "report.md").read_text()
    assert f"Skipped {len(DAMAGE)} unreadable run(s)" in text
    for kind, path in damaged["bad"].items():
        assert path.name in text and DAMAGE[kind][2] in text, kind
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("hypergrad", "0"),
        ("hypergrad", "1"),
    ]


def test_report_of_only_unreadable_runs_is_a_user_error(damaged, tmp_path):
    runs = [str(p.parent) for p in damaged["bad"].values()]
    result = runner.invoke(app, ["report", *runs, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "nothing to report" in result.stderr
    for path in damaged["bad"].values():
        assert str(path) in result.stderr


# --------------------------------------------------------------------------- item 14


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """A synthetic and a CIFAR-10 run, reported together under umask 027."""
    root = tmp_path_factory.mktemp("mixed")
    write_run(root / "syn", method="hypergrad", seed=0, steps=40)
    write_run(root / "cifar", method="hypergrad", seed=0, steps=40, name="cifar10")
    cfg = yaml.safe_load((root / "cifar" / "config.yaml").read_text())
    cfg["data"]["name"] = "cifar10"
    (root / "cifar" / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = json.loads((root / "syn" / "summary.json").read_text())
    summary["command"] = "metakd train --resume runs/syn"
    summary["commands"] = [
        "metakd train configs/synthetic.yaml meta.unroll=5 --seed 0 --out runs/syn",
        "metakd train --resume runs/syn",
    ]
    (root / "syn" / "summary.json").write_text(json.dumps(summary))
    out = root / "report"
    old = os.umask(0o027)
    try:
        result = runner.invoke(
            app, ["report", str(root / "syn"), str(root / "cifar"), "-o", str(out)]
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "result": result}


def test_report_files_respect_the_umask_like_the_figures(mixed):
    out = mixed["out"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    for name in ("report.md", "results.csv", "runs.csv", "accuracy.png"):
        assert modes[name] == 0o640, (name, oct(modes[name]))


def test_a_report_mixing_data_sets_warns_and_splits_the_results(mixed):
    flat = " ".join(mixed["result"].stderr.split())
    assert "mixes runs on different data" in flat and "synthetic: 1 runs" in flat, flat
    text = (mixed["out"] / "report.md").read_text()
    assert "Warning: these runs were trained on different data" in text
    assert "### Data: synthetic" in text and "### Data: cifar10" in text
    with (mixed["out"] / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["data"], r["method"], r["n"]) for r in rows) == [
        ("cifar10", "hypergrad", "1"), ("synthetic", "hypergrad", "1"),
    ]  # fmt: skip


def test_report_commands_show_the_original_command_then_each_resume(mixed):
    text = (mixed["out"] / "report.md").read_text()
    commands = text.split("## Commands", 1)[1]
    original = "metakd train configs/synthetic.yaml meta.unroll=5 --seed 0 --out runs/syn"
    assert original in commands
    assert commands.index(original) < commands.index("# then: metakd train --resume runs/syn")
    # a run with no recorded command gets the command that reproduces it from its resolved config
    assert "metakd train ../cifar/config.yaml" in commands
