"""Pseudo depth for a VOC-format folder with a DINOv2 depth model from transformers.

Writes `PseudoDepth/<id>.png` (16-bit, the image's size, per-image min-max normalised
inverse depth: 65535 = nearest, 0 = farthest) and `PseudoDepth/meta.json` (settings, and the record of the
last run that wrote maps: per-process ids, speed, constant maps). Resumable: finished ids are skipped unless
--overwrite. A constant prediction is stored as zeros; when every map a run writes is constant the model
output is degenerate and the tool exits non-zero.

    python tools/make_depth.py --data-root datasets/VOCdevkit/VOC2012
    python tools/make_depth.py --data-root datasets/VOCdevkit --split all --fp16 \\
        --model depth-anything/Depth-Anything-V2-Small-hf
    accelerate launch --multi_gpu --num_processes 2 tools/make_depth.py --data-root datasets/VOCdevkit
    python tools/make_depth.py --data-root datasets/VOCdevkit --preview 8   # PseudoDepth/preview.png
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from data import PRESETS
from data.visualize import PREVIEW_HEIGHT, colorize_depth, titled
from data.voc import DataError, missing_depth, read_split, resolve_voc_root
from models.depth_teacher import METRIC_EPS, load_model, native_kind, to_stored
from models.files import umask

DEPTH_DIR = "PseudoDepth"
META_NAME = "meta.json"
PREVIEW_NAME = "preview.png"
TMP_SUFFIX = ".tmp"
# Dark -> bright; bright = near (magma-like anchors).


def read_ids(root: Path, split: str) -> list[str]:
    """Ids of a split (ImageSets/Segmentation/<split>.txt), or of every JPEG for split 'all'."""
    if split != "all":
        return read_split(root, split)
    ids = sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))
    if not ids:
        raise DataError(f"{root / 'JPEGImages'}: no .jpg files (split 'all' is empty)")
    return ids


def save_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write a PNG through a temp file in the same folder, fsync, then rename over path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would carry into place: the umask's mode, as open() gives
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_image(path: Path) -> Image.Image:
    """Decode an RGB image, naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e


