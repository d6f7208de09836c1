"""Render a preview PNG of each Grafana dashboard from real Prometheus data.

    python dashboards/render.py --prometheus http://127.0.0.1:9090 --out docs/dashboards
    python dashboards/render.py --demo --out docs/dashboards

Every panel's targets are queried (``query_range`` over the last ``--minutes``; instant queries
for targets marked instant, such as the Keys table) and drawn on a grid that follows the
panels' ``gridPos``: time series as lines with a legend, stat panels as big numbers, tables as
a small text table, bar gauges as bars, state timelines as coloured bands. Grafana's variables
are filled in: ``--var provider=modelscope --var key=alice`` (otherwise the first value that
``label_values()`` finds), ``$__rate_interval`` the way Grafana computes it from the step and
``--scrape-interval`` (or ``--rate-interval``).

``--demo`` needs nothing running: it starts the simulator, the gateway (in this process) and a
private Prometheus (dashboards/prom.py, 1 s scrapes), drives a few clients for
``--demo-seconds`` (failovers after 503s, a throttle, a cooldown, cut streams, a per-model cap,
the free pool running out, the paid Bailian fallback, then the gateway's own 429s), and renders
that window.

Needs matplotlib (the ``docs`` extra: ``pip install -e '.[docs]'``) and, for ``--demo``, the
prometheus binary (Debian/Ubuntu: ``apt-get install prometheus``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    from dashboards.prom import (
        PrometheusError,
        PrometheusNotFound,
        PrometheusServer,
        find_prometheus,
        query,
        query_range,
    )
except ImportError:  # run as a script: dashboards/ is on sys.path, the repository root is not
    from prom import (  # type: ignore[no-redef]
        PrometheusError,
        PrometheusNotFound,
        PrometheusServer,
        find_prometheus,
        query,
        query_range,
    )

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DEFAULT_DASHBOARDS = ("overview.json", "key-detail.json")

# Layout: Grafana's grid is 24 columns wide; one grid row is ~30 px.
FIG_WIDTH_IN = 20.0
ROW_HEIGHT_IN = 0.42
HEADER_IN = 0.85
GAP_IN = 0.06
DPI = 100
MAX_POINTS = 400

# Grafana's dark theme and its classic palette.
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e9a"
GRID = "#2a2d33"
PALETTE = [
    "#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
    "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c",
]  # fmt: skip
NAMED_COLORS = {
    "green": "#73bf69",
    "red": "#f2495c",
    "orange": "#ff9830",
    "yellow": "#fade2a",
    "blue": "#5794f2",
    "purple": "#b877d9",
    "text": TEXT,
    "transparent": "none",
    "dark-red": "#c4162a",
    "dark-green": "#37872d",
    "dark-orange": "#fa6400",
    "dark-yellow": "#e0b400",
}

VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.+),\s*(?P<label>\w+)\s*\)\s*$", re.S)
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")

log = logging.getLogger("render")


# -- dashboards and variables ---------------------------------------------------------------


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data, including those inside (collapsed) rows."""
    for panel in panels:
        if panel.get("type") != "row":
            yield panel
        yield from all_panels(panel.get("panels", []))


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as ``1m30s`` or ``15s``."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 15s, 1m)")
    return sum(float(n) * units[u] for n, u in parts)


def duration(seconds: float) -> str:
    """A Prometheus duration for a number of seconds (whole seconds, at least 1s)."""
    return f"{max(1, round(seconds))}s"


@dataclass
class Window:
    """The time range of one render and the values of Grafana's built-in variables."""

    start: float
    end: float
    scrape_interval: float
    rate_interval: float | None = None
    step: float = field(init=False)

    def __post_init__(self) -> None:
        span = self.end - self.start
        self.step = max(self.scrape_interval, math.ceil(span / MAX_POINTS))

    def builtins(self) -> dict[str, str]:
        # Grafana: $__rate_interval = max($__interval + scrape interval, 4 * scrape interval)
        rate = self.rate_interval or max(self.step + self.scrape_interval, 4 * self.scrape_interval)
        return {
            "__interval": duration(self.step),
            "__rate_interval": duration(rate),
            "__range": duration(self.end - self.start),
            "datasource": "prometheus",
        }


