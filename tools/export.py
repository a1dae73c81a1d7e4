"""Export the deployment model: the training checkpoint without its depth decoder, as an ordinary seg model.

    python tools/export.py --checkpoint runs/latest --out exported/
    python tools/export.py --checkpoint runs/latest/checkpoints/last --out exported/ --flops-size 480x640
    python tools/export.py --checkpoint runs/latest --out exported/ --int8 --calibration-images 300

Writes to --out: `model.safetensors` + `config.json` (loadable with models.load_model), `model.pt`
(TorchScript) and `model.onnx` (input "image" (B, 3, H, W), output "logits" (B, num_classes, H, W), batch,
height and width dynamic), `export.json` (cost and parity numbers) and `manifest.json` (each file's size and
SHA-256, which evaluate.py and predict.py verify before loading). Prints the parameters and
FLOPs of the full and the exported model, then checks that all three files give the seg logits of
the checkpoint's model in PyTorch eager and fails, leaving --out unchanged, when they do not.

--int8 also writes `model_int8.onnx`, ONNX Runtime's static quantization of model.onnx calibrated on training images
of the run's dataset (models/quantize.py, evaluation/int8.py), and adds to export.json (section "int8") and the
screen both ONNX models' size, batch-1 latency on this CPU and mIoU / fg_mIoU on the val split.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import PRESETS  # noqa: E402
from models.encoder import spec_of  # noqa: E402
from models.files import MANIFEST_NAME, write_manifest  # noqa: E402
from models.io import CheckpointError, load_model, resolve_checkpoint, save_model  # noqa: E402
from models.deploy import (  # noqa: E402
    ONNX_INT8_NAME, ONNX_NAME, TORCHSCRIPT_NAME, SegLogits, check_parity, count_flops, count_params, export_onnx,
    export_torchscript, parse_size, positive_int, seg_only,
)
from evaluation.int8 import export_int8, find_dataset, print_int8  # noqa: E402
from models.quantize import CALIBRATION_METHODS, require_onnxruntime  # noqa: E402

IN_CHANNELS = 3
REPORT_NAME = "export.json"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """`512x512,67x71` -> [(512, 512), (67, 71)]."""
    return [parse_size(t) for t in text.split(",") if t]


def cost_report(full, slim, size: tuple[int, int]) -> dict:
    """Parameters and per-image FLOPs of the full (training) and exported model, printed and returned."""
    report = {
        "flops_size": list(size),
        "params": {"full": count_params(full), "exported": count_params(slim)},
        "flops": {"full": count_flops(full, size), "exported": count_flops(slim, size)},
    }
    print(f"{'':10s}{'tasks':>14s}{'parameters':>14s}{'GFLOPs':>10s}   (one {size[0]}x{size[1]} image; a multiply-add "
          f"counts 2)")
    for name, model in (("full", full), ("exported", slim)):
        tasks = "+".join(model.tasks)
        print(f"{name:10s}{tasks:>14s}{report['params'][name]:>14,d}{report['flops'][name] / 1e9:>10.2f}")
    return report


def print_parity(rows: list[dict]) -> None:
    """One line per backend and input shape."""
    print("parity vs the checkpoint's PyTorch eager seg logits (relative = max abs diff / max |logit|):")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        flag = "ok" if r["ok"] else "FAIL"
        print(f"  {r['backend']:12s} {shape:>16s}  max abs diff {r['max_abs_diff']:.3e}  "
              f"relative {r['rel_diff']:.3e}  tol {r['tol']:.0e}  {flag}")


def publish(tmp: Path, out: Path) -> None:
    """Move the checked files into --out (replacing older exports of the same names), the manifest last: until it
    is in place a reader of --out finds files that do not match the manifest before it, never a silent mix."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST_NAME):
        os.replace(path, out / path.name)
    tmp.rmdir()


def check_out(out: Path, source: Path) -> None:
    """Refuse folders where the export would replace training weights or shadow a run's checkpoints."""
    if out.resolve() == source.resolve() or (out / "checkpoints").is_dir():
        raise ValueError(f"--out {out} is a checkpoint or run folder; export to a folder of its own")


def int8_settings(args: argparse.Namespace, source: Path) -> dict:
    """What evaluation/int8.export_int8 needs, from the flags and the checkpoint's run."""
    require_onnxruntime()
    dataset, root = find_dataset(source, args.dataset, args.data_root)
    return {"dataset": dataset, "data_root": root, "calibration_images": args.calibration_images,
            "calibration_method": args.calibration_method, "eval_images": args.eval_images,
            "latency_size": args.latency_size, "latency_runs": args.latency_runs, "threads": args.latency_threads}


