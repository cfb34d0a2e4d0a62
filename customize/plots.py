"""Small charts drawn with PIL alone (the project takes no plotting dependency): `bar_chart` (one value per row,
e.g. a LoRA's update norm per UNet block, `customize inspect --plot`) and `range_chart` (per row, the 5th-95th
percentile range and median of one or more named series, e.g. ZipLoRA merger vectors per layer, with optional
per-row extra values in a small bar column), `heatmap_row` (heat maps over an image, one labelled tile per
map: the per-word cross-attention maps of `customize.attention.attention_heatmaps`, `customize edit`) and
`line_chart` (named series of (x, y) points over a shared x axis, e.g. a validation score against the training
step). Each returns a white-background PIL image, readable at 1x with PIL's
default font, whose height grows with the number of rows; `save_chart` writes one atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# One colour per series, in order (well-separated hues; the first is also bar_chart's bar colour).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207))
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MUTED = (110, 110, 110)  # subtitles, tick labels, the extra column's bars
GRID = (225, 225, 225)
STRIPE = (246, 246, 246)  # every other row, so a long table stays readable
PAD = 10
GAP = 8  # between a row's label and its bars
MAX_LABEL_SHARE = 0.45  # of the width; longer labels are shortened in the middle


def _font():
    return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def _line_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ag|_")
    return int(math.ceil(bottom - min(top, 0))) + 4


def _elide(font, text: str, max_width: int) -> str:
    """`text`, or its head and tail around '...' when wider than `max_width` (block names differ at both ends)."""
    if _text_width(font, text) <= max_width:
        return text
    keep = len(text)
    while keep > 2:
        keep -= 1
        head = (keep + 1) // 2
        short = f"{text[:head]}...{text[len(text) - (keep - head):]}"
        if _text_width(font, short) <= max_width:
            return short
    return text[:1] + "..."


def _value_text(value: float) -> str:
    return f"{value:#.4g}" if math.isfinite(value) else str(value)


def _header(draw, font, title: str, subtitle: str, width: int) -> int:
    """Title (and a muted subtitle) at the top; returns the y below them."""
    y = PAD
    draw.text((PAD, y), _elide(font, title, width - 2 * PAD), fill=TEXT, font=font)
    y += _line_height(font)
    if subtitle:
        draw.text((PAD, y), _elide(font, subtitle, width - 2 * PAD), fill=MUTED, font=font)
        y += _line_height(font)
    return y + 4


def bar_chart(labels, values, *, title: str, value_label: str = "", width: int = 640) -> Image.Image:
    """Horizontal bars, one row per label: the label on the left, a bar from 0 proportional to the value (the
    largest value spans the bar area), the value printed at the bar's end. For non-negative values (norms,
    counts): a zero, negative or non-finite value gets no bar, only its printed value. `value_label` names the
    values (printed under the title). Rows are a fixed height, so the image grows with them; no rows gives a
    small image that says so."""
    labels, values = [str(x) for x in labels], [float(v) for v in values]
    if len(labels) != len(values):
        raise ValueError(f"bar_chart: {len(labels)} labels for {len(values)} values")
    font = _font()
    line = _line_height(font)
    row_h = line + 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top = _header(probe, font, title, value_label, width)
    if not labels:
        image = Image.new("RGB", (width, top + line + PAD), BACKGROUND)
        draw = ImageDraw.Draw(image)
        _header(draw, font, title, value_label, width)
        draw.text((PAD, top), "(nothing to show)", fill=MUTED, font=font)
        return image

    label_w = min(max(_text_width(font, s) for s in labels), int(width * MAX_LABEL_SHARE))
    texts = [_value_text(v) for v in values]
    value_w = max(_text_width(font, t) for t in texts)
    x0 = PAD + label_w + GAP
    span = max(width - PAD - value_w - 4 - x0, 40)  # the bar area; a narrow `width` is widened to keep one
    width = max(width, x0 + span + 4 + value_w + PAD)
    height = top + len(labels) * row_h + PAD
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _header(draw, font, title, value_label, width)

    finite = [v for v in values if math.isfinite(v) and v > 0]
    vmax = max(finite, default=0.0)
    for i, (label, value, text) in enumerate(zip(labels, values, texts)):
        y = top + i * row_h
        if i % 2:
            draw.rectangle([0, y, width - 1, y + row_h - 1], fill=STRIPE)
        draw.text((PAD, y + 3), _elide(font, label, label_w), fill=TEXT, font=font)
        end = x0
        if vmax > 0 and math.isfinite(value) and value > 0:
            end = x0 + max(1, round(span * value / vmax))
            draw.rectangle([x0, y + 3, end, y + row_h - 4], fill=PALETTE[0])
        draw.text((end + 4, y + 3), text, fill=TEXT, font=font)
    draw.line([x0, top, x0, height - PAD], fill=MUTED, width=1)  # the zero line
    return image


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [k * step for k in range(first, last + 1)]


def _tick_text(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step)))
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-4):
        return f"{value:.2g}"
    return f"{value:.{decimals}f}"


def _percentiles(values) -> tuple[float, float, float] | None:
    """(5th, 50th, 95th) percentile of the finite entries, None when there are none."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    p5, p50, p95 = np.percentile(flat, [5, 50, 95])
    return float(p5), float(p50), float(p95)