def substitute(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise SystemExit(f"no value for the Grafana variable ${name} in {expr!r}; use --var")
        return values[name]

    return VARIABLE.sub(value, expr)


def resolve_variables(
    dashboard: dict[str, Any], url: str, given: dict[str, str], window: Window
) -> dict[str, str]:
    """Grafana's built-ins, then each query variable: given, else its first label value."""
    values = window.builtins()
    for variable in dashboard.get("templating", {}).get("list", []):
        name = variable["name"]
        if name in values:
            continue
        if name in given:
            values[name] = given[name]
            continue
        raw = variable.get("query")
        raw = raw.get("query") if isinstance(raw, dict) else raw
        match = LABEL_VALUES.match(raw) if isinstance(raw, str) else None
        if variable.get("type") != "query" or match is None:
            continue
        found = query(url, substitute(match.group("expr"), values), window.end)["result"]
        choices = sorted({s["metric"].get(match.group("label"), "") for s in found} - {""})
        if not choices:
            raise SystemExit(f"variable ${name}: {raw} found nothing; pass --var {name}=VALUE")
        values[name] = choices[0]
    return values


# -- fetching -------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    ref: str
    times: list[float]
    values: list[float]

    def last(self) -> float | None:
        """Grafana's lastNotNull."""
        for value in reversed(self.values):
            if not math.isnan(value):
                return value
        return None


def legend_name(fmt: str | None, labels: dict[str, str], expr: str) -> str:
    if fmt and fmt != "__auto":
        return LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    if not shown:
        return expr if len(expr) < 40 else "value"
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))


def fetch(panel: dict[str, Any], url: str, values: dict[str, str], window: Window) -> list[Series]:
    """Every target of a panel as series (one point for instant targets)."""
    found: list[Series] = []
    for target in panel.get("targets", []):
        if target.get("hide"):
            continue
        expr = substitute(target["expr"], values)
        ref = target.get("refId", "A")
        if target.get("instant") and not target.get("range"):
            data = query(url, expr, window.end)
            rows = [(s["metric"], [s["value"]]) for s in data["result"]]
        else:
            result = query_range(url, expr, window.start, window.end, window.step)
            rows = [(s["metric"], s["values"]) for s in result]
        for labels, points in rows:
            found.append(
                Series(
                    name=legend_name(target.get("legendFormat"), labels, expr),
                    labels={k: v for k, v in labels.items() if k != "__name__"},
                    ref=ref,
                    times=[float(t) for t, _ in points],
                    values=[float(v) for _, v in points],
                )
            )
    return found


# -- units, colours, field config -----------------------------------------------------------


def short(value: float) -> str:
    if value == int(value) and abs(value) < 1000:
        return str(int(value))
    for size, suffix in ((1e12, " T"), (1e9, " B"), (1e6, " Mil"), (1e3, " K")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def seconds_text(value: float) -> str:
    if value == 0:
        return "0 s"
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "min"), (1, "s"), (1e-3, "ms")):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value * 1e6:.3g} µs"


def dt_durations(value: float) -> str:
    """Grafana's dtdurations: the two largest units, e.g. "3 hours, 12 minutes"."""
    seconds = round(abs(value))
    if seconds == 0:
        return "0 seconds"
    parts = []
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'s' if count != 1 else ''}")
    return ", ".join(parts[:2])


def format_value(value: float | None, unit: str | None) -> str:
    if value is None:
        return "No data"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if unit == "percentunit":
        percent = value * 100
        return f"{percent:.0f}%" if abs(percent) >= 10 or percent == 0 else f"{percent:.1f}%"
    if unit == "percent":
        return f"{value:.1f}%"
    if unit == "s":
        return seconds_text(value)
    if unit == "dtdurations":
        return dt_durations(value)
    if unit == "reqps":
        return f"{short(value)} req/s"
    if unit == "ops":
        return f"{short(value)} ops/s"
    return short(value)


def color(name: str | None, index: int = 0) -> str:
    if not name:
        return PALETTE[index % len(PALETTE)]
    return NAMED_COLORS.get(name, name)


def field_config(panel: dict[str, Any], name: str) -> dict[str, Any]:
    """The panel's field defaults with the overrides that match ``name`` applied."""
    config = panel.get("fieldConfig", {})
    merged: dict[str, Any] = json.loads(json.dumps(config.get("defaults", {})))
    merged.setdefault("custom", {})
    for override in config.get("overrides", []):
        matcher = override.get("matcher", {})
        option = str(matcher.get("options", ""))
        if matcher.get("id") == "byName":
            matches = name == option
        elif matcher.get("id") == "byRegexp":
            matches = re.fullmatch(option, name) is not None
        else:
            matches = False
        if not matches:
            continue
        for prop in override.get("properties", []):
            key = prop["id"]
            if key.startswith("custom."):
                merged["custom"][key.removeprefix("custom.")] = prop["value"]
            else:
                merged[key] = prop["value"]
    return merged


