"""Small, dependency-free PNG charts drawn with Pillow: stacked bars and labelled line plots.

Deterministic: the same data gives the same bytes (no timestamps, no randomness).
Text uses Pillow's built-in font (scalable where Pillow has FreeType, the fixed
bitmap font otherwise), so nothing depends on the fonts installed on the machine.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

SIZE = (900, 500)

#: Distinct colours (the "tab10" palette), then a few more.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#ad494a", "#637939", "#7b4173",
)

BACKGROUND = "white"
INK = "#222222"
GRID = "#e3e3e3"
AXIS = "#555555"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=None)
def font(size: int) -> Font:
    """Pillow's default font at ``size`` pixels (the fixed bitmap font where that is all there is)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # old Pillow, or no FreeType
        return ImageFont.load_default()


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


# ------------------------------------------------------------------ drawing helpers


def _text_size(draw: ImageDraw.ImageDraw, text: str, fnt: Font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fnt: Font,
          fill: str = INK, anchor: str = "la") -> None:
    draw.text((round(xy[0]), round(xy[1])), text, font=fnt, fill=fill, anchor=anchor)


def _vertical_text(image: Image.Image, centre: tuple[float, float], text: str, fnt: Font, fill: str = INK) -> None:
    """Text rotated 90° (reading bottom to top), centred on ``centre``."""
    probe = ImageDraw.Draw(image)
    width, height = _text_size(probe, text, fnt)
    layer = Image.new("L", (width + 4, height + 8), 0)
    ImageDraw.Draw(layer).text((2, 4), text, font=fnt, fill=255, anchor="la")
    layer = layer.rotate(90, expand=True)
    ink = Image.new("RGB", layer.size, fill)
    image.paste(ink, (round(centre[0] - layer.width / 2), round(centre[1] - layer.height / 2)), layer)


def _fit(draw: ImageDraw.ImageDraw, text: str, fnt: Font, width: float) -> str:
    """``text``, cut with '..' until it fits in ``width`` pixels."""
    if _text_size(draw, text, fnt)[0] <= width:
        return text
    while len(text) > 1 and _text_size(draw, text + "..", fnt)[0] > width:
        text = text[:-1]
    return text + ".."


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt: Font, width: float, lines: int = 2) -> list[str]:
    """Split ``text`` at '_', '-', ' ' or '.' into at most ``lines`` lines of ``width`` pixels."""
    if _text_size(draw, text, fnt)[0] <= width:
        return [text]
    words: list[str] = []
    current = ""
    for char in text:
        current += char
        if char in "_- .":
            words.append(current)
            current = ""
    if current:
        words.append(current)
    out: list[str] = []
    line = ""
    for word in words:
        if line and _text_size(draw, line + word, fnt)[0] > width:
            out.append(line)
            line = word
        else:
            line += word
    out.append(line)
    if len(out) > lines:
        out = out[: lines - 1] + ["".join(out[lines - 1:])]
    return [_fit(draw, part, fnt, width) for part in out]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _title(draw: ImageDraw.ImageDraw, text: str, width: int) -> None:
    fnt = font(18)
    _text(draw, (width / 2, 14), _fit(draw, text, fnt, width - 20), fnt, anchor="ma")


