"""The encoder table: what each encoder's seg model costs on this CPU, in one run, next to torchvision's
lraspp_mobilenet_v3_large as the anchor.

    python tools/encoder_table.py                                   # every encoder at 512x512, batch 1
    python tools/encoder_table.py --encoders mobilenet_v3_large resnet18 --size 256 --runs 20
    python tools/encoder_table.py --accuracy exported/*             # + fg_mIoU from tools/export.py --int8 folders

For each encoder (random weights: cost does not depend on them) the deployment model (encoder + seg decoder, 21
classes, the encoder's default decoder widths unless --decoder-channels) is exported to ONNX exactly as
tools/export.py does, quantized exactly as tools/export.py --int8 does (static QDQ; calibrated here on a few seeded
random images, enough for timing), and measured: parameters, multiply-adds at --size (torch's FlopCounterMode),
file sizes, and the batch-1 latency of the fp32 and int8 files in ONNX Runtime on the CPU, every file timed in turns
in one process (evaluation/int8.latency) so that all rows see the same machine load: compare rows of one run only.
The anchor is exported and quantized the same way. --accuracy reads export.json of tools/export.py --int8 folders
(one per encoder: train each at the same budget, then export) and adds fg_mIoU fp32 / int8 and the int8 drop.
Writes a markdown table to stdout (and --markdown), every number to --json.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from evaluation.int8 import describe_float, latency  # noqa: E402
from models import ModelConfig, build_model  # noqa: E402
from models.deploy import SegLogits, count_params, export_onnx, forward_flops, parse_size, positive_int  # noqa: E402
from models.encoder import ENCODERS  # noqa: E402
from models.io import CONFIG_NAME  # noqa: E402
from models.quantize import calibration_reader, quantize, require_onnxruntime  # noqa: E402
from run_state.machine import CPU_FLAGS, INT8_CPU_FLAGS, cpu_info  # noqa: E402

ANCHOR = "lraspp_mobilenet_v3_large"
NUM_CLASSES = 21
SEED = 0


class AnchorLogits(nn.Module):
    """torchvision's LRASPP as image -> logits (its forward returns {"out": logits})."""

    def __init__(self):
        super().__init__()
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large
        self.model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)["out"]


def seg_model(name: str, decoder_channels: tuple[int, ...] | None) -> nn.Module:
    """The deployment model of encoder `name` (or the anchor) as image -> logits, random weights, eval mode."""
    if name == ANCHOR:
        return AnchorLogits().eval()
    config = ModelConfig(encoder=name, tasks=("seg",), num_classes=NUM_CLASSES, decoder_channels=decoder_channels)
    return SegLogits(build_model(config)).eval()