def threshold_color(config: dict[str, Any], value: float | None) -> str:
    steps = config.get("thresholds", {}).get("steps", [])
    chosen = steps[0]["color"] if steps else "green"
    for step in steps:
        if step.get("value") is None or (value is not None and value >= step["value"]):
            chosen = step["color"]
    return color(chosen)


def series_color(config: dict[str, Any], value: float | None, index: int) -> str:
    mode = config.get("color", {}).get("mode", "palette-classic")
    if mode == "fixed":
        return color(config["color"].get("fixedColor"), index)
    if mode == "thresholds":
        return threshold_color(config, value)
    return PALETTE[index % len(PALETTE)]


def mapped(config: dict[str, Any], value: float | None) -> tuple[str | None, str | None]:
    """(text, colour) of the first value mapping that matches, else (None, None)."""
    if value is None:
        return None, None
    for mapping in config.get("mappings", []):
        options = mapping.get("options", {})
        if mapping.get("type") == "value":
            for raw, result in options.items():
                try:
                    hit = float(raw) == value
                except ValueError:
                    hit = False
                if hit:
                    return result.get("text"), result.get("color")
        elif mapping.get("type") == "range":
            low, high = options.get("from"), options.get("to")
            if (low is None or value >= low) and (high is None or value <= high):
                result = options.get("result", {})
                return result.get("text"), result.get("color")
    return None, None


def display(config: dict[str, Any], value: float | None, index: int) -> tuple[str, str]:
    """The text and colour Grafana shows for one reduced value."""
    text, mapped_color = mapped(config, value)
    shown = text if text is not None else format_value(value, config.get("unit"))
    return shown, color(mapped_color) if mapped_color else series_color(config, value, index)


# -- drawing --------------------------------------------------------------------------------


@dataclass
class Box:
    """A panel's rectangle in figure inches (left, bottom, width, height)."""

    left: float
    bottom: float
    width: float
    height: float

    def axes(self, fig: Figure, left: float, right: float, top: float, bottom: float) -> Axes:
        """Axes inset in this box by the given margins (inches)."""
        fw, fh = fig.get_size_inches()
        rect = (
            (self.left + left) / fw,
            (self.bottom + bottom) / fh,
            max(0.01, self.width - left - right) / fw,
            max(0.01, self.height - top - bottom) / fh,
        )
        ax = fig.add_axes(rect)
        ax.set_facecolor(PANEL)
        return ax


