"""Score a checkpoint on a VOC-format split: JSON report, Markdown table, confusion heat map, worst images.

    python tools/evaluate.py --checkpoint runs/latest --data-root ~/data/VOCdevkit --split val
    python tools/evaluate.py --checkpoint runs/latest/checkpoints/best --data-root ~/data/VOCdevkit \\
        --flip --scales 0.75,1,1.25 --save-worst 10 --output eval/val_tta.json
    accelerate launch --multi_gpu --num_processes 8 tools/evaluate.py --checkpoint ... --data-root ...

Every image is predicted alone at its label's original resolution by evaluation/inference.py, the rule
train.py's validation and tools/predict.py use, so the numbers do not depend on --batch-size or the number of
processes, and predict.py's masks scored against the labels give this report's confusion matrix. Metrics come
from evaluation/metrics.py, the code train.py's validation uses; README "Evaluation and metric conventions".
--checkpoint may also be an exported folder with --backend onnx|onnx-int8, or an exported .onnx file.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that `python tools/evaluate.py` finds the repo

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data import PRESETS, Preset, collate, get_transform, guess_dataset, prepare_root
from data.visualize import colorize_label, denormalize, to_palette_png
from data.voc import depth_fix_command
from models.io import CheckpointError, resolve_checkpoint
from evaluation.inference import (BACKENDS, Predictor, load_config, load_predictor, onnx_file, predict_batch,
                                  predict_image)
from evaluation.metrics import ConfusionMatrix, SegEvaluator

CELL = 24  # heat map cell, pixels
TEXT_PAD = 4  # pixels around the heat map's texts
ABSENT_LEGEND = "grey row: class absent from the ground truth (no labelled pixel); numbers: % of each row's pixels"
HEAT_LOW, HEAT_HIGH, HEAT_ABSENT = (255, 255, 255), (8, 48, 107), (200, 200, 200)  # white -> dark blue; no GT: grey
OVERLAY_ALPHA = 0.6  # class colour over the photo; background pixels keep the photo


class EvalSet(Dataset):
    """The first `count` samples of a dataset, each tagged with its index (gathered to name per-image scores), and
    the preset it was opened with (class names, how iIoU weighs instances)."""

    def __init__(self, dataset: Dataset, preset: Preset, count: int | None = None):
        self.dataset = dataset
        self.preset = preset
        self.ids = dataset.ids[: count or len(dataset)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> dict:
        return {**self.dataset[idx], "index": idx}


def collate_eval(samples: list[dict]) -> dict:
    """data.collate (each sample's own size included) plus each sample's index."""
    out = collate(samples)
    out["index"] = torch.tensor([s["index"] for s in samples])
    return out


@torch.no_grad()
def evaluate(run: Predictor, loader, accelerator, num_classes: int, scales=(1.0,), flip: bool = False
             ) -> tuple[dict, dict[int, float]]:
    """Split metrics and per-image mIoU by dataset index; every sample counted exactly once across processes."""
    evaluator = SegEvaluator(num_classes, **loader.dataset.preset.metric_options())
    rows, indices = [], []
    for batch in tqdm(loader, desc="evaluate", disable=not accelerator.is_local_main_process):
        with accelerator.autocast():
            outputs = predict_batch(run, batch, scales, flip)
        rows.append(evaluator.update(outputs, batch, accelerator).cpu())
        indices.append(accelerator.gather_for_metrics(batch["index"]).cpu())
    index = torch.cat(indices)
    expected = len(loader.dataset)
    if sorted(index.tolist()) != list(range(expected)):
        raise RuntimeError(f"evaluation saw {index.numel()} samples ({index.unique().numel()} distinct), "
                           f"expected {expected} once each")
    per_image = ConfusionMatrix.sample_miou(torch.cat(rows), num_classes)
    return evaluator.compute(), dict(zip(index.tolist(), per_image.tolist()))


def score(run: Predictor, dataset: EvalSet, num_classes: int, scales=(1.0,), flip: bool = False,
          batch_size: int = 4, workers: int = 0) -> tuple[dict, dict[int, float]]:
    """`evaluate` in this process alone (no launcher): a Predictor's metrics on a dataset from get_dataset, exactly
    as this tool's report gives them (tools/export.py scores its exported files with it)."""
    accelerator = Accelerator(cpu=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_eval)
    return evaluate(run, loader, accelerator, num_classes, scales, flip)


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


def overlay(image: torch.Tensor, label: torch.Tensor, palette=None) -> torch.Tensor:
    """(3, H, W) uint8 photo with the colours of `label` (the dataset's palette, default VOC's) blended over its
    non-background pixels."""
    colour = colorize_label(label, palette).float()
    blend = (1 - OVERLAY_ALPHA) * image.float() + OVERLAY_ALPHA * colour
    return torch.where((label.cpu() != 0)[None], blend, image.float()).to(torch.uint8)


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


def get_dataset(data_root: str | Path, split: str, config, max_images: int | None, dataset: str | None = None
                ) -> tuple[EvalSet, tuple[str, ...], list[str]]:
    """The split at original resolution, the tasks to evaluate and notes on what cannot be measured. `dataset`: a
    PRESETS name; default: what the folder looks like (data.guess_dataset: VOC, your own folder or Cityscapes)."""
    name = dataset or guess_dataset(data_root)
    root = prepare_root(name, data_root)
    preset = PRESETS[name].for_root(root)
    if preset.num_classes != config.num_classes:
        raise ValueError(f"the model predicts {config.num_classes} classes, {root} ({name}) has {preset.num_classes}; "
                         "evaluate it on the dataset it was trained for")
    tasks, notes = ("seg",), []
    if "depth" in config.tasks:
        if (root / "PseudoDepth").is_dir():
            tasks = ("seg", "depth")
        else:
            notes.append(f"depth metrics not available: no PseudoDepth/ in {root} "
                         f"(make it with: {depth_fix_command(root, split)})")
    base = preset.open(root, split, get_transform(False, 0, 0), "depth" in tasks)
    if not base.with_instances:
        notes.append(f"iIoU not available: no instance masks in {root}")
    dataset = EvalSet(base, preset, max_images)
    if len(dataset) < len(base):
        notes.append(f"subset: the first {len(dataset)} of {len(base)} images of {split!r} (--max-images)")
    return dataset, tasks, notes


def write_outputs(report: dict, output: Path, names: list[str]) -> None:
    """FILE.json, FILE.md and FILE_confusion.png side by side."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(markdown_table(report))
    confusion_image(report["confusion_matrix"], names).save(output.with_name(output.stem + "_confusion.png"))


def main(args):
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    onnx = onnx_file(args.checkpoint, args.backend)
    checkpoint = onnx if onnx is not None else resolve_checkpoint(args.checkpoint)
    config = load_config(checkpoint, args.backend)
    dataset, tasks, notes = get_dataset(args.data_root, args.split, config, args.max_images, args.dataset)
    root = dataset.dataset.root
    # ONNX Runtime runs on the CPU here: what an edge device runs, scored as it ships
    run, _ = load_predictor(checkpoint, args.backend, "cpu" if onnx is not None else accelerator.device, tasks)
    names = list(config.names())
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_eval, pin_memory=torch.cuda.is_available())
    loader = accelerator.prepare(loader)  # the model stays unwrapped: no gradients, nothing to synchronise
    metrics, per_image = evaluate(run, loader, accelerator, config.num_classes, args.scales, args.flip)
    settings = {"checkpoint": str(checkpoint), "data_root": str(root), "split": args.split, "split_size": len(dataset.dataset),
                "num_images": len(dataset), "flip": args.flip, "scales": list(args.scales), "tasks": list(tasks),
                "batch_size": args.batch_size, "world_size": accelerator.num_processes, "backend": "onnx" if onnx else "torch",
                "mixed_precision": accelerator.mixed_precision, "model": {**vars(config)}}
    report = build_report(metrics, per_image, dataset.ids, names, notes, settings)
    output = Path(args.output) if args.output else (checkpoint.parent / f"eval_{args.split}_{checkpoint.stem}.json"
                                                     if onnx is not None else checkpoint / f"eval_{args.split}.json")
    if accelerator.is_main_process:
        if args.save_worst:
            report["worst_images"] = finite_or_none(save_worst(run, dataset, per_image, args.save_worst,
                                                               output.with_name(output.stem + "_worst"),
                                                               args.scales, args.flip, accelerator.device))
        write_outputs(report, output, names)
        accelerator.print(markdown_table(report) + f"\nreport: {output}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def parse_scales(text: str) -> tuple[float, ...]:
    """'0.75,1,1.25' -> (0.75, 1.0, 1.25); every scale positive."""
    scales = tuple(float(x) for x in text.split(","))
    if not scales or min(scales) <= 0:
        raise argparse.ArgumentTypeError(f"scales must be positive numbers, got {text!r}")
    return scales


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a segmentation checkpoint on a VOC-format split", add_help=True)
    p.add_argument("--checkpoint", "--model", required=True, metavar="PATH",
                   help="checkpoint folder (model.safetensors + config.json), a run folder, an exported folder, or an "
                        "exported .onnx file (fp32 or int8, run by ONNX Runtime on the CPU)")
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="for a folder: torch (model.safetensors), onnx (model.onnx) or onnx-int8 (model_int8.onnx from "
                        "export.py --int8) (default torch)")
    p.add_argument("--data-root", required=True, help="VOCdevkit/VOC2012 or a folder above it, your own VOC-format "
                                                      "folder with classes.txt, or a Cityscapes folder")
    p.add_argument("--dataset", default=None, choices=sorted(PRESETS),
                   help="how to read --data-root (default: what it looks like: cityscapes, folder or voc)")
    p.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt")
    p.add_argument("--output", default=None, help="report FILE.json; FILE.md, FILE_confusion.png and FILE_worst/ go beside it "
                                                   "(default: <checkpoint>/eval_<split>.json)")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: also predict the mirrored image")
    p.add_argument("--scales", type=parse_scales, default=(1.0,), help="test-time scales, e.g. 0.75,1,1.25 (softmax averaged)")
    p.add_argument("--save-worst", type=int, default=0, help="write colour overlays of the N lowest per-image mIoU images")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images of the split (quick checks)")
    p.add_argument("--batch-size", type=int, default=4, help="images per process per step (does not change the results)")
    p.add_argument("--workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate launch's setting")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    return p


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except CheckpointError as exc:  # names the file and what is wrong with it: no traceback
        sys.exit(f"evaluate.py: error: {exc}")