def machine() -> dict:
    """The CPU as lscpu names it (model and the flags that matter to ONNX Runtime's fp32 and int8 kernels), cores,
    versions."""
    import onnxruntime
    cpu, flags = cpu_info(CPU_FLAGS + INT8_CPU_FLAGS)
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def build_row(name: str, folder: Path, size: tuple[int, int], decoder_channels, calibration: int) -> tuple[dict, dict]:
    """Export and quantize one model into folder; its row (cost, sizes, what stays float) and its two ONNX paths."""
    torch.manual_seed(SEED)
    model = seg_model(name, decoder_channels)
    row = {"model": name, "params": count_params(model),
           "macs": forward_flops(model, torch.zeros(1, 3, *size)) // 2}
    if name != ANCHOR:
        row["decoder_channels"] = list(model.model.config.decoder_channels)
    paths = {"fp32": folder / f"{name}.onnx", "int8": folder / f"{name}_int8.onnx"}
    start = time.perf_counter()
    export_onnx(model, paths["fp32"])
    gen = torch.Generator().manual_seed(SEED)
    images = [{"image": torch.randn(3, *size, generator=gen)} for _ in range(calibration)]
    quant = quantize(paths["fp32"], paths["int8"], calibration_reader(images, calibration))
    row["kept_in_float"] = quant["kept_in_float"]
    row["export_seconds"] = round(time.perf_counter() - start, 1)
    row["size_bytes"] = {k: p.stat().st_size for k, p in paths.items()}
    return row, paths


def read_accuracy(folders: list[str]) -> dict[str, dict]:
    """encoder -> fg_mIoU fp32 / int8 / drop and argmax agreement, from tools/export.py --int8 folders."""
    found = {}
    for folder in map(Path, folders):
        report_path, config_path = folder / "export.json", folder / CONFIG_NAME
        if not report_path.is_file() or not config_path.is_file():
            raise FileNotFoundError(f"--accuracy {folder}: not a tools/export.py folder (no export.json or "
                                    f"{CONFIG_NAME})")
        report = json.loads(report_path.read_text())
        if "int8" not in report:
            raise ValueError(f"--accuracy {folder}: exported without --int8 (export.json has no int8 section)")
        encoder = ModelConfig.load(config_path).encoder
        if encoder in found:
            raise ValueError(f"--accuracy: two folders for {encoder} ({found[encoder]['folder']} and {folder})")
        m = report["int8"]["metrics"]
        found[encoder] = {"folder": str(folder), "fg_mIoU_fp32": m["fp32"]["fg_mIoU"],
                          "fg_mIoU_int8": m["int8"]["fg_mIoU"], "fg_mIoU_drop": m["fg_mIoU_drop"],
                          "argmax_agreement": report["int8"]["agreement"]["argmax_agreement"],
                          "images": m["images"], "split": m["split"]}
    return found


def markdown(result: dict) -> str:
    """The table users choose from, anchor last, then what was kept in float."""
    size = "x".join(map(str, result["size"]))
    acc = bool(result["accuracy"])
    head = ["model", "params (M)", f"GMACs @{size}", "fp32 MB", "int8 MB", "fp32 ms", "int8 ms", "int8 speedup"]
    head += ["fg_mIoU fp32", "fg_mIoU int8", "int8 drop"] if acc else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        lat, mb = row["latency"], {k: v / 1e6 for k, v in row["size_bytes"].items()}
        name = f"{row['model']} (anchor)" if row["model"] == ANCHOR else row["model"]
        cells = [name, f"{row['params'] / 1e6:.2f}", f"{row['macs'] / 1e9:.2f}", f"{mb['fp32']:.1f}",
                 f"{mb['int8']:.1f}", f"{lat['fp32']:.1f}", f"{lat['int8']:.1f}", f"{lat['fp32'] / lat['int8']:.2f}x"]
        if acc:
            a = result["accuracy"].get(row["model"])
            cells += ([f"{a['fg_mIoU_fp32']:.3f}", f"{a['fg_mIoU_int8']:.3f}", f"{a['fg_mIoU_drop']:+.3f}"]
                      if a else ["", "", ""])
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    lines.append("")
    lines.append(f"Batch 1 at {size}, median of {result['runs']} runs after {result['warmup']} warm-up, ONNX Runtime "
                 f"{m['onnxruntime']} on the CPU, intra-op threads: {result['threads']}; {m['cpu']} "
                 f"({', '.join(m['flags']) or 'no AVX2'}), {m['cores']} cores; torch {m['torch']}. Random weights; "
                 "int8: static QDQ, per-channel int8 weights, uint8 activations.")
    kept = {r["model"]: describe_float(r["kept_in_float"]) for r in result["rows"] if r["kept_in_float"]}
    if kept:
        lines.append("Kept in float (ONNX Runtime's static quantizer has no int8 form for these operators; each runs "
                     "between a DequantizeLinear and a QuantizeLinear): "
                     + "; ".join(f"{k}: {v}" for k, v in kept.items()) + ".")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    require_onnxruntime()
    accuracy = read_accuracy(args.accuracy) if args.accuracy else {}  # a bad folder: before minutes of exports
    names = [*args.encoders, *([] if args.no_anchor else [ANCHOR])]
    rows, paths = [], {}
    with tempfile.TemporaryDirectory(prefix="encoder_table_") as tmp:
        for name in names:
            print(f"exporting and quantizing {name} ...", file=sys.stderr, flush=True)
            row, files = build_row(name, Path(tmp), args.size, args.decoder_channels, args.calibration_images)
            rows.append(row)
            paths.update({f"{name}/{k}": p for k, p in files.items()})
        print(f"timing {len(paths)} ONNX files in turns, {args.runs} runs each ...", file=sys.stderr, flush=True)
        speed = latency(paths, args.size, args.runs, args.threads)
    for row in rows:
        row["latency"] = {k: speed[f"{row['model']}/{k}"]["median_ms"] for k in ("fp32", "int8")}
        row["latency_min"] = {k: speed[f"{row['model']}/{k}"]["min_ms"] for k in ("fp32", "int8")}
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
              "size": list(args.size), "batch": 1, "runs": args.runs, "warmup": speed["warmup"],
              "threads": speed["intra_op_threads"], "calibration_images": args.calibration_images,
              "rows": rows, "accuracy": accuracy}
    table = markdown(result)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS), metavar="NAME",
                   help=f"encoders to measure (default: all: {', '.join(ENCODERS)})")
    p.add_argument("--no-anchor", action="store_true", help=f"leave out the {ANCHOR} row")
    p.add_argument("--size", default=(512, 512), type=parse_size, metavar="S|HxW", help="input size (default 512)")
    p.add_argument("--runs", default=20, type=positive_int, help="timed runs per file (median; default 20)")
    p.add_argument("--threads", default=0, type=int, help="ONNX Runtime intra-op threads (0: one per core)")
    p.add_argument("--decoder-channels", default=None, type=lambda t: tuple(int(c) for c in t.split(",")),
                   help="decoder widths for every encoder (default: each encoder's own)")
    p.add_argument("--calibration-images", default=4, type=positive_int, metavar="N",
                   help="seeded random images that calibrate the int8 models (default 4; timing only)")
    p.add_argument("--accuracy", nargs="+", default=None, metavar="DIR",
                   help="tools/export.py --int8 folders, one per encoder: adds their fg_mIoU fp32 / int8 columns")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the table as markdown")
    return p


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError, ImportError) as exc:
        sys.exit(f"encoder_table: {exc}")