def style_axes(ax: Axes) -> None:
    ax.tick_params(colors=MUTED, labelsize=8, length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(color=GRID, linewidth=0.6)
    ax.set_axisbelow(True)


def draw_frame(fig: Figure, box: Box, title: str) -> None:
    fw, fh = fig.get_size_inches()
    fig.patches.append(
        FancyBboxPatch(
            (box.left / fw, box.bottom / fh),
            box.width / fw,
            box.height / fh,
            boxstyle="round,pad=0,rounding_size=0.002",
            transform=fig.transFigure,
            facecolor=PANEL,
            edgecolor=BORDER,
            linewidth=0.8,
            zorder=-10,  # under the panel's axes
        )
    )
    fig.text(
        (box.left + 0.12) / fw,
        (box.bottom + box.height - 0.2) / fh,
        title,
        color=TEXT,
        fontsize=10,
        fontweight="bold",
        va="center",
    )


def no_data(fig: Figure, box: Box) -> None:
    ax = box.axes(fig, 0.1, 0.1, 0.4, 0.1)
    ax.axis("off")
    ax.text(0.5, 0.5, "No data", color=MUTED, fontsize=12, ha="center", va="center")


class DurationLocator(MaxNLocator):
    """Ticks on whole minutes or hours when an axis in seconds spans minutes or hours."""

    def __init__(self) -> None:
        super().__init__(nbins=5, steps=[1, 2, 2.5, 5, 10])

    def tick_values(self, vmin: float, vmax: float) -> Any:
        top = max(abs(vmin), abs(vmax))
        scale = 3600 if top >= 2 * 3600 else 60 if top >= 120 else 1
        return super().tick_values(vmin / scale, vmax / scale) * scale


def draw_timeseries(fig: Figure, box: Box, panel: dict[str, Any], series: list[Series]) -> None:
    if not series:
        no_data(fig, box)
        return
    legend_cols = max(1, int(box.width / 2.6))
    legend_rows = math.ceil(len(series) / legend_cols)
    legend_in = 0.08 + 0.2 * legend_rows
    ax = box.axes(fig, 0.78, 0.4, 0.42, 0.3 + legend_in)
    style_axes(ax)
    defaults = field_config(panel, "")
    unit = defaults.get("unit")
    for index, item in enumerate(series):
        config = field_config(panel, item.name)
        times = [datetime.fromtimestamp(t) for t in item.times]
        values = [v if math.isfinite(v) else math.nan for v in item.values]
        line = config["custom"].get("lineStyle", {})
        dashed = line.get("fill") == "dash"
        shade = series_color(config, None, index)
        ax.plot(
            times,
            values,
            color=shade,
            linewidth=1.4,
            linestyle=(0, (5, 4)) if dashed else "-",
            label=item.name,
        )
        opacity = config["custom"].get("fillOpacity", 0)
        if opacity and not dashed:
            ax.fill_between(times, values, color=shade, alpha=opacity / 100, linewidth=0)
    thresholds_style = defaults["custom"].get("thresholdsStyle", {}).get("mode", "off")
    if thresholds_style != "off":
        for step in defaults.get("thresholds", {}).get("steps", []):
            if step.get("value") is not None:
                ax.axhline(step["value"], color=color(step["color"]), linestyle="--", lw=1)
    low = defaults.get("min", 0 if defaults["custom"].get("axisSoftMin") == 0 else None)
    if low is not None:
        ax.set_ylim(bottom=low)
    if defaults.get("max") is not None:
        ax.set_ylim(top=defaults["max"])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))
    ax.yaxis.set_major_locator(
        DurationLocator() if unit in ("s", "dtdurations") else MaxNLocator(5)
    )
    time_axis(ax, box)
    if panel.get("options", {}).get("legend", {}).get("showLegend", True):
        handles, labels = ax.get_legend_handles_labels()
        fw, fh = fig.get_size_inches()
        fig.legend(
            handles,
            labels,
            loc="lower left",
            bbox_to_anchor=((box.left + 0.7) / fw, (box.bottom + 0.04) / fh),
            ncol=legend_cols,
            frameon=False,
            fontsize=8,
            labelcolor=TEXT,
            handlelength=1.6,
            columnspacing=1.2,
        )


_SPAN: dict[str, float] = {"seconds": 0.0}


