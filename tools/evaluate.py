"""Score a checkpoint on a VOC-format split: JSON report, Markdown table, confusion heat map, worst images.

    python tools/evaluate.py --checkpoint runs/latest --data-root ~/data/VOCdevkit --split val
    python tools/evaluate.py --checkpoint runs/latest/checkpoints/best --data-root ~/data/VOCdevkit \\
        --flip --scales 0.75,1,1.25 --save-worst 10 --output eval/val_tta.json
    accelerate launch --multi_gpu --num_processes 8 tools/evaluate.py --checkpoint ... --data-root ...

Every image is predicted alone at its label's original resolution by evaluation/inference.py, the rule
train.py's validation and tools/predict.py use, so the numbers do not depend on --batch-size or the number of
processes, and predict.py's masks scored against the labels give this report's confusion matrix. The scoring
(evaluation/scoring.py) uses evaluation/metrics.py, the metric code of train.py's validation; the report's files
come from evaluation/report.py. README "Evaluation and metric conventions".
--checkpoint may also be an exported folder with --backend onnx|onnx-int8, or an exported .onnx file.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that `python tools/evaluate.py` finds the repo

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from data import PRESETS  # noqa: E402
from evaluation.inference import BACKENDS, load_config, load_predictor, onnx_file  # noqa: E402
from evaluation.report import build_report, finite_or_none, markdown_table, save_worst, write_outputs  # noqa: E402
from evaluation.scoring import collate_eval, evaluate, get_dataset  # noqa: E402
from models.io import CheckpointError, resolve_checkpoint  # noqa: E402


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
