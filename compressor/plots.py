"""PNG charts drawn with matplotlib (Agg): stacked bars, labelled line plots, series with intervals.

Every chart is its own :class:`~matplotlib.figure.Figure` rendered by ``FigureCanvasAgg``:
no pyplot, no global figure state, and the user's matplotlib backend is never touched.
Charts are drawn under matplotlib's default style (plus ``_STYLE``), whatever a
``matplotlibrc`` says, with the fonts matplotlib ships, and the PNG carries no metadata,
so the same data gives the same bytes.  (The style is set with ``rc_context`` for the
duration of a chart: charts drawn from two threads at once could see each other's style.)
matplotlib is imported on the first chart, not with this module, so commands that
draw nothing do not pay for it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: (width, height) in pixels of every PNG.
SIZE = (900, 500)
DPI = 100

#: Distinct colours (the "tab10" palette), then a few more.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#ad494a", "#637939", "#7b4173",
)

INK = "#222222"
GRID = "#e3e3e3"
AXIS = "#555555"
NO_DATA = "nothing measured yet"

#: Style on top of matplotlib's defaults (which replace whatever the user's matplotlibrc says).
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 13,
    "axes.titlepad": 10,
    "figure.constrained_layout.h_pad": 0.1,   # inches
    "figure.constrained_layout.w_pad": 0.1,
    "axes.labelsize": 10,
    "axes.edgecolor": AXIS,
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": AXIS,
    "ytick.color": AXIS,
    "xtick.labelcolor": INK,
    "ytick.labelcolor": INK,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "text.color": INK,
    "legend.fontsize": 9,
    "legend.title_fontsize": 10,
}


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


# ------------------------------------------------------------------ numbers


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values covering [low, high], about ``count`` of them."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    ticks = []
    value = first
    while value <= last + step * 1e-6:
        ticks.append(0.0 if abs(value) < step * 1e-9 else round(value, 12))
        value += step
    return ticks


def _decimals(step: float) -> int:
    """Fewest decimals that write ``step`` (and so every tick, a multiple of it) exactly: 2.5 -> 1."""
    if not step > 0:
        return 0
    for decimals in range(0, 12):
        if abs(round(step, decimals) - step) <= step * 1e-6:
            return decimals
    return 12


def format_k(value: float, step: float | None = None) -> str:
    """``600K``, ``1.2M``; with a tick ``step``, just enough decimals to tell ticks apart."""
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 1e6 and (step is None or step >= 1e5):
        divisor, suffix = 1e6, "M"
    elif magnitude >= 1e3 or (step is not None and step >= 100):
        divisor, suffix = 1e3, "K"
    else:
        return f"{value:.{_decimals(step) if step else 0}f}"
    if step is None:
        decimals = 0 if magnitude / divisor >= 100 else 1
    else:
        decimals = _decimals(step / divisor)
    return f"{value / divisor:.{decimals}f}{suffix}"


def format_number(value: float, step: float | None = None) -> str:
    """Plain decimals for ordinary values, scientific notation for tiny or huge ones."""
    if value == 0:
        return "0"
    reference = step if step else abs(value)
    if 1e-3 <= reference < 1e5:
        return f"{value:.{_decimals(reference)}f}" if step else f"{value:.4g}"
    return f"{value:.1e}" if step else f"{value:.3g}"


# ------------------------------------------------------------------ figure plumbing


def _render(draw: Callable[[Figure], None], size: tuple[int, int], layout: str | None) -> bytes:
    """A fresh figure of ``size`` pixels, drawn by ``draw`` under the default style; its PNG bytes.

    The PNG is written by Pillow from the rendered pixels, as a 256-colour palette image
    (a chart has few colours; a third of the size of matplotlib's RGBA file, no visible
    change) and without metadata: no software version, no date, so the bytes depend on
    the data only.
    """
    import matplotlib
    import matplotlib.style
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    with matplotlib.style.context("default"), matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout=layout, facecolor="white")
        canvas = FigureCanvasAgg(figure)
        draw(figure)
        canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    image = Image.fromarray(np.ascontiguousarray(pixels))  # uint8, height × width × 3: RGB
    image = image.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _ticks(axis, ticks: list[float], fmt: Callable[[float, float | None], str]) -> None:
    """Fixed ``ticks`` on ``axis``, written by ``fmt(value, step)``."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    step = ticks[1] - ticks[0] if len(ticks) > 1 else None
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: fmt(value, step)))