def time_axis(ax: Axes, box: Box) -> None:
    """The window on the x axis in local time (as Grafana shows it), ticks that fit the width."""
    ax.set_xlim(
        datetime.fromtimestamp(_SPAN["start"]),
        datetime.fromtimestamp(_SPAN["end"]),
    )
    ticks = max(4, int(box.width))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=max(2, ticks // 2), maxticks=ticks))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if _short(box) else "%H:%M"))


def _short(box: Box) -> bool:
    """Seconds on the time axis when the window is short (the demo)."""
    return _SPAN["seconds"] < 15 * 60


def draw_stat(fig: Figure, box: Box, panel: dict[str, Any], series: list[Series]) -> None:
    if not series:
        no_data(fig, box)
        return
    options = panel.get("options", {})
    text_mode = options.get("textMode", "auto")
    color_mode = options.get("colorMode", "value")
    sparkline = options.get("graphMode") == "area"
    count = len(series)
    horizontal = box.width >= box.height * 1.3 or count <= 1
    cols, rows = (count, 1) if horizontal else (1, count)
    inner = Box(box.left + 0.1, box.bottom + 0.1, box.width - 0.2, box.height - 0.5)
    cell_w, cell_h = inner.width / cols, inner.height / rows
    for index, item in enumerate(series):
        config = field_config(panel, item.name)
        value = item.last()
        text, shade = display(config, value, index)
        col, row = (index, 0) if horizontal else (0, index)
        cell = Box(
            inner.left + col * cell_w, inner.bottom + (rows - 1 - row) * cell_h, cell_w, cell_h
        )
        ax = cell.axes(fig, 0.04, 0.04, 0.04, 0.04)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
        fg = shade
        if color_mode == "background":
            ax.add_patch(Rectangle((0, 0), 1, 1, color=shade, alpha=0.85, lw=0))
            fg = "#ffffff"
        if sparkline and len(item.values) > 1:
            spark = cell.axes(fig, 0.06, 0.06, cell.height * 0.62, 0.06)
            spark.axis("off")
            finite = [v if math.isfinite(v) else math.nan for v in item.values]
            spark.fill_between(item.times, finite, color=shade, alpha=0.18, lw=0)
            spark.plot(item.times, finite, color=shade, lw=1, alpha=0.6)
            spark.set_ylim(bottom=0)
        show_name = text_mode in ("name", "value_and_name") or (text_mode == "auto" and count > 1)
        show_value = text_mode != "name"
        big = _fit_font(text if show_value else item.name, cell.width, cell.height, count)
        if show_value and show_name:
            ax.text(0.5, 0.78, item.name, color=fg, fontsize=9, ha="center", va="center")
            ax.text(0.5, 0.4, text, color=fg, fontsize=big, ha="center", va="center", weight="bold")
        else:
            shown = text if show_value else item.name
            ax.text(
                0.5, 0.5, shown, color=fg, fontsize=big, ha="center", va="center", weight="bold"
            )


def _fit_font(text: str, width_in: float, height_in: float, count: int) -> float:
    """A font size (points) that fits ``text`` on one line in the cell."""
    by_width = 0.85 * width_in * 72 / max(1, len(text)) / 0.72  # bold: ~0.72 em a glyph
    by_height = height_in * 72 * (0.42 if count > 1 else 0.5)
    return max(9.0, min(30.0, by_width, by_height))


def merge_table(panel: dict[str, Any], series: list[Series]) -> tuple[list[str], list[list[Any]]]:
    """Grafana's "merge" then "organize" transformations: columns and rows."""
    rows: list[dict[str, Any]] = []
    for item in series:
        record: dict[str, Any] = {**item.labels, f"Value #{item.ref}": item.last()}
        for row in rows:
            shared = set(row) & set(item.labels)
            if shared and all(row[k] == item.labels[k] for k in shared):
                row.update(record)
                break
        else:
            rows.append(record)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    organize: dict[str, Any] = {}
    for transformation in panel.get("transformations", []):
        if transformation.get("id") == "organize":
            organize = transformation.get("options", {})
    excluded = {k for k, v in organize.get("excludeByName", {}).items() if v}
    order = organize.get("indexByName", {})
    kept = [c for c in columns if c not in excluded and c != "Time"]
    columns = sorted(kept, key=lambda c: (order.get(c, len(order)), kept.index(c)))
    rename = organize.get("renameByName", {})
    rows.sort(key=lambda r: tuple(str(r.get(c, "")) for c in columns[:2]))
    table = [[row.get(c) for c in columns] for row in rows]
    return [rename.get(c, c) for c in columns], table


def draw_table(fig: Figure, box: Box, panel: dict[str, Any], series: list[Series]) -> None:
    if not series:
        no_data(fig, box)
        return
    columns, rows = merge_table(panel, series)
    ax = box.axes(fig, 0.15, 0.15, 0.45, 0.12)
    ax.axis("off")
    cells: list[list[str]] = []
    colours: list[list[str]] = []
    for row in rows:
        texts, shades = [], []
        for name, value in zip(columns, row, strict=True):
            config = field_config(panel, name)
            if isinstance(value, float):
                text, mapped_color = mapped(config, value)
                texts.append(text or format_value(value, config.get("unit")))
            else:
                text = "" if value is None else str(value)
                texts.append(text)
                mapped_color = None
                for mapping in config.get("mappings", []):
                    if mapping.get("type") == "value" and text in mapping.get("options", {}):
                        mapped_color = mapping["options"][text].get("color")
            background = config["custom"].get("cellOptions", {}).get("type") == "color-background"
            shades.append(color(mapped_color) if background and mapped_color else PANEL)
        cells.append(texts)
        colours.append(shades)
    table = ax.table(
        cellText=cells,
        colLabels=columns,
        cellColours=colours,
        colColours=[BORDER] * len(columns),
        cellLoc="left",
        colLoc="left",
        bbox=(0, max(0.0, 1 - 0.085 * (len(rows) + 1)), 1, min(1.0, 0.085 * (len(rows) + 1))),
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row_index, _), cell in table.get_celld().items():
        cell.set_edgecolor(BORDER)
        text = cell.get_text()
        coloured = row_index > 0 and cell.get_facecolor()[:3] != mpl.colors.to_rgb(PANEL)
        text.set_color(BACKGROUND if coloured else TEXT)  # dark text on a coloured cell
        if row_index == 0:
            text.set_weight("bold")


def draw_bargauge(fig: Figure, box: Box, panel: dict[str, Any], series: list[Series]) -> None:
    if not series:
        no_data(fig, box)
        return
    series = sorted(series, key=lambda s: s.name)
    ax = box.axes(fig, 0.15, 0.2, 0.45, 0.15)
    ax.axis("off")
    count = len(series)
    slot = 1 / count
    bar = min(slot * 0.5, 0.22)
    for index, item in enumerate(series):
        config = field_config(panel, item.name)
        value = item.last()
        low, high = config.get("min", 0), config.get("max", 1)
        share = 0.0 if value is None else min(1.0, max(0.0, (value - low) / (high - low)))
        text, shade = display(config, value, index)
        y = 1 - (index + 0.5) * slot
        ax.text(0, y + bar / 2 + 0.02, item.name, color=TEXT, fontsize=9, va="bottom")
        ax.add_patch(Rectangle((0, y - bar / 2), 0.86, bar, color=BORDER, lw=0))
        ax.add_patch(Rectangle((0, y - bar / 2), 0.86 * share, bar, color=shade, lw=0))
        ax.text(0.88, y, text, color=shade, fontsize=12, va="center", weight="bold")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def draw_state_timeline(fig: Figure, box: Box, panel: dict[str, Any], series: list[Series]) -> None:
    if not series:
        no_data(fig, box)
        return
    series = sorted(series, key=lambda s: s.name)
    ax = box.axes(fig, 0.95, 0.4, 0.42, 0.42)
    style_axes(ax)
    ax.grid(False)
    for row, item in enumerate(series):
        config = field_config(panel, item.name)
        for start, width, value in _runs(item.times, item.values):
            shade = threshold_color(config, value)
            if shade != "none":
                left = mdates.date2num(datetime.fromtimestamp(start))
                span = (left, width / 86400)  # date numbers count days
                ax.broken_barh([span], (row - 0.4, 0.8), color=shade, alpha=0.85)
    ax.set_yticks(range(len(series)), [s.name for s in series], color=TEXT, fontsize=9)
    ax.set_ylim(-0.6, len(series) - 0.4)
    time_axis(ax, box)


def _runs(times: list[float], values: list[float]) -> Iterator[tuple[float, float, float]]:
    """(start, width, value) for each run of equal values, gaps ending a run."""
    if not times:
        return
    step = min((b - a for a, b in itertools.pairwise(times)), default=1.0)
    start, current, previous = times[0], values[0], times[0]
    for t, v in zip(times[1:], values[1:], strict=True):
        if v != current or t - previous > step * 1.5:
            yield start, previous - start + step, current
            start, current = t, v
        previous = t
    yield start, previous - start + step, current


DRAWERS = {
    "timeseries": draw_timeseries,
    "stat": draw_stat,
    "table": draw_table,
    "bargauge": draw_bargauge,
    "state-timeline": draw_state_timeline,
}


def render_dashboard(
    path: Path, url: str, window: Window, given: dict[str, str], out: Path
) -> Path:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    values = resolve_variables(dashboard, url, given, window)
    panels = list(all_panels(dashboard["panels"]))
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = HEADER_IN + rows * ROW_HEIGHT_IN + 0.15
    fig = plt.figure(figsize=(FIG_WIDTH_IN, height), dpi=DPI, facecolor=BACKGROUND)
    _SPAN.update(seconds=window.end - window.start, start=window.start, end=window.end)
    picked = [
        f"{v['name']}={values[v['name']]}"
        for v in dashboard.get("templating", {}).get("list", [])
        if v.get("type") == "query"
    ]
    start = datetime.fromtimestamp(window.start)
    end = datetime.fromtimestamp(window.end)
    zone = end.astimezone().tzname()
    fig.text(
        0.1 / FIG_WIDTH_IN,
        1 - 0.3 / height,
        dashboard["title"],
        color=TEXT,
        fontsize=17,
        fontweight="bold",
        va="center",
    )
    subtitle = (
        f"{start:%Y-%m-%d %H:%M:%S} – {end:%H:%M:%S} {zone}"
        f"  ·  step {values['__interval']}  ·  $__rate_interval {values['__rate_interval']}"
        + (f"  ·  {', '.join(picked)}" if picked else "")
        + "  ·  preview rendered from live Prometheus data by dashboards/render.py"
    )
    fig.text(0.1 / FIG_WIDTH_IN, 1 - 0.62 / height, subtitle, color=MUTED, fontsize=9.5)
    column = FIG_WIDTH_IN / 24
    for panel in panels:
        grid = panel["gridPos"]
        box = Box(
            left=grid["x"] * column + GAP_IN,
            bottom=height - HEADER_IN - (grid["y"] + grid["h"]) * ROW_HEIGHT_IN + GAP_IN,
            width=grid["w"] * column - 2 * GAP_IN,
            height=grid["h"] * ROW_HEIGHT_IN - 2 * GAP_IN,
        )
        draw_frame(fig, box, panel.get("title", ""))
        series = fetch(panel, url, values, window)
        DRAWERS.get(panel.get("type", ""), draw_timeseries)(fig, box, panel, series)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.stem}.png"
    fig.savefig(target, dpi=DPI, facecolor=BACKGROUND)
    plt.close(fig)
    return target


