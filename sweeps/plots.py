"""Charts of a sweep, drawn with PIL (no plotting dependency): validation curves, bars, label-efficiency lines."""
import math
from pathlib import Path

from sweeps.stats import summarise

CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 60, 160))


def curve_plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """Line chart of each named curve (validation metric against training step), drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    width, height, left, top, bottom, legend_w = 640, 380, 50, 34, 30, 170
    img = Image.new("RGB", (left + width + legend_w, top + height + bottom), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=font)
    points = [p for c in curves.values() for p in c]
    max_step = max([s for s, _ in points] + [1])
    hi = min(1.0, max([v for _, v in points] + [0.05]) * 1.05)

    def xy(step: float, value: float) -> tuple[float, float]:
        return left + step / max_step * width, top + height - value / hi * height

    draw.rectangle([left, top, left + width, top + height], outline="black")
    for k in range(6):
        value, step = hi * k / 5, max_step * k / 5
        draw.text((4, xy(0, value)[1] - 7), f"{value:.2f}", fill="black", font=font)
        draw.line([xy(0, value), xy(max_step, value)], fill=(225, 225, 225))
        draw.text((xy(step, 0)[0] - 10, top + height + 6), f"{step:.0f}", fill="black", font=font)
    for i, (name, curve) in enumerate(curves.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        if len(curve) > 1:
            draw.line([xy(s, v) for s, v in curve], fill=colour, width=2)
        for s, v in curve:
            x, y = xy(s, v)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        y = top + 6 + 18 * i
        draw.line([left + width + 10, y + 7, left + width + 30, y + 7], fill=colour, width=3)
        draw.text((left + width + 36, y), name, fill="black", font=font)
    img.save(path)


def bar_chart(rows: list, results: dict, path: Path, metric: str = "mIoU") -> None:
    """Horizontal bars of `metric` (mean, whiskers at ± std) for every row of both tables, drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    label_w, bar_w, row_h, top = 190, 480, 26, 40
    img = Image.new("RGB", (label_w + bar_w + 130, top + row_h * len(rows) + 30), "white")
    draw = ImageDraw.Draw(img)
    stats = [summarise([r[metric] for r in results.get(row.cell, []) if metric in r]) for row in rows]
    scale = bar_w / max([0.05] + [m + s for m, s, _ in filter(None, stats)])
    draw.text((10, 10), f"{metric}, mean ± std over seeds, one bar per row (2: table 2, 3: table 3)", fill="black", font=font)
    for i, (row, stat) in enumerate(zip(rows, stats)):
        y = top + i * row_h
        colour = (70, 110, 180) if row.table == "Table 2" else (220, 130, 50)
        draw.text((10, y + 4), f"{row.table[-1]}: {row.cell.name}", fill="black", font=font)
        if stat is None:
            draw.text((label_w, y + 4), "not run", fill="grey", font=font)
            continue
        mean, std, _ = stat
        x0 = label_w
        draw.rectangle([x0, y + 4, x0 + mean * scale, y + row_h - 4], fill=colour)
        if std > 0:
            cy = y + row_h // 2
            lo = max(mean - std, 0.0)  # metrics live in 0..1: the whisker stops at the axis
            draw.line([x0 + lo * scale, cy, x0 + (mean + std) * scale, cy], fill="black", width=2)
            for x in (lo, mean + std):
                draw.line([x0 + x * scale, cy - 5, x0 + x * scale, cy + 5], fill="black", width=2)
        draw.text((x0 + (mean + std) * scale + 8, y + 4), f"{mean:.4f}", fill="black", font=font)
    img.save(path)


def label_plot(bands: dict[str, list[tuple[int, float, float, float]]], path: Path, title: str) -> None:
    """fg_mIoU against labelled images (log axis): per schedule a line through the means and a band from lo to hi;
    bands: {name: [(count, mean, lo, hi), ...]}."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    width, height, left, top, bottom, legend_w = 640, 380, 50, 34, 30, 170
    img = Image.new("RGB", (left + width + legend_w, top + height + bottom), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    draw.text((10, 8), title, fill="black", font=font)
    counts = sorted({c for band in bands.values() for c, *_ in band}) or [1]
    lo_x, hi_x = math.log(counts[0]), math.log(counts[-1]) if counts[-1] > counts[0] else math.log(counts[0]) + 1
    hi = min(1.0, max([h for band in bands.values() for *_, h in band] + [0.05]) * 1.05)

    def xy(count: float, value: float) -> tuple[float, float]:
        return left + (math.log(count) - lo_x) / (hi_x - lo_x) * width, top + height - max(value, 0.0) / hi * height

    draw.rectangle([left, top, left + width, top + height], outline="black")
    for k in range(6):
        value = hi * k / 5
        draw.text((4, xy(counts[0], value)[1] - 7), f"{value:.2f}", fill="black", font=font)
        draw.line([xy(counts[0], value), xy(math.exp(hi_x), value)], fill=(225, 225, 225))
    for count in counts:
        draw.text((xy(count, 0)[0] - 10, top + height + 6), str(count), fill="black", font=font)
    for i, (name, band) in enumerate(bands.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        if len(band) > 1:
            draw.polygon([xy(c, h) for c, _, _, h in band] + [xy(c, lo) for c, _, lo, _ in reversed(band)],
                         fill=(*colour, 50))
            draw.line([xy(c, m) for c, m, _, _ in band], fill=colour, width=2)
        for c, m, _, _ in band:
            x, y = xy(c, m)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        y = top + 6 + 18 * i
        draw.line([left + width + 10, y + 7, left + width + 30, y + 7], fill=colour, width=3)
        draw.text((left + width + 36, y), name, fill="black", font=font)
    img.save(path)
