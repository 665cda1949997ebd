"""What a reader of `metakd report` trips over (issue 34, item 12): curves of one evaluation drawn
invisibly, legends over the lines, panels without data, a search figure without a title and with a
tiny legend, and runs of one seed counted as seeds. Figures are inspected as matplotlib objects."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from test_report import write_run

from metakd.reporting.report import aggregate, build_report, load_runs, make_figures
from metakd.reporting.search_tables import search_figure
from metakd.reporting.tables import results_markdown

NO_MARKER = ("None", "none", "", " ", None)


def _fixed(root: Path, n: int, *, seed: int | None = None, **kw) -> None:
    """``n`` fixed-λ runs at evenly spread λ (seed ``i``, or all ``seed``)."""
    for i, b in enumerate(np.linspace(0.05, 0.95, n)):
        values = {"beta1": float(b), "beta2": float(1 - b), "temperature": 1.0 + 8 * float(b)}
        s = i if seed is None else seed
        write_run(root / f"fixed-{i}", method="fixed", seed=s, values=values, **kw)


def test_curves_of_one_evaluation_are_drawn_as_marked_points(tmp_path: Path) -> None:
    # a study's trials: 30 steps, evaluated once (eval_every past the end), 3 runs
    _fixed(tmp_path, 3, steps=30, eval_every=500)
    fig = make_figures(load_runs([tmp_path]))["accuracy"]
    for ax in fig.axes:
        single = [ln for ln in ax.lines if len(ln.get_xdata()) == 1]
        assert single, ax.get_title()  # the one point is there ...
        assert all(ln.get_marker() not in NO_MARKER for ln in single), ax.get_title()  # ... visible
        assert ax.collections, "the spread of 3 runs at that point (an error bar)"
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert labels == ["fixed (n=3)"]


def test_curves_of_few_evaluations_have_markers(tmp_path: Path) -> None:
    for s in (0, 1):
        write_run(tmp_path / f"h{s}", method="hypergrad", seed=s, steps=100, eval_every=20)
    ax = make_figures(load_runs([tmp_path]))["accuracy"].axes[1]
    (mean,) = [ln for ln in ax.lines if ln.get_label() == "hypergrad (n=2)"]
    assert len(mean.get_xdata()) == 5 and mean.get_marker() not in NO_MARKER


def _legends(fig):
    return [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]


def _line_points(ax, line, per_segment: int = 25) -> np.ndarray:
    """Display coordinates along ``line`` (densely between its points), inside ``ax``."""
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size > 1:
        t = np.linspace(0, 1, per_segment)
        x = np.concatenate([a + (b - a) * t for a, b in itertools.pairwise(x)])
        y = np.concatenate([a + (b - a) * t for a, b in itertools.pairwise(y)])
    pts = line.get_transform().transform(np.column_stack([x, y]))
    box = ax.get_window_extent()
    inside = (pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1)
    return pts[inside & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1)]


def test_metaparams_legend_does_not_cover_the_lines(tmp_path: Path) -> None:
    # λ trajectories spread over the whole axis: no corner inside the axes is free
    _fixed(tmp_path, 12)
    for s in (0, 1):
        write_run(tmp_path / f"h{s}", method="hypergrad", seed=s)
    fig = make_figures(load_runs([tmp_path]))["metaparams"]
    fig.draw_without_rendering()
    legends = _legends(fig)
    assert legends
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            for line in ax.lines:
                pts = _line_points(ax, line)
                covered = (
                    (pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1)
                    & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1)
                )  # fmt: skip
                assert not covered.any(), (ax.get_title(), line.get_label())


def test_metaparams_of_constant_runs_have_no_mean_and_plain_ticks(tmp_path: Path) -> None:
    _fixed(tmp_path, 3)
    fig = make_figures(load_runs([tmp_path]))["metaparams"]
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # one per run: no bold mean of three different λ
    assert not ax.yaxis.get_major_formatter().get_useOffset()  # no "1e-5 + 6.5e-1"
    assert "one line per run" in ax.get_title()


def test_cost_has_no_hypergradient_panel_without_hypergradient_steps(tmp_path: Path) -> None:
    _fixed(tmp_path / "fixed", 3)
    fig = make_figures(load_runs([tmp_path / "fixed"]))["cost"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["wall time (s)"]
    write_run(tmp_path / "hyper" / "h0", method="hypergrad", seed=0)
    fig = make_figures(load_runs([tmp_path]))["cost"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["wall time (s)", "hypergradient steps"]


def _study() -> dict:
    trials = [{"cum_cost": float(i + 1), "best_so_far_test": 0.6 + 0.01 * i} for i in range(4)]
    return {
        "kind": "search", "sampler": "grid", "trials": trials, "cost": {"plain_runs": 4.0},
        "retrain_summary": {"seeds": [1, 2], "test_accuracy_mean": 0.6, "test_accuracy_std": 0.02},
    }  # fmt: skip


def test_search_figure_has_a_title_and_a_readable_legend() -> None:
    fig = search_figure([_study()])
    (ax,) = fig.axes
    assert "compute" in ax.get_title() and "search" in ax.get_title()
    legends = _legends(fig)
    assert legends
    sizes = [t.get_fontsize() for leg in legends for t in leg.get_texts()]
    assert sizes and min(sizes) >= 8.5, sizes


def test_report_counts_runs_of_one_seed_as_runs(tmp_path: Path) -> None:
    _fixed(tmp_path, 2, seed=0)  # two trials of a study: one seed, two λ
    text = build_report([tmp_path], tmp_path / "report").read_text()
    assert "| fixed | 2 runs of 1 seed |" in text
    assert "fixed: 2 runs of 1 seed" in text
    assert "(ddof=1) over runs" in text and "(ddof=1) over seeds" not in text


def test_runs_of_distinct_seeds_keep_their_count() -> None:
    rows = aggregate(
        [{"method": "hypergrad", "seed": s, "test_accuracy": a} for s, a in ((0, 0.5), (1, 0.7))]
        + [{"method": "fixed", "seed": 0, "test_accuracy": a} for a in (0.4, 0.6, 0.5)]
    )
    md = results_markdown(rows)
    assert "| hypergrad | 2 | 0.6000 ± 0.1414 |" in md
    assert "| fixed | 3 runs of 1 seed | 0.5000 ± 0.1000 |" in md
    assert "not a spread over seeds" in md


def test_a_metaparameter_of_different_shapes_across_runs_is_not_averaged() -> None:
    """Two network sizes under one method (objective_kwargs.example_weight adds an output): their
    [2, 2] and [2, 3] weights have no mean; the scalar T still does."""
    rows = aggregate(
        [
            {"method": "hypergrad", "seed": 0, "meta": {"w": [[1.0, 2.0], [3.0, 4.0]], "temperature": 2.0}},
            {"method": "hypergrad", "seed": 1, "meta": {"w": [[1.0, 2.0, 0.5], [3.0, 4.0, 0.5]], "temperature": 4.0}},
        ]
    )  # fmt: skip
    assert rows[0]["meta_mean"] == {"w": None, "temperature": 3.0}
    assert rows[0]["meta_std"]["w"] is None
    assert "hypergrad | 2 |" in results_markdown(rows)


@pytest.mark.parametrize("n", [1, 2])
def test_report_says_run_or_runs(tmp_path: Path, n: int) -> None:
    for s in range(n):
        write_run(tmp_path / f"h{s}", method="hypergrad", seed=s, steps=40)
    text = build_report([tmp_path], tmp_path / "report").read_text()
    assert text.splitlines()[2].startswith("1 run (" if n == 1 else "2 runs (")