def render_all(
    url: str, window: Window, given: dict[str, str], out: Path, names: list[str]
) -> list[Path]:
    return [render_dashboard(DASHBOARDS / name, url, window, given, out) for name in names]


# -- the demo -------------------------------------------------------------------------------

DEMO_MODELS = ("Qwen/Qwen3-32B", "deepseek-ai/DeepSeek-V3.1")
DEMO_CLIENTS = {
    "web-app": "sk-demo-web-app",
    "notebook": "sk-demo-notebook",
    "batch": "sk-demo-batch",
}
DEMO_TOKENS = ("alice", "bob", "carol")
DEMO_LIMIT = 60  # calls per ModelScope token
DEMO_MODEL_LIMIT = 15  # DeepSeek-V3.1 per token
DEMO_BAILIAN_LIMIT = 90


@dataclass
class DemoStats:
    answers: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1


def demo_simulator_config() -> Any:
    from router.simulator import (
        BailianConfig,
        BailianKey,
        ModelScopeConfig,
        ModelScopeToken,
        SimulatorConfig,
    )

    return SimulatorConfig(
        modelscope=ModelScopeConfig(
            tokens=[
                ModelScopeToken(
                    secret=f"ms-demo-{name}",
                    name=name,
                    daily_limit=DEMO_LIMIT,
                    model_daily_limit=DEMO_LIMIT,
                    model_limits={DEMO_MODELS[1]: DEMO_MODEL_LIMIT},
                )
                for name in DEMO_TOKENS
            ]
        ),
        bailian=BailianConfig(
            keys=[BailianKey(secret="sk-demo-bailian", name="main")]  # noqa: S106
        ),
        stream_chunks=8,
        stream_chunk_delay_ms=40,
    )


