"""tools/evaluate.py's report: the JSON and Markdown of a scored split, the confusion heat map and the worst images."""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data.visualize import denormalize, overlay, to_palette_png
from evaluation.inference import Predictor, predict_image
from evaluation.scoring import EvalSet

CELL = 24  # heat map cell, pixels
TEXT_PAD = 4  # pixels around the heat map's texts
ABSENT_LEGEND = "grey row: class absent from the ground truth (no labelled pixel); numbers: % of each row's pixels"
HEAT_LOW, HEAT_HIGH, HEAT_ABSENT = (255, 255, 255), (8, 48, 107), (200, 200, 200)  # white -> dark blue; no GT: grey


def finite_or_none(x):
    """NaN/inf -> None, recursively, so the report is valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def build_report(metrics: dict, per_image: dict, ids: list[str], names: list[str], notes: list[str], settings: dict) -> dict:
    """The JSON report: overall numbers, per class, absent classes, per image, confusion matrix, settings."""
    mat = np.asarray(metrics["confusion_matrix"])
    per_class = []
    for c, name in enumerate(names):
        row = {"id": c, "name": name, "iou": metrics["iou"][c],
               "gt_pixels": int(mat[c].sum()), "pred_pixels": int(mat[:, c].sum())}
        if "iiou_per_class" in metrics:
            row["iiou"] = metrics["iiou_per_class"][c]
        per_class.append(row)
    overall = ["mIoU", "fg_mIoU", "iIoU", "pixel_acc", "mean_acc", "depth_mse", "depth_rmse", "depth_absrel", "depth_delta1"]
    report = {k: metrics[k] for k in overall if k in metrics}
    report.update(
        iIoU_available="iIoU" in metrics,
        absent_classes=[{"id": c, "name": names[c]} for c in metrics["absent_classes"]],
        per_class=per_class,
        per_image_mIoU={ids[i]: v for i, v in sorted(per_image.items())},
        confusion_matrix=metrics["confusion_matrix"],
        notes=notes + ([metrics["depth_nan_reason"]] if "depth_nan_reason" in metrics else []),
        settings=settings,
    )
    return finite_or_none(report)


def pct(v) -> str:
    """A 0..1 value as a percentage, or a dash."""
    return "–" if v is None else f"{100 * v:.2f}"


def markdown_table(report: dict) -> str:
    """Overall metrics, then one row per class (IoU, iIoU when available, pixel counts), then notes."""
    s = report["settings"]
    lines = [f"# {s['checkpoint']} on {s['split']} ({s['num_images']} of {s['split_size']} images)", "",
             "| metric | value |", "|---|---|"]
    for key, label in [("mIoU", "mIoU (%)"), ("fg_mIoU", "fg_mIoU (%)"), ("iIoU", "iIoU (%)"),
                       ("pixel_acc", "pixel accuracy (%)"), ("mean_acc", "mean class accuracy (%)")]:
        if key in report:
            lines.append(f"| {label} | {pct(report[key])} |")
    if not report["iIoU_available"]:
        lines.append("| iIoU | not available (no instance masks) |")
    for key in ("depth_mse", "depth_rmse", "depth_absrel", "depth_delta1"):
        if key in report:
            lines.append(f"| {key} | {'–' if report[key] is None else f'{report[key]:.4f}'} |")
    iiou = report["iIoU_available"]
    lines += ["", "| id | class | IoU (%) |" + (" iIoU (%) |" if iiou else "") + " GT pixels | predicted pixels |",
              "|---:|---|---:|" + ("---:|" if iiou else "") + "---:|---:|"]
    for r in report["per_class"]:
        iou = "absent" if r["iou"] is None else pct(r["iou"])
        lines.append(f"| {r['id']} | {r['name']} | {iou} |" + (f" {pct(r.get('iiou'))} |" if iiou else "")
                     + f" {r['gt_pixels']} | {r['pred_pixels']} |")
    tta = f"flip {'on' if s['flip'] else 'off'}, scales {','.join(map(str, s['scales']))}"
    lines += ["", f"Settings: {tta}, world size {s['world_size']}."] + [f"- {n}" for n in report["notes"]]
    if report["absent_classes"]:
        absent = ", ".join(c["name"] for c in report["absent_classes"])
        lines.append(f"- absent from label and prediction over the whole split, left out of the means: {absent}")
    return "\n".join(lines) + "\n"


def vertical_text(text: str, font) -> Image.Image:
    """Black text on white, turned to read bottom to top."""
    _, _, right, bottom = font.getbbox(text)
    strip = Image.new("RGB", (right + 2, bottom + 2), "white")
    ImageDraw.Draw(strip).text((1, 1), text, fill="black", font=font)
    return strip.rotate(90, expand=True)


def heat_map_origin(labels: list[str], font) -> tuple[int, int]:
    """(left, top) pixel of the first cell: room for an axis title and the longest class label on each side."""
    line = font.getbbox("Ag")[3] + TEXT_PAD
    longest = int(max(font.getlength(t) for t in labels)) + 2 * TEXT_PAD
    return line + longest, line + longest


def confusion_image(mat, names: list[str]) -> Image.Image:
    """Row-normalised confusion matrix as a heat map, rows: ground truth, columns: prediction, both named; grey rows
    (classes absent from the labels) explained in a legend line under it."""
    m = np.asarray(mat, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)  # (K, K)
    low, high = np.array(HEAT_LOW, float), np.array(HEAT_HIGH, float)
    rgb = low + norm[..., None] * (high - low)  # (K, K, 3)
    rgb[rows[:, 0] == 0] = HEAT_ABSENT
    cells = np.repeat(np.repeat(np.round(rgb).astype(np.uint8), CELL, 0), CELL, 1)
    cells[::CELL, :], cells[:, ::CELL] = HEAT_ABSENT, HEAT_ABSENT  # grid lines
    font = ImageFont.load_default()
    labels = [f"{c} {n}" for c, n in enumerate(names)]
    left, top = heat_map_origin(labels, font)
    bottom = top + cells.shape[0]
    width = max(left + cells.shape[1], CELL + TEXT_PAD + int(font.getlength(ABSENT_LEGEND))) + TEXT_PAD
    img = Image.new("RGB", (width, bottom + CELL + 2 * TEXT_PAD), "white")
    img.paste(Image.fromarray(cells), (left, top))
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, left + cells.shape[1], bottom], outline=HEAT_ABSENT)
    draw.text((left + cells.shape[1] // 2, TEXT_PAD), "prediction", fill="black", font=font, anchor="mt")
    axis = vertical_text("ground truth", font)
    img.paste(axis, (TEXT_PAD, top + (cells.shape[0] - axis.height) // 2))
    for c, text in enumerate(labels):
        draw.text((left - TEXT_PAD, top + c * CELL + CELL // 2), text, fill="black", font=font, anchor="rm")
        name = vertical_text(text, font)
        img.paste(name, (left + c * CELL + (CELL - name.width) // 2, top - TEXT_PAD - name.height))
    for (r, c), v in np.ndenumerate(norm):
        if v >= 0.005:
            draw.text((left + c * CELL + CELL // 2, top + r * CELL + CELL // 2), str(round(100 * v)),
                      fill="white" if v > 0.5 else "black", font=font, anchor="mm")
    legend = bottom + TEXT_PAD + CELL // 2
    draw.rectangle([TEXT_PAD, legend - CELL // 4, TEXT_PAD + CELL // 2, legend + CELL // 4], fill=HEAT_ABSENT)
    draw.text((CELL + TEXT_PAD, legend), ABSENT_LEGEND, fill="black", font=font, anchor="lm")
    return img


def save_worst(run: Predictor, dataset: EvalSet, per_image: dict, n: int, out_dir: Path, scales, flip, device) -> list:
    """Panels (photo | label overlay | prediction overlay) and palette predictions of the n lowest-mIoU images."""
    scored = sorted((v, i) for i, v in per_image.items() if not math.isnan(v))[:n]
    out_dir.mkdir(parents=True, exist_ok=True)
    worst = []
    for rank, (score, idx) in enumerate(scored):
        sample = dataset[idx]
        x = sample["image"].as_subclass(torch.Tensor)
        pred = predict_image(run, x.to(device), scales, flip)["seg"].argmax(0).cpu()  # (h, w)
        image, label, name = denormalize(x), sample["label"].as_subclass(torch.Tensor), dataset.ids[idx]
        palette = dataset.preset.palette
        panel = torch.cat([image, overlay(image, label, palette), overlay(image, pred, palette)], dim=2)
        stem = f"{rank:03d}_{name}"
        Image.fromarray(panel.permute(1, 2, 0).numpy()).save(out_dir / f"{stem}.png")
        to_palette_png(pred, palette).save(out_dir / f"{stem}_pred.png")
        worst.append({"rank": rank, "id": name, "mIoU": score, "file": f"{stem}.png"})
    return worst


def write_outputs(report: dict, output: Path, names: list[str]) -> None:
    """FILE.json, FILE.md and FILE_confusion.png side by side."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(markdown_table(report))
    confusion_image(report["confusion_matrix"], names).save(output.with_name(output.stem + "_confusion.png"))