def range_chart(labels, series: dict[str, list], *, title: str, extra: dict[str, list[float]] | None = None,
                width: int = 720, extra_width: int = 90) -> Image.Image:
    """Per row (label) and per named series, a horizontal line from the 5th to the 95th percentile of that row's
    values with a dot at the median, one colour per series (`PALETTE`, in the order of `series`), on one shared x
    axis with round tick values; a legend under the title. `series[name][i]` is any array of row i's values
    (non-finite entries are left out; an empty one draws nothing). `extra[name][i]`, optional, is one number per
    row shown in a column of its own: the value printed next to a small bar, the column's scale max(1, largest
    value), so values in [0, 1] (an overlap, a |cos|) read on a fixed scale.

    A row whose values are all equal is a dot (p5 = p50 = p95); when every row is, the axis is widened around
    them so it still has a span."""
    labels = [str(x) for x in labels]
    extra = dict(extra or {})
    for kind, table in (("series", series), ("extra", extra)):
        for name, rows in table.items():
            if len(rows) != len(labels):
                raise ValueError(f"range_chart: {kind} {name!r} has {len(rows)} rows for {len(labels)} labels")
    names = list(series)
    if len(names) > len(PALETTE):
        raise ValueError(f"range_chart: at most {len(PALETTE)} series, got {len(names)}")
    stats = {name: [_percentiles(v) for v in rows] for name, rows in series.items()}
    ends = [x for rows in stats.values() for s in rows if s is not None for x in (s[0], s[2])]
    lo, hi = (min(ends), max(ends)) if ends else (0.0, 1.0)
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        half = 0.1 * abs(lo) if lo else 0.5
        lo, hi = lo - half, hi + half
    ticks = _nice_ticks(lo, hi)
    lo, hi = ticks[0], ticks[-1]
    step = ticks[1] - ticks[0]

    font = _font()
    line = _line_height(font)
    lane = 8  # the height of one series' line within a row
    row_h = max(line + 4, len(names) * lane + 6)
    label_w = min(max((_text_width(font, s) for s in labels), default=0), int(width * MAX_LABEL_SHARE))
    x0 = PAD + label_w + GAP
    x1 = width - PAD - len(extra) * extra_width - 8  # the plot area's right end
    if x1 - x0 < 80:
        width += 80 - (x1 - x0)
        x1 = x0 + 80

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top = _header(probe, font, title, "", width)
    legend_y = top
    top += line + 4  # the legend line; extra columns put their names on it too
    height = top + max(len(labels), 1) * row_h + 6 + line + PAD  # rows, the axis, its tick labels
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _header(draw, font, title, "", width)

    x = PAD
    for k, name in enumerate(names):
        draw.rectangle([x, legend_y + 2, x + 10, legend_y + 10], fill=PALETTE[k])
        draw.text((x + 14, legend_y), name, fill=TEXT, font=font)
        x += 14 + _text_width(font, name) + 16
    draw.text((x, legend_y), "line: 5th-95th percentile, dot: median", fill=MUTED, font=font)
    columns = [x1 + 8 + c * extra_width for c in range(len(extra))]
    for cx, name in zip(columns, extra):
        draw.text((cx, legend_y), _elide(font, name, extra_width - 4), fill=TEXT, font=font)

    def to_x(v: float) -> int:
        return round(x0 + (v - lo) / (hi - lo) * (x1 - x0))

    bottom = top + max(len(labels), 1) * row_h
    for i in range(len(labels)):
        if i % 2:
            draw.rectangle([0, top + i * row_h, width - 1, top + (i + 1) * row_h - 1], fill=STRIPE)
    for t in ticks:
        draw.line([to_x(t), top, to_x(t), bottom], fill=GRID, width=1)
    if not labels:
        draw.text((x0, top + 3), "(nothing to show)", fill=MUTED, font=font)
    scales = {name: max([1.0] + [v for v in rows if math.isfinite(v)]) for name, rows in extra.items()}
    bar_w = extra_width - 8 - _text_width(font, "0.00") - 4
    for i, label in enumerate(labels):
        y = top + i * row_h
        draw.text((PAD, y + (row_h - line) // 2 + 1), _elide(font, label, label_w), fill=TEXT, font=font)
        for k, name in enumerate(names):
            s = stats[name][i]
            if s is None:
                continue
            cy = y + 3 + k * lane + lane // 2
            draw.line([to_x(s[0]), cy, to_x(s[2]), cy], fill=PALETTE[k], width=3)
            mx = to_x(s[1])
            draw.ellipse([mx - 3, cy - 3, mx + 3, cy + 3], fill=PALETTE[k], outline=TEXT)
        for cx, (name, rows) in zip(columns, extra.items()):
            value = float(rows[i])
            if math.isfinite(value) and value > 0:
                draw.rectangle([cx, y + 4, cx + max(1, round(bar_w * value / scales[name])), y + row_h - 5],
                               fill=MUTED)
            draw.text((cx + bar_w + 4, y + (row_h - line) // 2 + 1), f"{value:.2f}", fill=TEXT, font=font)
    draw.line([x0, bottom, x1, bottom], fill=MUTED, width=1)
    for t in ticks:
        tx = to_x(t)
        draw.line([tx, bottom, tx, bottom + 3], fill=MUTED, width=1)
        text = _tick_text(t, step)
        draw.text((tx - _text_width(font, text) // 2, bottom + 5), text, fill=MUTED, font=font)
    return image


def heat_colour(heat: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours for heat in [0, 1]: black -> red -> yellow -> white, brightness rising with the
    heat (so the hottest pixel of an overlay on a flat image is its brightest, and it reads in grey too)."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)[..., None]
    ramps = np.clip(3.0 * h - np.asarray([0.0, 1.0, 2.0], dtype=np.float32), 0.0, 1.0)  # (..., 3): R, G, B
    return (255 * ramps).round().astype(np.uint8)


def heatmap_row(image: Image.Image, maps, labels, *, tile: int = 128, alpha: float = 0.6,
                title: str = "") -> Image.Image:
    """A row of tiles, one per map: the image (grey, resized to tile x tile) under the map as a heat overlay,
    pixel = (1 - alpha) grey + alpha heat_colour(map / max(map)), the map resized bilinearly to the tile; each
    tile's label under it (shortened in the middle when wider than the tile). maps: (W, h, w) array-like of
    non-negative values, labels: W strings. Each map is scaled by its own maximum (where a word attends,
    not how much), so an all-zero map is a dark tile."""
    maps = np.asarray(maps, dtype=np.float32)
    labels = [str(x) for x in labels]
    if maps.ndim != 3 or len(labels) != maps.shape[0]:
        raise ValueError(f"heatmap_row: {len(labels)} labels for maps of shape {tuple(maps.shape)} (want (W, h, w))")
    font = _font()
    line = _line_height(font)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top = _header(probe, font, title, "", max(1, maps.shape[0]) * (tile + GAP) + PAD) if title else PAD
    width = PAD + max(1, maps.shape[0]) * (tile + GAP) - GAP + PAD
    canvas = Image.new("RGB", (width, top + tile + 4 + line + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        _header(draw, font, title, "", width)
    grey = np.asarray(image.convert("L").resize((tile, tile), Image.Resampling.BICUBIC), dtype=np.float32)
    grey = np.repeat(grey[..., None], 3, axis=-1)  # (tile, tile, 3)
    for k, (m, label) in enumerate(zip(maps, labels)):
        peak = float(m.max()) if m.size and np.isfinite(m).all() else 0.0
        scaled = m / peak if peak > 0 else np.zeros_like(m)
        heat = np.asarray(Image.fromarray(scaled.astype(np.float32), mode="F").resize((tile, tile),
                                                                                      Image.Resampling.BILINEAR))
        pixels = (1 - alpha) * grey + alpha * heat_colour(heat).astype(np.float32)
        x = PAD + k * (tile + GAP)
        canvas.paste(Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8)), (x, top))
        text = _elide(font, label, tile)
        draw.text((x + (tile - _text_width(font, text)) // 2, top + tile + 4), text, fill=TEXT, font=font)
    return canvas
def line_chart(series: dict[str, list], *, title: str, x_label: str = "", width: int = 640,
               height: int = 360) -> Image.Image:
    """One line per named series through its (x, y) points (sorted by x), a dot on each point, one colour per
    series (`PALETTE`, in order) with a legend under the title, on shared axes with round tick values (y from the
    data's range, widened to a span when flat; a series of values in [0, 1] gets the axis [0, 1], so scores read
    on a fixed scale). Non-finite points are left out; no point at all gives the axes and "(nothing to show)"."""
    names = list(series)
    if len(names) > len(PALETTE):
        raise ValueError(f"line_chart: at most {len(PALETTE)} series, got {len(names)}")
    points = {n: sorted((float(x), float(y)) for x, y in series[n] if math.isfinite(float(x)) and math.isfinite(float(y)))
              for n in names}
    xs = [x for p in points.values() for x, _ in p]
    ys = [y for p in points.values() for _, y in p]
    if ys and min(ys) >= 0 and max(ys) <= 1:
        ylo, yhi = 0.0, 1.0
    else:
        ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    spans = []
    for lo, hi in ((xlo, xhi), (ylo, yhi)):
        if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
            half = 0.1 * abs(lo) if lo else 0.5
            lo, hi = lo - half, hi + half
        ticks = _nice_ticks(lo, hi)
        spans.append((ticks, ticks[1] - ticks[0]))
    (xticks, xstep), (yticks, ystep) = spans

    font = _font()
    line = _line_height(font)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    top = _header(draw, font, title, "", width)
    x = PAD
    for k, name in enumerate(names):
        draw.rectangle([x, top + 2, x + 10, top + 10], fill=PALETTE[k])
        draw.text((x + 14, top), name, fill=TEXT, font=font)
        x += 14 + _text_width(font, name) + 16
    top += line + 6
    ylabels = [_tick_text(t, ystep) for t in yticks]
    x0 = PAD + max(_text_width(font, t) for t in ylabels) + 6
    x1 = width - PAD - _text_width(font, _tick_text(xticks[-1], xstep)) // 2
    y1 = height - PAD - line - (line if x_label else 0) - 4  # the x axis
    y0 = top

    def to_px(px: float, py: float) -> tuple[int, int]:
        return (round(x0 + (px - xticks[0]) / (xticks[-1] - xticks[0]) * (x1 - x0)),
                round(y1 - (py - yticks[0]) / (yticks[-1] - yticks[0]) * (y1 - y0)))

    for t, text in zip(yticks, ylabels):
        _, ty = to_px(xticks[0], t)
        draw.line([x0, ty, x1, ty], fill=GRID, width=1)
        draw.text((x0 - 6 - _text_width(font, text), ty - line // 2), text, fill=MUTED, font=font)
    for t in xticks:
        tx, _ = to_px(t, yticks[0])
        draw.line([tx, y0, tx, y1], fill=GRID, width=1)
        text = _tick_text(t, xstep)
        draw.text((tx - _text_width(font, text) // 2, y1 + 4), text, fill=MUTED, font=font)
    draw.line([x0, y1, x1, y1], fill=MUTED, width=1)
    draw.line([x0, y0, x0, y1], fill=MUTED, width=1)
    if x_label:
        draw.text(((x0 + x1 - _text_width(font, x_label)) // 2, y1 + 4 + line), x_label, fill=MUTED, font=font)
    if not ys:
        draw.text((x0 + 6, y0 + 4), "(nothing to show)", fill=MUTED, font=font)
    for k, name in enumerate(names):
        pts = [to_px(px, py) for px, py in points[name]]
        if len(pts) > 1:
            draw.line(pts, fill=PALETTE[k], width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=PALETTE[k], outline=TEXT)
    return image


def save_chart(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a chart atomically (temporary file, then rename), the format from the suffix (PNG without one)."""
    from customize.data.images import save_image_atomic  # here: customize.data's package imports are heavy

    return save_image_atomic(image, path)
