"""Segment images with an exported or a training model: palette masks, overlays and depth images.

    python tools/predict.py --model exported/ --input photos/ --out predictions/
    python tools/predict.py --model runs/latest --input a.jpg b.png --out predictions/ --overlay
    python tools/predict.py --model exported/ --backend onnx --device cpu --input photos/ --out predictions/

For each image: `<stem>.png`, the class mask as a palette PNG in the model's class colours (VOC's, or those of
its dataset's classes.txt; pixel values are class ids, as in SegmentationClass/), at the image's size; with
--overlay `<stem>_overlay.jpg`;
and, for a model with a depth decoder (a training checkpoint), `<stem>_depth.png` (near = bright).
Each image is predicted alone at its own size through the validation transform (ImageNet mean/std), by
evaluation/inference.py, the rule tools/evaluate.py and train.py's validation score by: scoring these masks
against labels gives exactly the confusion matrix tools/evaluate.py reports. --model may be an exported .onnx
file (fp32 or int8): it is run by ONNX Runtime.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.visualize import OVERLAY_ALPHA, colorize_depth, overlay, to_palette_png  # noqa: E402
from data.voc import DataError, read_rgb  # noqa: E402
from evaluation.inference import BACKENDS, Predictor, load_predictor, predict_rgb  # noqa: E402
from models.files import CheckpointError  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what a folder given as --input contributes
OVERLAY_QUALITY = 90  # JPEG quality of the overlays
OUTPUT_SUFFIXES = (".png", "_overlay.jpg", "_depth.png")  # after the input's stem


def list_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); fails on missing paths and clashing names."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{item}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def check_outputs(files: list[Path], out: Path) -> None:
    """No two inputs may write the same output file, and no output may replace an input."""
    owner: dict[str, Path] = {}
    for path in files:
        for name in (f"{path.stem}{suffix}" for suffix in OUTPUT_SUFFIXES):
            if name in owner:
                raise ValueError(f"inputs {owner[name]} and {path} would both write {out / name}; rename one")
            owner[name] = path
    inputs = {p.resolve() for p in files}
    clobbered = [out / name for name in owner if (out / name).resolve() in inputs]
    if clobbered:
        raise ValueError(f"--out {out} would overwrite the input {clobbered[0]}; choose another folder")


def check_headers(files: list[Path]) -> None:
    """Fail before any work on files that are not images at all (decoding errors are caught per image)."""
    for path in files:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable image ({exc})") from exc


def resolve_device(name: str) -> str:
    """auto -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but PyTorch sees no CUDA device; use --device cpu")
    return name


def load(model: str, backend: str, device: str, depth: bool) -> tuple[Predictor, tuple[str, ...], tuple]:
    """The inference function, the tasks it returns (the depth decoder skipped unless `depth`) and the colour of
    each class (the model's label set: config.json)."""
    run, config = load_predictor(model, backend, device, None if depth else ("seg",))
    return run, config.tasks if depth else ("seg",), config.colours()


def to_pil(rgb: Tensor) -> Image.Image:
    """(3, H, W) uint8 -> PIL RGB image."""
    return Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())


def save_outputs(result: dict[str, Tensor], image: Tensor, stem: str, out: Path, args: argparse.Namespace,
                 palette=None) -> None:
    """Mask (palette PNG), optional overlay (JPEG) and depth image (PNG) of one input."""
    to_palette_png(result["seg"], palette).save(out / f"{stem}.png")
    if args.overlay:
        to_pil(overlay(image, result["seg"], palette, args.alpha)).save(out / f"{stem}_overlay.jpg",
                                                                      quality=OVERLAY_QUALITY)
    if "depth" in result:
        to_pil(colorize_depth(result["depth"])).save(out / f"{stem}_depth.png")


def main(args: argparse.Namespace) -> None:
    """Predict every input image and write its outputs."""
    files = list_images(args.input)
    out = Path(args.out)
    check_outputs(files, out)
    check_headers(files)
    device = resolve_device(args.device)
    run, tasks, palette = load(args.model, args.backend, device, depth=not args.no_depth)
    print(f"model {args.model} ({args.backend} on {device}, outputs {'+'.join(tasks)}); {len(files)} images")
    out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc="predict", unit="img"):
        image = read_rgb(path)  # as the dataset reads it
        save_outputs(predict_rgb(run, image, device), image, path.stem, out, args, palette)
    print(f"wrote {len(files)} masks to {out}")


def get_args_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description="Predict palette masks (and depth) for images", add_help=True)
    parser.add_argument("--model", required=True, metavar="DIR|CHECKPOINT|FILE.onnx",
                        help="exported folder (tools/export.py), checkpoint folder, run folder or an exported .onnx file "
                             "(run by ONNX Runtime); required")
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE|DIR",
                        help="image files and/or folders (folders: *.jpg, *.jpeg, *.png); required")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder; required")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg (mask over image)")
    parser.add_argument("--alpha", default=OVERLAY_ALPHA, type=float,
                        help=f"mask opacity in the overlay (default {OVERLAY_ALPHA})")
    parser.add_argument("--no-depth", action="store_true",
                        help="skip the depth decoder of a multi-decoder checkpoint (no <stem>_depth.png)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run: auto = cuda when available (default auto)")
    parser.add_argument("--backend", default="torch", choices=BACKENDS,
                        help="for a folder: torch (model.safetensors + config.json), onnx (model.onnx) or onnx-int8 "
                             "(model_int8.onnx from export.py --int8); the ONNX ones need onnxruntime (default torch)")
    return parser


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except CheckpointError as exc:  # names the file and what is wrong with it: no traceback
        sys.exit(f"predict.py: error: {exc}")