def _no_data(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], message: str) -> None:
    _text(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), message, font(14), fill=AXIS, anchor="mm")


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
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    _title(draw, title, width)

    names = [name for name, values in segments.items() if any(v for v in values)]
    colours = colours or {name: colour(i) for i, name in enumerate(segments)}
    legend_font = font(13)
    legend_width = max([_text_size(draw, name, legend_font)[0] for name in names] + [40]) + 40
    left, top, right, bottom = 78, 56, width - legend_width - 20, height - (72 if x_label else 56)
    totals = [sum(float(segments[name][i]) for name in segments) for i in range(len(labels))]

    ticks = nice_ticks(0.0, max(totals + [0.0]) * 1.08 or 1.0, 6)
    y_max = ticks[-1]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else None

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / y_max

    tick_font = font(12)
    for tick in ticks:
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        draw.line([(left - 5, y), (left, y)], fill=AXIS, width=1)
        _text(draw, (left - 8, y), tick_format(tick, step), tick_font, anchor="rm")
    _vertical_text(image, (18, (top + bottom) / 2), y_label, font(13))

    if not labels:
        _no_data(draw, (left, top, right, bottom), "nothing measured yet")
    slot = (right - left) / max(len(labels), 1)
    bar = min(slot * 0.62, 90)
    label_font = font(12) if slot >= 60 else font(11)
    for i, label in enumerate(labels):
        x0 = left + slot * i + (slot - bar) / 2
        base = 0.0
        for name in segments:
            value = float(segments[name][i])
            if value <= 0:
                continue
            y_top, y_bottom = y_of(base + value), y_of(base)
            draw.rectangle([x0, y_top, x0 + bar, y_bottom], fill=colours[name], outline="white")
            base += value
        if show_totals and totals[i] > 0:
            _text(draw, (x0 + bar / 2, y_of(totals[i]) - 4), tick_format(totals[i], None), tick_font, anchor="md")
        for line_no, line in enumerate(_wrap(draw, str(label), label_font, slot - 4, 2 if x_label else 3)):
            _text(draw, (left + slot * (i + 0.5), bottom + 6 + 14 * line_no), line, label_font, anchor="ma")

    draw.line([(left, top), (left, bottom)], fill=AXIS, width=1)
    draw.line([(left, bottom), (right, bottom)], fill=AXIS, width=1)
    if x_label:
        _text(draw, ((left + right) / 2, height - 10), x_label, font(13), anchor="md")

    # legend, top entry = top segment, as the bars read
    x_legend, y_legend = right + 20, top
    _text(draw, (x_legend, y_legend), "components", font(13), fill=AXIS)
    y_legend += 22
    for name in reversed(names):
        draw.rectangle([x_legend, y_legend + 1, x_legend + 14, y_legend + 15], fill=colours[name])
        _text(draw, (x_legend + 22, y_legend + 8), name, legend_font, anchor="lm")
        y_legend += 22
    return _png(image)


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
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    _title(draw, title, width)
    left, top, right, bottom = 84, 56, width - 30, height - 64

    xs = [float(p[0]) for p in points] or [0.0, 1.0]
    ys = [float(p[1]) for p in points] or [0.0, 1.0]
    x_span = (max(xs) - min(xs)) or abs(max(xs)) * 0.1 or 1.0
    y_span = (max(ys) - min(ys)) or abs(max(ys)) * 0.05 or 1.0
    x_low, y_low = min(xs) - x_span * 0.12, min(ys) - y_span * 0.15
    # quantities that cannot be negative (parameters, AP, drift) get no negative axis
    x_ticks = nice_ticks(max(x_low, 0.0) if min(xs) >= 0 else x_low, max(xs) + x_span * 0.12, 7)
    y_ticks = nice_ticks(max(y_low, 0.0) if min(ys) >= 0 else y_low, max(ys) + y_span * 0.15, 6)
    x_step = x_ticks[1] - x_ticks[0]
    y_step = y_ticks[1] - y_ticks[0]

    def to_xy(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return left + (right - left) * fx, bottom - (bottom - top) * fy

    tick_font = font(12)
    for tick in y_ticks:
        _, y = to_xy(x_ticks[0], tick)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        draw.line([(left - 5, y), (left, y)], fill=AXIS, width=1)
        _text(draw, (left - 8, y), y_format(tick, y_step), tick_font, anchor="rm")
    for tick in x_ticks:
        x, _ = to_xy(tick, y_ticks[0])
        draw.line([(x, top), (x, bottom)], fill=GRID, width=1)
        draw.line([(x, bottom), (x, bottom + 5)], fill=AXIS, width=1)
        _text(draw, (x, bottom + 8), x_format(tick, x_step), tick_font, anchor="ma")
    draw.line([(left, top), (left, bottom)], fill=AXIS, width=1)
    draw.line([(left, bottom), (right, bottom)], fill=AXIS, width=1)
    _text(draw, ((left + right) / 2, height - 10), x_label, font(13), anchor="md")
    _vertical_text(image, (18, (top + bottom) / 2), y_label, font(13))

    if not points:
        _no_data(draw, (left, top, right, bottom), "nothing measured yet")
        return _png(image)

    pixels = [to_xy(float(x), float(y)) for x, y, _ in points]
    if len(pixels) > 1:
        draw.line(pixels, fill="#9a9a9a", width=2, joint="curve")
    radius = 6
    taken = [(px - radius - 2, py - radius - 2, px + radius + 2, py + radius + 2) for px, py in pixels]
    for i, (px, py) in enumerate(pixels):
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour(i), outline="white", width=1)

    label_font = font(12)
    for i, ((px, py), (_, _, label)) in enumerate(zip(pixels, points)):
        text = _fit(draw, str(label), label_font, 220)
        tw, th = _text_size(draw, text, label_font)
        box = _place_label(px, py, tw, th, taken, (left + 2, top + 2, right - 2, bottom - 2))
        taken.append(box)
        # a label pushed away from its point gets a leader line to it
        near_x = min(max(px, box[0]), box[2])
        near_y = min(max(py, box[1]), box[3])
        if math.hypot(near_x - px, near_y - py) > radius + 8:
            draw.line([(px, py), (near_x, near_y)], fill=colour(i), width=1)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=BACKGROUND)
        _text(draw, (box[0], box[1] + th / 2), text, label_font, fill=colour(i), anchor="lm")
    return _png(image)


def _place_label(px: float, py: float, tw: float, th: float, taken: list[tuple[float, float, float, float]],
                 area: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A box of ``tw`` × ``th`` near (px, py), inside ``area``, overlapping nothing in ``taken`` if possible."""
    gap = 9
    candidates = []
    for distance in (0, 1, 2, 3, 4, 5):
        shift = distance * (th + 3)
        candidates += [
            (px + gap, py - th / 2 - shift),            # right
            (px + gap, py - th / 2 + shift),
            (px - gap - tw, py - th / 2 - shift),       # left
            (px - gap - tw, py - th / 2 + shift),
            (px - tw / 2, py - gap - th - shift),       # above
            (px - tw / 2, py + gap + shift),            # below
        ]

    def clamp(x: float, y: float) -> tuple[float, float, float, float]:
        x = min(max(x, area[0]), area[2] - tw)
        y = min(max(y, area[1]), area[3] - th)
        return (x, y, x + tw, y + th)

    def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    boxes = [clamp(x, y) for x, y in candidates]
    for box in boxes:
        if not any(overlaps(box, other) for other in taken):
            return box
    return min(boxes, key=lambda b: sum(overlaps(b, other) for other in taken))
