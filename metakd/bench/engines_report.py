"""The engine bench's report: its results as Markdown tables (:func:`to_markdown`, printed by
:func:`_print_table`) and the time/memory-vs-η plot (:func:`_plot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metakd.bench.common import _fmt

__all__ = ["_plot", "_print_table", "to_markdown"]


def to_markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables: time/memory per engine and η, then the ratios."""
    cfg, env = result["config"], result["env"]
    etas = cfg["etas"]
    lines = [
        f"model `{cfg['model']}` ({cfg['num_params']} parameters), batch {cfg['batch_size']}, "
        f"device `{cfg['device']}`"
        + (f" ({env['gpu']})" if "gpu" in env else f" ({env['cpu']}, {env['cpu_count']} cores)")
        + f", {cfg['threads']} torch thread(s), torch {env['torch']}, higher {env['higher']}, "
        f"torchopt {env['torchopt']}, median of {cfg['repeats']}",
        "",
        "Wall seconds per hypergradient (CPU seconds in parentheses); peak memory in MiB:",
        "",
        "| engine | " + " | ".join(f"η={e} time" for e in etas) + " | "
        + " | ".join(f"η={e} MiB" for e in etas) + " |",
        "|---" * (1 + 2 * len(etas)) + "|",
    ]  # fmt: skip
    by = {(r["engine"], r["eta"]): r for r in result["results"]}
    for n in cfg["engines"]:
        cells_t, cells_m = [], []
        for e in etas:
            r = by[(n, e)]
            if r["skipped"]:
                cells_t.append("skipped")
                cells_m.append("—")
            elif r["error"] and r["time_s"] is None:
                cells_t.append("error")
                cells_m.append("—")
            else:
                cells_t.append(f"{_fmt(r['time_s'])} ({_fmt(r['cpu_time_s'])})")
                cells_m.append(_fmt(r["peak_mem_mib"], ".0f"))
        lines.append(f"| {n} | " + " | ".join(cells_t + cells_m) + " |")
    keys = [
        "reverse/best_external", "fcall/best_external", "reverse/higher", "reverse/torchopt",
        "reverse/plain", "forward/reverse", "checkpoint/reverse", "reverse/stockbn",
    ]  # fmt: skip
    lines += [
        "",
        "Time ratios (wall; CPU time in parentheses), same process:",
        "",
        "| η | " + " | ".join(keys) + " | mem checkpoint/reverse | mem forward/reverse |",
        "|---" * (len(keys) + 3) + "|",
    ]
    for ent in result["ratios"]:
        cells = [f"{_fmt(ent[k], '.2f')} ({_fmt(ent[k + '_cpu'], '.2f')})" for k in keys]
        cells += [
            _fmt(ent["mem_checkpoint/reverse"], ".2f"),
            _fmt(ent["mem_forward/reverse"], ".2f"),
        ]
        lines.append(f"| {ent['eta']} | " + " | ".join(cells) + " |")
    if result["notes"]:
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    errs = [r for r in result["results"] if r["error"]]
    lines += [f"- error in {r['engine']} at η = {r['eta']}: {r['error']}" for r in errs]
    return "\n".join(lines) + "\n"


def _print_table(result: dict[str, Any]) -> None:
    print(to_markdown(result), flush=True)


def _plot(result: dict[str, Any], path: Path) -> None:
    """Time and peak memory vs η per engine (log-log), matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in cfg["engines"]:
        rows = [r for r in result["results"] if r["engine"] == n and r["time_s"] is not None]
        if not rows:
            continue
        style = "-o" if n.startswith("metakd") else ("--s" if n != "plain" else ":k^")
        axes[0].plot([r["eta"] for r in rows], [r["time_s"] for r in rows], style, label=n)
        mem = [r for r in rows if r["peak_mem_mib"] is not None]
        if mem:
            axes[1].plot(
                [r["eta"] for r in mem], [max(r["peak_mem_mib"], 1e-2) for r in mem], style
            )
    dev = cfg["device"] + (f" ({result['env']['gpu']})" if "gpu" in result["env"] else "")
    for ax, ylabel in zip(axes, ("seconds per hypergradient (median)", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("η (unrolled steps)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{cfg['model']}, batch {cfg['batch_size']}, {dev}, {cfg['threads']} thread(s)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