def demo_settings(modelscope_url: str, bailian_url: str) -> Any:
    from router.config import Settings

    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"url": "memory://"},
            "providers": [
                {
                    "name": "modelscope",
                    "type": "modelscope",
                    "base_url": modelscope_url,
                    "daily_limit": DEMO_LIMIT,
                    "model_daily_limit": DEMO_LIMIT,
                    "model_limits": {DEMO_MODELS[1]: DEMO_MODEL_LIMIT},
                    "keys": [{"name": n, "secret": f"ms-demo-{n}"} for n in DEMO_TOKENS],
                },
                {
                    "name": "bailian",
                    "type": "bailian",
                    "base_url": bailian_url,
                    "daily_limit": DEMO_BAILIAN_LIMIT,
                    "keys": [{"name": "main", "secret": "sk-demo-bailian"}],
                },
            ],
            "clients": [{"name": n, "key": k} for n, k in DEMO_CLIENTS.items()],
        }
    )


async def demo_call(
    session: Any, url: str, client: str, model: str, stats: DemoStats, stream: bool = False
) -> None:
    """One chat completion; a streaming client sometimes walks away after the first chunk."""
    import aiohttp

    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {DEMO_CLIENTS[client]}"}
    try:
        async with session.post(
            f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            if stream and response.status == 200 and random.random() < 0.08:
                await response.content.readany()
                response.close()  # the client goes away mid-stream
                stats.count("client went away")
                return
            await response.read()
            provider = response.headers.get("x-router-provider", "gateway")
            stats.count(f"{response.status} {provider}")
    except aiohttp.ClientError as exc:
        stats.count(type(exc).__name__)


async def demo_client(session: Any, url: str, name: str, until: float, stats: DemoStats) -> None:
    """web-app: steady non-streamed Qwen; notebook: streamed DeepSeek; batch: bursts."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        if name == "web-app":
            await demo_call(session, url, name, DEMO_MODELS[0], stats)
            await asyncio.sleep(random.uniform(0.5, 1.2))
        elif name == "notebook":
            await demo_call(session, url, name, DEMO_MODELS[1], stats, stream=True)
            await asyncio.sleep(random.uniform(1.0, 2.4))
        else:
            burst = [demo_call(session, url, name, DEMO_MODELS[0], stats) for _ in range(6)]
            await asyncio.gather(*burst)
            await asyncio.sleep(random.uniform(10, 14))


async def demo_weather(sim: Any, until: float) -> None:
    """Upstream latency that drifts, and scheduled faults, while the clients run."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    events = [
        (12, "status_503", {"token": "alice", "count": 1}),
        (24, "mid_stream_cut", {"model": DEMO_MODELS[1], "count": 1}),
        (30, "throttle", {"token": "bob", "count": 2}),
        (42, "status_503", {"token": "alice", "count": 4}),  # cooldowns of 1, 2, 4, 8 s
        (55, "retry_after:12", {"token": "carol", "count": 1}),
        (70, "mid_stream_cut", {"model": DEMO_MODELS[1], "count": 1}),
        (85, "status_502", {"token": "bob", "count": 1}),
    ]
    base = 0.12
    while loop.time() < until:
        elapsed = loop.time() - begin
        while events and events[0][0] <= elapsed:
            _, kind, where = events.pop(0)
            sim.faults.add(kind, **where)
        base = min(0.6, max(0.04, base * random.lognormvariate(0, 0.25)))
        sim.config.latency_ms = int(1000 * base)
        await asyncio.sleep(2)