def _positive(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) and value > 0 else 0.0


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, NO_DATA, transform=ax.transAxes, ha="center", va="center", color=AXIS, fontsize=11)


# ------------------------------------------------------------------ charts


def bar_chart_png(
    labels: Sequence[str],
    segments: dict[str, Sequence[float]],
    *,
    title: str,
    y_label: str,
    x_label: str = "",
    size: tuple[int, int] = SIZE,
    tick_format: Callable[[float, float | None], str] = format_k,
    colours: dict[str, str] | None = None,
    show_totals: bool = True,
) -> bytes:
    """Stacked bars: one bar per label, one segment per key of ``segments`` (stacked in order, first at the bottom).

    ``segments[name][i]`` is that segment's height in bar ``i``.  Segments that are zero
    in every bar are left out of the legend.  Returns PNG bytes.
    """
    labels = [str(label) for label in labels]
    heights = {name: [_positive(v) for v in values] for name, values in segments.items()}
    names = [name for name, values in heights.items() if any(values)]
    colours = colours or {name: colour(i) for i, name in enumerate(segments)}
    totals = [sum(values[i] for values in heights.values()) for i in range(len(labels))]
    ticks = nice_ticks(0.0, max(totals + [0.0]) * 1.08 or 1.0, 6)

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        ax.set_title(title)
        ax.set_ylabel(y_label)
        if x_label:
            ax.set_xlabel(x_label)
        ax.set_ylim(0, ticks[-1])
        _ticks(ax.yaxis, ticks, tick_format)
        ax.grid(axis="y", color=GRID)
        ax.set_axisbelow(True)
        if not labels:
            ax.set_xticks([])
            _no_data(ax)
            return

        positions = range(len(labels))
        bars = {}
        base = [0.0] * len(labels)
        for name, values in heights.items():
            bars[name] = ax.bar(positions, values, bottom=base, width=0.62, color=colours[name],
                                edgecolor="white", linewidth=0.8, label=name)
            base = [b + v for b, v in zip(base, values)]
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xticks(list(positions), labels)
        # labels wider than their bar's slot are slanted rather than run into each other
        slot = size[0] * 0.7 / len(labels)
        if max(len(label) for label in labels) * 6.5 > slot:
            ax.tick_params(axis="x", labelrotation=25)
            for text in ax.get_xticklabels():
                text.set(horizontalalignment="right", rotation_mode="anchor")
        if show_totals:
            for i, total in enumerate(totals):
                if total > 0:
                    ax.annotate(tick_format(total, None), (i, total), xytext=(0, 3), textcoords="offset points",
                                ha="center", va="bottom", fontsize=9)
        # top entry = top segment, as the bars read
        ax.legend([bars[name] for name in reversed(names)], list(reversed(names)), title="components",
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, alignment="left")

    return _render(draw, size, layout="constrained")


_GAP, _LINE = 8.0, 12.0  # points: label to point (clears the marker), one line of labels

#: Where a point's label may go, in the order tried: (dx, dy) offset in points from the point
#: and the label's alignment; further rows shift the same sides up and down.
LABEL_CANDIDATES = [
    candidate
    for shift in (distance * _LINE for distance in range(6))
    for candidate in (
        (_GAP, shift, "left", "center"), (_GAP, -shift, "left", "center"),
        (-_GAP, shift, "right", "center"), (-_GAP, -shift, "right", "center"),
        (0.0, _GAP + shift, "center", "bottom"), (0.0, -_GAP - shift, "center", "top"),
    )
]
_SHIFT = {"left": 0.0, "bottom": 0.0, "center": 0.5, "right": 1.0, "top": 1.0}


