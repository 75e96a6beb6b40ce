"""The report of one benchmark run: ``<timestamp>.json`` (everything, raw values
included), ``latest.md`` (tables) and ``latest.png`` (one panel per comparison).

A run is plain data (see ``bench.__main__``): when it ran, on what machine, and per
benchmark a list of results. A result is either a comparison (``Comparison.to_dict()``:
series of values per contender and the thinvisor / peer ratios per round pair) or any
other dict, shown as a table of its fields. All three files are rendered in memory first
and each is replaced atomically, so a failure leaves the previous report whole.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from thinvisor.fs import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST_MD = "latest.md"
LATEST_PNG = "latest.png"
MACHINE_FIELDS = {
    "cpu_model": "CPU",
    "cores": "cores",
    "memory_mib": "memory (MiB)",
    "os": "OS",
    "kernel": "kernel",
    "qemu": "QEMU",
    "libvirt": "libvirt",
    "thinvisor": "thinvisor",
    "accelerator": "accelerator",
    "python": "Python",
}


def write(run: dict[str, Any], results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Write the run's JSON file and the latest report; the paths written."""
    json_name = f"{run['id']}.json"
    data = json.dumps(run, indent=2, sort_keys=False) + "\n"
    markdown = render_markdown(run, json_name)
    png = render_png(run)
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = [results_dir / json_name, results_dir / LATEST_MD, results_dir / LATEST_PNG]
    for path, content in zip(paths, (data, markdown, png), strict=True):
        atomic_write(path, content)
    return paths


def is_comparison(item: dict[str, Any]) -> bool:
    return isinstance(item.get("series"), dict) and "ratios" in item


def comparisons(run: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(benchmark, comparison) for every comparison of the run, in order."""
    for bench, entry in run["benchmarks"].items():
        for item in entry["results"]:
            if is_comparison(item):
                yield bench, item


# Numbers


def num(value: Any) -> str:
    """A measured value with four significant digits, plain (no exponent) where sane."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or not math.isfinite(value):
        return str(value)
    digits = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"{value:,.{digits}f}" if abs(value) < 1e7 else f"{value:.4g}"


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


# Markdown


def render_markdown(run: dict[str, Any], json_name: str) -> str:
    lines = [
        "# thinvisor benchmarks",
        "",
        f"Run {run['started']} (`{run['command']}`), {run['rounds']} recorded rounds after "
        f"a warm-up, {run['duration_s'] / 60:.1f} min; the run's data: `{json_name}`.",
        "",
        "Ratios are thinvisor / peer for the same round: for times and memory, below 1 "
        "means thinvisor needed less; for rates (per second), above 1 means thinvisor did "
        "more. The median of the per-round ratios is the figure that counts on a noisy "
        "machine.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
    ]
    for key, label in MACHINE_FIELDS.items():
        value = run["machine"].get(key)
        if key == "accelerator" and isinstance(value, dict):
            value = f"{value.get('name')} ({value.get('reason')})"
        lines.append(f"| {label} | {cell(value)} |")
    for bench, entry in run["benchmarks"].items():
        lines += ["", f"## {bench}", "", f"Took {entry['duration_s']:.0f} s."]
        for item in entry["results"]:
            lines += [""]
            lines += comparison_md(item) if is_comparison(item) else other_md(item)
    if run["errors"]:
        lines += ["", "## Failed", ""]
        lines += [f"- {bench}: {cell(error)}" for bench, error in run["errors"].items()]
    return "\n".join(lines) + "\n"


def cell(value: Any) -> str:
    """A value for a markdown table cell."""
    text = num(value) if isinstance(value, int | float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def comparison_md(item: dict[str, Any]) -> list[str]:
    with_ratios = bool(item["ratios"])
    head = "| contender | n | median | min | max | rounds |"
    rule = "| --- | ---: | ---: | ---: | ---: | --- |"
    if with_ratios:
        head += " thinvisor / contender: median | per round |"
        rule += " ---: | --- |"
    lines = [f"### {item['name']} ({item['unit']})", "", head, rule]
    for contender, series in item["series"].items():
        row = [contender, num(series.get("n", 0))]
        row += [num(series[k]) if k in series else "–" for k in ("median", "min", "max")]
        row += [", ".join(num(v) for v in series.get("values", []))]
        if with_ratios:
            r = item["ratios"].get(contender)
            per_round = ", ".join(ratio(v) for v in r["values"]) if r else ""
            row += [ratio(r["median"]) if r else "", per_round]
        lines.append("| " + " | ".join(row) + " |")
    lines += [""] + [f"- {cell(note)}" for note in item.get("notes", [])]
    return lines if item.get("notes") else lines[:-1]


def other_md(item: dict[str, Any]) -> list[str]:
    """Any other result: its scalar fields as a table, its lists of rows as tables."""
    lines = [f"### {item.get('name', 'result')}", ""]
    scalars = {k: v for k, v in flatten(item).items() if k not in ("name", "notes")}
    if scalars:
        lines += ["| | |", "| --- | ---: |"]
        lines += [f"| {k} | {cell(v)} |" for k, v in scalars.items()]
    for key, value in item.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += ["", f"{key}:", "", *rows_md(value)]
    lines += [""] + [f"- {cell(note)}" for note in item.get("notes", [])]
    return lines


def flatten(item: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar fields, nested dicts as ``outer.inner``; lists of numbers joined."""
    flat: dict[str, Any] = {}
    for key, value in item.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            if all(isinstance(v, int | float | str) for v in value):
                flat[name] = ", ".join(num(v) for v in value)
        else:
            flat[name] = value
    return flat


def rows_md(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in flatten(row) if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        flat = flatten(row)
        lines.append("| " + " | ".join(cell(flat.get(c, "")) for c in columns) + " |")
    return lines


# Plot


def render_png(run: dict[str, Any]) -> bytes:
    """One panel per comparison: each round's value as a dot, the median as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = list(comparisons(run))
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no comparisons in this run", ha="center", va="center")
    for ax, (bench, item) in zip(axes.flat, panels, strict=False):
        draw_panel(ax, bench, item)
    machine = run["machine"]
    accel = machine.get("accelerator", {}).get("name")
    fig.suptitle(
        f"thinvisor benchmarks, {run['started']}: {machine.get('cpu_model')}, "
        f"{machine.get('cores')} cores, {accel}. Dots: rounds; bars: medians; "
        "ratio: thinvisor / that contender, median of the rounds",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


def draw_panel(ax: Any, bench: str, item: dict[str, Any]) -> None:
    names = list(item["series"])
    for x, name in enumerate(names):
        series = item["series"][name]
        values = series.get("values", [])
        if not values:
            continue
        median = series["median"]
        ax.bar(x, median, width=0.6, color=f"C{x}", alpha=0.35)
        jitter = [x + 0.18 * (i / max(1, len(values) - 1) - 0.5) for i in range(len(values))]
        ax.plot(jitter, values, "o", color=f"C{x}", markersize=4)
        label = num(median)
        r = item["ratios"].get(name)
        if r and r["median"] is not None:
            label += f"\nratio {r['median']:.2f}"
        ax.annotate(
            label, (x, max(values)), ha="center", va="bottom", fontsize=8,
            xytext=(0, 5), textcoords="offset points",
        )  # fmt: skip
    top = max((v for s in item["series"].values() for v in s.get("values", [])), default=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(item["unit"])
    ax.set_ylim(0, top * 1.35 or 1)
    ax.set_title("\n".join(textwrap.wrap(f"{bench}: {item['name']}", 60)), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