async def run_demo(out: Path, seconds: float, names: list[str]) -> list[Path]:
    import aiohttp

    from router.app import create_app
    from router.demo import running
    from router.simulator import Simulator

    binary = find_prometheus()
    logging.getLogger("router").setLevel(logging.ERROR)
    async with Simulator(demo_simulator_config()) as sim:
        app = create_app(demo_settings(sim.modelscope_url, sim.bailian_url))
        async with running(app) as url:
            prom = PrometheusServer(
                [url.removeprefix("http://")], rule_files=[RULES], binary=binary
            )
            await asyncio.to_thread(prom.start)
            try:
                print(f"gateway {url}, prometheus {prom.url}; driving traffic for {seconds:.0f} s")
                started = time.time()
                stats = DemoStats()
                loop = asyncio.get_running_loop()
                until = loop.time() + seconds
                async with aiohttp.ClientSession() as session:
                    await asyncio.gather(
                        demo_weather(sim, until),
                        *(demo_client(session, url, n, until, stats) for n in DEMO_CLIENTS),
                    )
                print("answers:", ", ".join(f"{k}: {v}" for k, v in sorted(stats.answers.items())))
                await wait_for_scrape(prom, sum(stats.answers.values()))
                firing = await asyncio.to_thread(prom.api, "alerts")
                states = sorted(
                    f"{a['labels']['alertname']} ({a['state']})" for a in firing["alerts"]
                )
                print("alerts:", ", ".join(states) or "none")
                window = Window(started - 5, time.time(), scrape_interval=1, rate_interval=20)
                return await asyncio.to_thread(
                    render_all,
                    prom.url,
                    window,
                    {"provider": "modelscope", "key": "alice"},
                    out,
                    names,
                )
            finally:
                await asyncio.to_thread(prom.stop)


async def wait_for_scrape(prom: PrometheusServer, answered: int, limit_s: float = 20) -> None:
    """Until Prometheus holds a scrape that counts every request the clients made."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        data = await asyncio.to_thread(prom.query, "sum(router_requests_total)")
        if data["result"] and float(data["result"][0]["value"][1]) >= answered:
            return
        await asyncio.sleep(0.25)
    print(f"warning: the last scrape does not show all {answered} requests yet")


# -- command line ---------------------------------------------------------------------------


def parse_var(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", metavar="URL", help="the Prometheus to query")
    source.add_argument("--demo", action="store_true", help="run simulator+gateway+Prometheus")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboards")
    parser.add_argument("--minutes", type=float, default=15, help="the time range (default 15)")
    parser.add_argument("--var", type=parse_var, action="append", default=[], metavar="NAME=V")
    parser.add_argument("--dashboard", action="append", metavar="FILE", help="default: both")
    parser.add_argument("--scrape-interval", type=parse_duration, default=15.0)
    parser.add_argument("--rate-interval", type=parse_duration, default=None)
    parser.add_argument("--demo-seconds", type=float, default=150)
    args = parser.parse_args(argv)
    names = args.dashboard or list(DEFAULT_DASHBOARDS)
    for name in names:
        if not (DASHBOARDS / name).is_file():
            parser.error(f"no dashboard {DASHBOARDS / name}")
    try:
        if args.demo:
            written = asyncio.run(run_demo(args.out, args.demo_seconds, names))
        else:
            end = time.time()
            window = Window(end - args.minutes * 60, end, args.scrape_interval, args.rate_interval)
            written = render_all(args.prometheus, window, dict(args.var), args.out, names)
    except (PrometheusError, PrometheusNotFound) as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