def preprocess(processor, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Model input (3, H', W') and the box (top, left, height, width) the image covers in it."""
    divisor = getattr(processor, "size_divisor", None) or 1
    if not getattr(processor, "do_pad", False) or divisor == 1:
        pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels, (0, 0, pixels.shape[1], pixels.shape[2])
    # Pad here, as the processor would (centred, zeros), so the padding can be cropped off the prediction.
    pixels = processor(images=image, return_tensors="pt", do_pad=False)["pixel_values"][0]
    h, w = pixels.shape[1:]
    pad_h, pad_w = -h % divisor, -w % divisor
    top, left = pad_h // 2, pad_w // 2
    pixels = F.pad(pixels, (left, pad_w - left, top, pad_h - top))
    return pixels, (top, left, h, w)


class DepthJobs(torch.utils.data.Dataset):
    """Batches of ids -> decoded and preprocessed items (runs in DataLoader workers)."""

    def __init__(self, root: Path, batches: list[list[str]], processor):
        self.root, self.batches, self.processor = root, batches, processor

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[dict]:
        items = []
        for id_ in self.batches[index]:
            image = open_image(self.root / "JPEGImages" / f"{id_}.jpg")
            pixels, box = preprocess(self.processor, image)
            items.append({"id": id_, "size": (image.height, image.width), "pixels": pixels, "box": box})
        return items


def plan_batches(root: Path, ids: list[str], batch_size: int) -> list[list[str]]:
    """Batches of ids sorted by image size, so that a batch mostly shares one input shape."""
    sizes = {i: image_size(root / "JPEGImages" / f"{i}.jpg") for i in ids}
    ids = sorted(ids, key=lambda i: (sizes[i], i))
    return [ids[k : k + batch_size] for k in range(0, len(ids), batch_size)]


@torch.inference_mode()
def predict(model, items: list[dict], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Raw predictions resized to each image's size, padding cropped; one forward per input shape."""
    out = [None] * len(items)
    shapes = sorted({tuple(it["pixels"].shape) for it in items})
    for shape in shapes:
        index = [k for k, it in enumerate(items) if tuple(it["pixels"].shape) == shape]
        pixels = torch.stack([items[k]["pixels"] for k in index]).to(device, dtype)  # (B, 3, H', W')
        depth = model(pixel_values=pixels).predicted_depth.float()
        depth = depth.squeeze(1) if depth.dim() == 4 else depth  # (B, Hd, Wd)
        sy, sx = depth.shape[1] / shape[1], depth.shape[2] / shape[2]
        for row, k in enumerate(index):
            top, left, h, w = items[k]["box"]
            crop = depth[row, round(top * sy) : round((top + h) * sy), round(left * sx) : round((left + w) * sx)]
            out[k] = F.interpolate(crop[None, None], size=items[k]["size"], mode="bicubic", align_corners=False)[0, 0]
    return out


def describe_run(args, model, processor, native: str, dtype: torch.dtype) -> dict:
    """The settings that define the stored maps (compared on resume, written to meta.json)."""
    keys = ("do_resize", "size", "keep_aspect_ratio", "ensure_multiple_of", "do_pad", "size_divisor")
    conversion = f"1/max(d, {METRIC_EPS}) then per-image min-max" if native == "metric" else "per-image min-max"
    return {
        "model": args.model,
        "revision": args.revision or getattr(model.config, "_commit_hash", None),
        "model_type": model.config.model_type,
        "native": native,
        "conversion": conversion,
        "stored": "uint16 PNG at image size, inverse depth min-max normalised, 65535 = nearest, 0 = farthest",
        "resize": "bicubic on the raw prediction (padding cropped), before normalising",
        "input_size": {k: v for k, v in processor.to_dict().items() if k in keys},
        "dtype": str(dtype).removeprefix("torch."),
    }


def check_meta(depth_dir: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix maps of another model or conversion into an existing folder."""
    path = depth_dir / META_NAME
    if overwrite or not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in ("model", "native", "conversion"):
        if old.get(key) != settings[key]:
            raise ValueError(
                f"{path} says {key}={old.get(key)!r}, this run has {settings[key]!r}: "
                "pass --overwrite --split all to remake every map, or use the same settings"
            )


def write_meta(depth_dir: Path, meta: dict) -> None:
    """Write meta.json atomically."""
    tmp = depth_dir / f".{META_NAME}{TMP_SUFFIX}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, depth_dir / META_NAME)


def make_preview(root: Path, ids: list[str], out: Path) -> None:
    """One PNG with a row of titled panels image | coloured depth per id."""
    rows = []
    for id_ in ids:
        image = open_image(root / "JPEGImages" / f"{id_}.jpg")
        stored = torch.from_numpy(np.array(Image.open(root / DEPTH_DIR / f"{id_}.png")).astype(np.float32))[None]
        depth = Image.fromarray(colorize_depth(stored).permute(1, 2, 0).numpy())  # the TensorBoard colours
        width = max(1, round(image.width * PREVIEW_HEIGHT / image.height))
        pair = [pil_to_tensor(im.resize((width, PREVIEW_HEIGHT), Image.BILINEAR)) for im in (image, depth)]
        row = torch.cat([titled(pair[0], f"input {id_}"), titled(pair[1], "pseudo depth")], dim=2)
        rows.append(row.permute(1, 2, 0).numpy())  # (TITLE_HEIGHT + PREVIEW_HEIGHT, W, 3)
    height, width = rows[0].shape[0], max(r.shape[1] for r in rows)
    grid = np.full((height * len(rows), width, 3), 255, dtype=np.uint8)
    for k, r in enumerate(rows):
        grid[k * height : (k + 1) * height, : r.shape[1]] = r
    Image.fromarray(grid).save(out)


def write_depth(id_: str, pred: torch.Tensor, native: str, depth_dir: Path) -> bool:
    """Convert one prediction to the stored convention and write it atomically; True if it was constant."""
    try:
        stored = to_stored(pred, native)
    except FloatingPointError as e:
        raise FloatingPointError(f"{id_}: {e}") from e
    flat = not stored.any()
    if flat:
        tqdm.write(f"warning: {id_}: constant depth prediction, writing zeros", file=sys.stderr)
    save_png_atomic(stored, depth_dir / f"{id_}.png")
    return flat


def run_shard(args, root: Path, ids: list[str], model, processor, native: str, dtype, state) -> dict:
    """Predict and write the maps of this process's ids; returns its stats."""
    model.to(state.device, dtype)
    jobs = DepthJobs(root, plan_batches(root, ids, args.batch_size), processor)
    loader = torch.utils.data.DataLoader(
        jobs, batch_size=None, num_workers=args.workers, pin_memory=state.device.type == "cuda"
    )
    rank, written, constant, start = state.process_index, [], 0, time.perf_counter()
    bar = tqdm(total=len(ids), unit="img", desc=f"depth rank {rank}", disable=not state.is_main_process)
    for items in loader:
        for item, pred in zip(items, predict(model, items, state.device, dtype)):
            constant += write_depth(item["id"], pred, native, root / DEPTH_DIR)
            written.append(item["id"])
        bar.update(len(items))
    bar.close()
    seconds = time.perf_counter() - start
    rate = len(written) / seconds if seconds > 0 else 0.0
    print(f"rank {rank}/{state.num_processes}: wrote {len(written)} maps in {seconds:.1f} s ({rate:.2f} images/s)")
    return {"rank": rank, "written": written, "constant": constant, "seconds": round(seconds, 3),
            "images_per_s": round(rate, 3)}


def run_record(settings: dict, split: str, ids: list[str], left: list[str], shards: list[dict], processes: int) -> dict:
    """meta.json after a run that wrote maps: settings, what the folder holds, and this run's per-process stats."""
    seconds = max(s["seconds"] for s in shards)
    written = sum(len(s["written"]) for s in shards)
    meta = {**settings, "split": split, "count": len(ids) - len(left), "total": len(ids)}
    meta.update(complete=not left, processes=processes, shards=shards, constant=sum(s["constant"] for s in shards))
    meta["images_per_s"] = round(written / seconds, 3) if seconds > 0 else 0.0
    return meta


def write_preview(root: Path, ids: list[str], left: list[str], count: int) -> None:
    """PseudoDepth/preview.png of the first `count` ids that have a map."""
    missing = set(left)
    done = [i for i in ids if i not in missing]
    make_preview(root, done[:count], root / DEPTH_DIR / PREVIEW_NAME)
    print(f"preview: {root / DEPTH_DIR / PREVIEW_NAME}")


def check_degenerate(shards: list[dict], model: str, state) -> None:
    """Say how many maps of this run are constant; exit non-zero when all of them are (the model is broken)."""
    written = sum(len(s["written"]) for s in shards)
    constant = sum(s["constant"] for s in shards)
    state.print(f"{constant} of {written} maps constant" + (" (stored as zeros)" if constant else ""))
    if written and constant == written:
        message = (f"error: the output of depth model {model} is degenerate: all {written} maps of this run are "
                   "constant (stored as zeros, nothing to learn from). Check the model, its --revision and "
                   "--native, then remake the maps with --overwrite")
        # every rank exits non-zero, so that `accelerate launch` fails too; the main process says why
        raise SystemExit(message if state.is_main_process else 1)


def main(args):
    state = PartialState(cpu=not torch.cuda.is_available())
    root = resolve_voc_root(args.data_root)
    ids = read_ids(root, args.split)
    depth_dir = root / DEPTH_DIR
    depth_dir.mkdir(exist_ok=True)
    model, processor = load_model(args.model, args.revision)
    native = native_kind(model.config, args.native)
    dtype = torch.float16 if args.fp16 and state.device.type == "cuda" else torch.float32
    if args.fp16 and dtype != torch.float16:
        state.print("warning: --fp16 needs a GPU; running in float32")
    settings = describe_run(args, model, processor, native, dtype)
    check_meta(depth_dir, settings, args.overwrite)
    todo = ids if args.overwrite else missing_depth(root, ids)
    state.print(f"{root}: {len(ids)} ids in '{args.split}', {len(todo)} to do, model {args.model} ({native})")
    if state.is_main_process:
        for tmp in depth_dir.glob(f".*{TMP_SUFFIX}"):  # left by a killed run
            tmp.unlink()
        for id_ in todo if args.overwrite else []:  # so that a killed --overwrite run resumes without it
            (depth_dir / f"{id_}.png").unlink(missing_ok=True)
        if todo:  # a run that writes nothing (a --preview of finished maps) keeps the record of the one that did
            write_meta(depth_dir, {**settings, "split": args.split, "complete": False})
    state.wait_for_everyone()  # every process has listed `todo` before anyone writes
    if not todo:
        if args.preview > 0 and state.is_main_process:
            write_preview(root, ids, [], args.preview)
        state.wait_for_everyone()
        return
    with state.split_between_processes(todo) as shard:
        stats = run_shard(args, root, shard, model, processor, native, dtype, state)
    shards = gather_object([stats])
    state.wait_for_everyone()
    if state.is_main_process:
        left = missing_depth(root, ids)
        write_meta(depth_dir, run_record(settings, args.split, ids, left, shards, state.num_processes))
        if args.preview > 0:
            write_preview(root, ids, left, args.preview)
    state.wait_for_everyone()
    check_degenerate(shards, args.model, state)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Pseudo depth maps for a VOC-format folder", add_help=True)
    parser.add_argument("--data-root", default=PRESETS["voc"].data_root, help="VOCdevkit/VOC2012 or a folder containing VOCdevkit/")
    parser.add_argument("--model", default="facebook/dpt-dinov2-small-nyu", help="hub id or save_pretrained folder")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    parser.add_argument("--split", default="trainval", help="ImageSets/Segmentation/<split>.txt, or 'all' JPEGs")
    parser.add_argument("--batch-size", default=8, type=int, help="images per forward pass (per process)")
    parser.add_argument("--workers", default=2, type=int, help="DataLoader processes decoding images")
    parser.add_argument("--overwrite", action="store_true", help="delete the split's maps first, then remake them")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    parser.add_argument("--native", default="auto", choices=["auto", "metric", "disparity"],
                        help="what the model predicts; auto reads the model config")
    parser.add_argument("--preview", default=0, type=int, metavar="N", help="write PseudoDepth/preview.png of N ids")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