def _place_labels(ax: Axes, points: Sequence[tuple[float, float, str]], marker_radius: float,
                  fontsize: float = 9) -> list[tuple[float, float, float, float]]:
    """Annotate each point with its label, beside it where the label covers no other label or point.

    matplotlib measures the text; this only picks, per point, the first offset in
    ``LABEL_CANDIDATES`` that stays in the axes and is free.  A label pushed away from
    its point gets a leader line to it.  Returns the labels' boxes, in display pixels.
    """
    from matplotlib.font_manager import FontProperties

    renderer = ax.figure.canvas.get_renderer()
    scale = ax.figure.dpi / 72  # pixels per point
    area = ax.bbox.extents
    pixels = [ax.transData.transform((x, y)) for x, y, _ in points]
    radius = marker_radius * scale
    taken = [(px - radius, py - radius, px + radius, py + radius) for px, py in pixels]
    font = FontProperties(size=fontsize)
    pad = 2.0

    def overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i, ((x, y, label), (px, py)) in enumerate(zip(points, pixels)):
        width, height, _ = renderer.get_text_width_height_descent(label, font, ismath=False)
        best, best_score, best_box = LABEL_CANDIDATES[0], math.inf, None
        for candidate in LABEL_CANDIDATES:
            dx, dy, ha, va = candidate
            x0 = px + dx * scale - width * _SHIFT[ha] - pad
            y0 = py + dy * scale - height * _SHIFT[va] - pad
            box = (x0, y0, x0 + width + 2 * pad, y0 + height + 2 * pad)
            outside = box[0] < area[0] or box[2] > area[2] or box[1] < area[1] or box[3] > area[3]
            score = sum(overlaps(box, other) for other in taken) + 100 * outside
            if score < best_score:
                best, best_score, best_box = candidate, score, box
            if score == 0:
                break
        taken.append(best_box)
        dx, dy, ha, va = best
        far = math.hypot(dx, dy) > 2 * _GAP
        ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points",
                    ha=ha, va=va, fontsize=fontsize, color=colour(i), zorder=4,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                    arrowprops={"arrowstyle": "-", "color": colour(i), "linewidth": 0.8,
                                "shrinkA": 0, "shrinkB": marker_radius} if far else None)
    return taken[len(points):]


def line_chart_png(
    points: Sequence[tuple[float, float, str]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = SIZE,
    x_format: Callable[[float, float | None], str] = format_k,
    y_format: Callable[[float, float | None], str] = format_number,
) -> bytes:
    """Points ``(x, y, label)`` joined in the order given, each marked and labelled.  Returns PNG bytes.

    Labels are placed next to their point where they overlap neither another label nor a point.
    """
    points = [(float(x), float(y), str(label)) for x, y, label in points
              if math.isfinite(float(x)) and math.isfinite(float(y))]
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    x_span = (max(xs) - min(xs)) or abs(max(xs)) * 0.1 or 1.0
    y_span = (max(ys) - min(ys)) or abs(max(ys)) * 0.05 or 1.0
    x_low, y_low = min(xs) - x_span * 0.12, min(ys) - y_span * 0.15
    # quantities that cannot be negative (parameters, AP, drift) get no negative axis
    x_ticks = nice_ticks(max(x_low, 0.0) if min(xs) >= 0 else x_low, max(xs) + x_span * 0.12, 7)
    y_ticks = nice_ticks(max(y_low, 0.0) if min(ys) >= 0 else y_low, max(ys) + y_span * 0.15, 6)
    marker_radius = 4.5  # points

    def draw(figure: Figure) -> None:
        # fixed margins (no layout engine): label placement needs the final axes position
        figure.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.12)
        ax = figure.add_subplot()
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_xlim(x_ticks[0], x_ticks[-1])
        ax.set_ylim(y_ticks[0], y_ticks[-1])
        _ticks(ax.xaxis, x_ticks, x_format)
        _ticks(ax.yaxis, y_ticks, y_format)
        ax.grid(color=GRID)
        ax.set_axisbelow(True)
        if not points:
            _no_data(ax)
            return
        ax.plot([p[0] for p in points], [p[1] for p in points], color="#9a9a9a", linewidth=1.8, zorder=2)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=(2 * marker_radius) ** 2,
                   c=[colour(i) for i in range(len(points))], edgecolors="white", linewidths=0.8, zorder=3)
        _place_labels(ax, points, marker_radius)

    return _render(draw, size, layout=None)