def main(args: argparse.Namespace) -> None:
    """Load, report cost, write the three formats to a temporary folder, check parity, then publish."""
    source = resolve_checkpoint(args.checkpoint)
    out = Path(args.out).resolve()  # `--out .` has no name to derive the temporary folder's from
    check_out(out, source)
    int8 = int8_settings(args, source) if args.int8 else None  # a missing onnxruntime or dataset: before any work
    full = load_model(source)
    slim = seg_only(full)
    print(f"checkpoint: {source} (tasks {'+'.join(full.tasks)}, encoder {full.config.encoder})")
    report = {"source": str(source), "onnx_exporter": args.onnx_exporter, **cost_report(full, slim, args.flops_size)}

    tmp = out.parent / f".{out.name}.tmp"  # written and checked here first: --out only ever gets checked files
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(slim, tmp)
    module = SegLogits(slim)
    export_torchscript(module, tmp / TORCHSCRIPT_NAME)
    export_onnx(module, tmp / ONNX_NAME, args.onnx_exporter)

    shapes = [(args.check_batch, IN_CHANNELS, *s) for s in args.check_sizes]
    onnx_tol = args.onnx_tol if args.onnx_tol is not None else spec_of(full.config.encoder).onnx_tol
    tols = {"pytorch": 0.0, "torchscript": args.torchscript_tol, "onnxruntime": onnx_tol}
    rows = check_parity(full, tmp, shapes, tols)
    print_parity(rows)
    report["parity"] = rows
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    failed = [r for r in rows if not r["ok"]]
    if args.int8 and not failed:
        report["int8"] = export_int8(slim, tmp, int8)
        print_int8(report["int8"])
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    write_manifest(tmp)  # every file's size and SHA-256: load_model, evaluate.py and predict.py verify them
    if failed:
        worst = max(failed, key=lambda r: r["rel_diff"] - r["tol"])
        raise RuntimeError(
            f"parity check failed for {len(failed)} of {len(rows)} cases (worst: {worst['backend']} at "
            f"{worst['shape']}, relative diff {worst['rel_diff']:.3e} > {worst['tol']:.0e}); "
            f"the files are left in {tmp} for inspection, {out} is unchanged"
        )
    publish(tmp, out)
    print(f"exported to {out}: model.safetensors, config.json, {TORCHSCRIPT_NAME}, {ONNX_NAME}"
          f"{', ' + ONNX_INT8_NAME if args.int8 else ''}, {REPORT_NAME}, {MANIFEST_NAME}")


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description="Export the seg-only deployment model", add_help=True)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="checkpoint folder (checkpoints/last|best) or run folder (uses best, else last); required")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder; required")
    parser.add_argument("--flops-size", default=(512, 512), type=parse_size, metavar="S|HxW",
                        help="image size at which FLOPs are counted (default 512)")
    parser.add_argument("--check-sizes", default=parse_sizes("512x512,67x71"), type=parse_sizes, metavar="HxW,...",
                        help="input sizes of the parity check; keep an odd one (default 512x512,67x71)")
    parser.add_argument("--check-batch", default=2, type=int, metavar="N",
                        help="batch size of the parity check (default 2)")
    parser.add_argument("--torchscript-tol", default=1e-5, type=float, metavar="TOL",
                        help="TorchScript tolerance, max abs diff relative to max |logit| (default 1e-5)")
    parser.add_argument("--onnx-tol", default=None, type=float, metavar="TOL",
                        help="ONNX Runtime tolerance, max abs diff relative to max |logit| (default: the encoder's, "
                             "1e-4; EfficientNet 1e-3)")
    parser.add_argument("--onnx-exporter", default="dynamo", choices=("dynamo", "legacy"),
                        help="torch.onnx exporter: dynamo (torch.export based) or legacy (TorchScript based) "
                             "(default dynamo)")
    int8 = parser.add_argument_group("int8 export (--int8; needs onnxruntime)")
    int8.add_argument("--int8", action="store_true",
                      help=f"also write {ONNX_INT8_NAME} (static QDQ quantization, per-channel int8 weights) and report "
                           "its size, latency and mIoU against model.onnx")
    int8.add_argument("--calibration-images", default=300, type=positive_int, metavar="N",
                      help="training images to calibrate on, spread over the split (default 300)")
    int8.add_argument("--calibration-method", default="minmax", choices=CALIBRATION_METHODS,
                      help="activation range calibration (default minmax; percentile measured no better)")
    int8.add_argument("--dataset", default=None, choices=sorted(PRESETS),
                      help="dataset preset to calibrate and score on (default: the run's, from its run_config.json)")
    int8.add_argument("--data-root", default=None, metavar="DIR",
                      help="dataset folder (default: the run's data_root, from its run_config.json)")
    int8.add_argument("--eval-images", default=None, type=positive_int, metavar="N",
                      help="score fp32 and int8 on the first N images of the val split (default: all)")
    int8.add_argument("--latency-size", default=None, type=parse_size, metavar="S|HxW",
                      help="input size of the latency measurement (default: the first val image's)")
    int8.add_argument("--latency-runs", default=50, type=positive_int, metavar="N",
                      help="timed batch-1 forwards per model, taken in turns after a warmup; the median is reported "
                           "(default 50)")
    int8.add_argument("--latency-threads", default=0, type=int, metavar="N",
                      help="ONNX Runtime intra-op threads of the latency measurement (default 0: one per core)")
    return parser


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except CheckpointError as exc:  # names the file and what is wrong with it: no traceback
        sys.exit(f"export.py: error: {exc}")
