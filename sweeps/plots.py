"""Charts of a sweep, drawn with PIL (no plotting dependency): validation curves, bars, label-efficiency lines."""
import math
from pathlib import Path

from sweeps.stats import summarise

CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 60, 160))


class LineChart:
    """A chart of lines against x (linear or log), values 0..hi on y, a legend on the right; drawn with PIL."""

    WIDTH, HEIGHT, LEFT, TOP, BOTTOM, LEGEND = 640, 380, 50, 34, 30, 170

    def __init__(self, title: str, xs: list[float], hi: float, log: bool = False):
        from PIL import Image, ImageDraw, ImageFont

        self.font = ImageFont.load_default(size=13)
        self.image = Image.new("RGB", (self.LEFT + self.WIDTH + self.LEGEND, self.TOP + self.HEIGHT + self.BOTTOM),
                               "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        self.scale = math.log if log else float
        self.x0, self.x1 = self.scale(min(xs)), self.scale(max(xs))
        self.x1 = self.x1 if self.x1 > self.x0 else self.x0 + 1
        self.hi, self.lines = hi, 0
        self.draw.text((10, 8), title, fill="black", font=self.font)
        for k in range(6):
            y = self.xy(min(xs), hi * k / 5)[1]
            self.draw.text((4, y - 7), f"{hi * k / 5:.2f}", fill="black", font=self.font)
            self.draw.line([(self.LEFT, y), (self.LEFT + self.WIDTH, y)], fill=(225, 225, 225))
        self.draw.rectangle([self.LEFT, self.TOP, self.LEFT + self.WIDTH, self.TOP + self.HEIGHT], outline="black")

    def xy(self, x: float, value: float) -> tuple[float, float]:
        fx = (self.scale(x) - self.x0) / (self.x1 - self.x0)
        return self.LEFT + fx * self.WIDTH, self.TOP + self.HEIGHT - max(value, 0.0) / self.hi * self.HEIGHT

    def x_labels(self, xs: list[float], fmt: str = "{:.0f}") -> None:
        for x in xs:
            self.draw.text((self.xy(x, 0)[0] - 10, self.TOP + self.HEIGHT + 6), fmt.format(x), fill="black",
                           font=self.font)

    def line(self, name: str, points: list[tuple[float, float]], band: list[tuple[float, float, float]] = ()) -> None:
        """A named line through points (x, value), dots on them, and an optional band (x, lo, hi) under it."""
        colour = CURVE_COLOURS[self.lines % len(CURVE_COLOURS)]
        if len(band) > 1:
            self.draw.polygon([self.xy(x, h) for x, _, h in band] + [self.xy(x, lo) for x, lo, _ in reversed(band)],
                              fill=(*colour, 50))
        if len(points) > 1:
            self.draw.line([self.xy(x, v) for x, v in points], fill=colour, width=2)
        for x, v in points:
            cx, cy = self.xy(x, v)
            self.draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        y = self.TOP + 6 + 18 * self.lines
        right = self.LEFT + self.WIDTH
        self.draw.line([right + 10, y + 7, right + 30, y + 7], fill=colour, width=3)
        self.draw.text((right + 36, y), name, fill="black", font=self.font)
        self.lines += 1


def curve_plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """Each named curve (validation metric against training step)."""
    points = [p for c in curves.values() for p in c]
    max_step = max([s for s, _ in points] + [1])
    chart = LineChart(title, [0, max_step], min(1.0, max([v for _, v in points] + [0.05]) * 1.05))
    chart.x_labels([max_step * k / 5 for k in range(6)])
    for name, curve in curves.items():
        chart.line(name, curve)
    chart.image.save(path)


def label_plot(bands: dict[str, list[tuple[int, float, float, float]]], path: Path, title: str) -> None:
    """fg_mIoU against labelled images (log axis): per schedule a line through the means and a band from lo to hi;
    bands: {name: [(count, mean, lo, hi), ...]}."""
    counts = sorted({c for band in bands.values() for c, *_ in band}) or [1]
    chart = LineChart(title, counts, min(1.0, max([h for band in bands.values() for *_, h in band] + [0.05]) * 1.05),
                      log=True)
    chart.x_labels(counts)
    for name, band in bands.items():
        chart.line(name, [(c, m) for c, m, _, _ in band], [(c, lo, h) for c, _, lo, h in band])
    chart.image.save(path)


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