@dataclass(frozen=True)
class Series:
    """One labelled set of ``(x, y)`` points; ``intervals`` (low, high) per point are drawn as error bars or a band.

    ``joined``: a line through the points in the order given (a curve, or a frontier); else markers only.
    """

    label: str
    points: Sequence[tuple[float, float]]
    intervals: Sequence[tuple[float, float]] | None = None
    joined: bool = True
    band: bool = False  # the intervals as a shaded band (a curve), not as error bars
    labels: Sequence[str] | None = None  # a small text beside each point (e.g. which run it is); none by default


def series_png(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = SIZE,
    log_x: bool = False,
    x_format: Callable[[float, float | None], str] = format_k,
    y_format: Callable[[float, float | None], str] = format_number,
) -> bytes:
    """Several series on one pair of axes, with a legend when there is more than one.  Returns PNG bytes."""
    every = [(x, y) for s in series for x, y in s.points if math.isfinite(x) and math.isfinite(y)]
    spans = [v for s in series for pair in (s.intervals or ()) for v in pair if math.isfinite(v)]
    xs = [x for x, _ in every] or [0.0, 1.0]
    ys = [y for _, y in every] + spans or [0.0, 1.0]
    y_span = (max(ys) - min(ys)) or abs(max(ys)) * 0.05 or 1.0
    y_low = min(ys) - y_span * 0.1
    y_ticks = nice_ticks(max(y_low, 0.0) if min(ys) >= 0 else y_low, max(ys) + y_span * 0.1, 6)

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_ylim(y_ticks[0], y_ticks[-1])
        _ticks(ax.yaxis, y_ticks, y_format)
        if log_x:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: x_format(value, None)))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _pos: ""))
        else:
            x_span = (max(xs) - min(xs)) or abs(max(xs)) * 0.1 or 1.0
            x_ticks = nice_ticks(max(min(xs) - x_span * 0.08, 0.0) if min(xs) >= 0 else min(xs) - x_span * 0.08,
                                 max(xs) + x_span * 0.08, 7)
            ax.set_xlim(x_ticks[0], x_ticks[-1])
            _ticks(ax.xaxis, x_ticks, x_format)
        ax.grid(color=GRID)
        ax.set_axisbelow(True)
        if not every:
            _no_data(ax)
            return
        for index, one in enumerate(series):
            if not one.points:
                continue
            px = [p[0] for p in one.points]
            py = [p[1] for p in one.points]
            colour_ = colour(index)
            if one.intervals is not None and one.band:
                ax.fill_between(px, [i[0] for i in one.intervals], [i[1] for i in one.intervals],
                                color=colour_, alpha=0.18, linewidth=0, zorder=1)
            elif one.intervals is not None:
                below = [y - i[0] for y, i in zip(py, one.intervals)]
                above = [i[1] - y for y, i in zip(py, one.intervals)]
                ax.errorbar(px, py, yerr=[below, above], fmt="none", ecolor=colour_, elinewidth=1.2, capsize=3,
                            zorder=2)
            ax.plot(px, py, color=colour_, linewidth=1.8 if one.joined else 0, marker="o", markersize=5,
                    label=one.label, zorder=3)
            for x, y, text in zip(px, py, one.labels or ()):
                ax.annotate(str(text), (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8,
                            color=colour_, zorder=4)
        if len(series) > 1:
            ax.legend(loc="best", frameon=False)

    return _render(draw, size, layout="constrained")
