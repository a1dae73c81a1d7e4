"""PASCAL VOC 2012 segmentation in its distributed layout, with optional instances and pseudo depth.

Splits are ImageSets/Segmentation/<split>.txt, or any .txt file of ids given by its path. SBD's augmented labels
(SegmentationClassAug/, grey PNGs 0..20 and 255, as DeepLab distributes them with train_aug.txt: 10,582 images)
are read for every split whose name starts with `train_aug` (train_aug itself and its subsets, train_aug_n100);
other splits read SegmentationClass/.
"""
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

IGNORE_INDEX = 255  # label value of unlabelled pixels (VOC's object boundaries): no loss, no metric
DEPTH_SCALE = 65535.0  # 16-bit PNG -> 0..1 inverse depth (README, "Pseudo depth")
MISSING_SHOWN = 5  # ids named in a "missing files" error
DEPTH_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I")  # what PIL calls a 16-bit grey PNG
LABEL_DIR, AUG_LABEL_DIR = "SegmentationClass", "SegmentationClassAug"
AUG_PREFIX = "train_aug"  # splits read from AUG_LABEL_DIR
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


def _voc_palette() -> list[int]:
    """Return the standard VOC colormap (bit-shuffled label index) as 256*3 ints."""
    palette = []
    for label in range(256):
        rgb, c = [0, 0, 0], label
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        palette.extend(rgb)
    return palette


VOC_PALETTE = _voc_palette()


def voc_colour(index: int) -> tuple[int, int, int]:
    """VOC's colour of a label value (0..255; 255 is the boundary colour)."""
    return tuple(VOC_PALETTE[3 * index : 3 * index + 3])


VOC_COLOURS = tuple(voc_colour(c) for c in range(len(VOC_CLASSES)))  # (21, 3): the label set's colours


class Depth(tv_tensors.Mask):
    """Pseudo depth (1, H, W) float: resized like a mask (nearest), padded with NaN (= invalid)."""


class DataError(ValueError):
    """A problem with a data file; the message names the file."""


class DataWarning(UserWarning):
    """A data file that works but is probably not what was meant (constant pseudo depth, found when read)."""


def resolve_voc_root(path: str | Path) -> Path:
    """Accept VOCdevkit/VOC2012 itself or any folder above it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist (expected VOCdevkit/VOC2012 with JPEGImages/, or a folder above it)")
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"{path}: not a VOC 2012 folder (no JPEGImages/ here, in VOC2012/ or VOCdevkit/VOC2012/)")


def split_file(root: Path, split: str) -> Path:
    """The list of a split: ImageSets/Segmentation/<split>.txt, or `split` itself when it names a .txt file."""
    if split.endswith(".txt"):
        return Path(split)
    return root / "ImageSets" / "Segmentation" / f"{split}.txt"


def label_dir(split: str) -> str:
    """The folder a split's labels are in: SBD's for train_aug and its subsets, else VOC's."""
    name = Path(split).stem if split.endswith(".txt") else split
    return AUG_LABEL_DIR if name.startswith(AUG_PREFIX) else LABEL_DIR


def read_split(root: Path, split: str) -> list[str]:
    """Ids listed in a split's file (split_file)."""
    path = split_file(root, split)
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: split {split!r} is empty")
    return ids


def read_rgb(path: Path) -> torch.Tensor:
    """A decoded RGB image (3, H, W) uint8; DataError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return pil_to_tensor(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        kind = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lstrip(".").upper() or "file"
        raise DataError(f"{path}: unreadable image (corrupt or truncated {kind}: {exc})") from exc


def depth_fix_command(root: Path, split: str) -> str:
    """The command that writes the missing pseudo depth maps."""
    return f"python tools/make_depth.py --data-root {shlex.quote(str(root))} --split {shlex.quote(split)}"


def print_warnings(found: list[str], total: int, split: str) -> None:
    """One `warning: ...` line on stderr for all the files of a kind, not one per file."""
    if found:  # printed, not warnings.warn: Python's format adds a source line that means nothing to a user
        print(f"warning: {len(found)} of {total} samples of split {split!r}: {found[0]}"
              + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""), file=sys.stderr)


def list_images(root: Path) -> list[str]:
    """Ids of every image in JPEGImages/, sorted."""
    return sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))


def missing_depth(root: Path, ids: list[str]) -> list[str]:
    """Ids that have no PseudoDepth/<id>.png yet."""
    depth_dir = resolve_voc_root(root) / "PseudoDepth"
    return [i for i in ids if not (depth_dir / f"{i}.png").is_file()]


def check_files(root: Path, ids: list[str], split: str, need_depth: bool, labels: str | None = LABEL_DIR) -> None:
    """Fail before training when listed files are missing, naming a few and how to fix it; labels: the label folder
    (None: the images have no labels)."""
    kinds = {"JPEGImages": ".jpg", **({labels: ".png"} if labels else {})}
    if need_depth:
        kinds["PseudoDepth"] = ".png"
    for folder, ext in kinds.items():
        missing = [i for i in ids if not (root / folder / f"{i}{ext}").is_file()]
        if not missing:
            continue
        msg = (
            f"{root / folder}: {len(missing)} of {len(ids)} files of split {split!r} are missing "
            f"(e.g. {', '.join(missing[:MISSING_SHOWN])})"
        )
        if folder == "PseudoDepth":
            msg += f". Make them with:\n  {depth_fix_command(root, split)}"
        raise DataError(msg)


def read_header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """(H, W) and PIL mode from the file's header only (nothing decoded)."""
    try:
        with Image.open(path) as im:
            return (im.height, im.width), im.mode
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {what} missing (the id is listed in the split)") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from exc


def size_error(path: Path, what: str, size: tuple[int, int], image_size: tuple[int, int]) -> DataError:
    """Sizes are (H, W); the message shows them as (W, H) like PIL."""
    return DataError(f"{path}: {what} size {tuple(size[::-1])} differs from the image's {tuple(image_size[::-1])}")


def read_png_array(path: Path) -> np.ndarray:
    """PNG -> array of its stored values (palette indices for 'P', 16-bit for depth)."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable PNG ({exc})") from exc


def read_label(path: Path, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """Class map (H, W) uint8 with values 0..num_classes-1 or 255, checked."""
    arr = read_png_array(path)
    if arr.ndim != 2:
        raise DataError(f"{path}: label must be a single-channel (palette or grey) PNG, got shape {arr.shape}")
    if arr.shape != size:
        raise size_error(path, "label", arr.shape, size)
    bad = np.setdiff1d(np.unique(arr), np.r_[np.arange(num_classes), IGNORE_INDEX])
    if bad.size:
        raise DataError(f"{path}: label values {bad[:10].tolist()} outside 0..{num_classes - 1} and 255")
    return torch.from_numpy(arr.astype(np.uint8))


def read_depth(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """16-bit pseudo depth -> (1, H, W) float in 0..1 (an 8-bit map, warned about up front, is read as 0..255)."""
    arr = read_png_array(path)
    if arr.ndim != 2:
        raise DataError(f"{path}: pseudo depth must be a single-channel 16-bit PNG, got shape {arr.shape}")
    if arr.shape != size:
        raise size_error(path, "pseudo depth", arr.shape, size)
    if arr.min() == arr.max():
        warnings.warn(f"{path}: constant pseudo depth ({int(arr.min())} everywhere): nothing to learn from it; "
                      f"remake it with tools/make_depth.py --overwrite", DataWarning, stacklevel=2)
    scale = 255.0 if arr.dtype == np.uint8 else DEPTH_SCALE
    return torch.from_numpy(arr.astype(np.float32) / scale)[None]


class VOCSegmentation(Dataset):
    """Samples as dicts: image, label, depth (if asked), instances (if SegmentationObject exists), id.

    Also the reader of `--dataset folder` (a VOC-format folder with its own classes.txt): labels are checked
    against `num_classes`, a value outside 0..num_classes-1 and 255 names the file and the value.
    """

    def __init__(self, root, split: str = "train", transforms=None, with_depth: bool = False, num_classes: int = 21,
                 check: bool = True):
        self.root = resolve_voc_root(root)
        self.split = split
        self.ids = read_split(self.root, split)
        self.transforms = transforms
        self.with_depth = with_depth
        self.num_classes = num_classes
        self.labels = label_dir(split)
        # SBD has no instance masks
        self.with_instances = self.labels == LABEL_DIR and (self.root / "SegmentationObject").is_dir()
        self.skipped: list[str] = []  # problems of the samples --skip-bad-samples removed
        if check:  # what file headers tell, before training: missing files, sizes, formats
            check_files(self.root, self.ids, split, with_depth, self.labels)
            self.warn([w for i in range(len(self.ids)) for w in self.check_header(i)])

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, folder: str, idx: int) -> Path:
        return self.root / folder / f"{self.ids[idx]}{'.jpg' if folder == 'JPEGImages' else '.png'}"

    def check_header(self, idx: int) -> list[str]:
        """Raise DataError for a missing file, a size mismatch or a wrong format; return warnings (8-bit depth)."""
        size, _ = read_header(self.path("JPEGImages", idx), "image")
        others = {self.labels: "label"}
        if self.with_instances:
            others["SegmentationObject"] = "instance mask"
        if self.with_depth:
            others["PseudoDepth"] = "pseudo depth"
        found = []
        for folder, what in others.items():
            path = self.path(folder, idx)
            other, mode = read_header(path, what)
            if folder == "PseudoDepth" and mode not in ("L", *DEPTH_MODES_16BIT):
                raise DataError(f"{path}: pseudo depth must be a single-channel 16-bit PNG, got mode {mode}")
            if folder != "PseudoDepth" and mode not in ("P", "L"):
                raise DataError(f"{path}: {what} must be a single-channel (palette or grey) 8-bit PNG, got mode {mode}")
            if other != size:
                raise size_error(path, what, other, size)
            if folder == "PseudoDepth" and mode == "L":
                found.append(f"{path}: 8-bit pseudo depth (expected 16-bit, as tools/make_depth.py writes); read as 0..255")
        return found

    def warn(self, found: list[str]) -> None:
        """One `warning: ...` line on stderr for all the files of a kind, not one per file."""
        print_warnings(found, len(self.ids), self.split)

    def depth_fix(self) -> str:
        """How to make this split's missing pseudo depth (appended to messages about it)."""
        return f"Make the pseudo depth with:\n  {depth_fix_command(self.root, self.split)}"

    def read_image(self, idx: int) -> torch.Tensor:
        """Decoded RGB image (3, H, W) uint8."""
        return read_rgb(self.path("JPEGImages", idx))

    def load(self, idx: int) -> dict:
        """The sample before transforms."""
        i = self.ids[idx]
        image = self.read_image(idx)
        size = tuple(image.shape[-2:])
        sample = {
            "image": tv_tensors.Image(image),
            "label": tv_tensors.Mask(read_label(self.root / self.labels / f"{i}.png", self.num_classes, size)),
            "id": i,
        }
        inst_path = self.root / "SegmentationObject" / f"{i}.png"
        if self.with_instances:
            if not inst_path.is_file():
                raise DataError(f"{inst_path}: instance mask missing (SegmentationObject/ exists for this split)")
            inst = read_png_array(inst_path)
            if inst.shape != size:
                raise size_error(inst_path, "instance mask", inst.shape, size)
            sample["instances"] = tv_tensors.Mask(torch.from_numpy(inst.astype(np.uint8)))
        if self.with_depth:
            sample["depth"] = Depth(read_depth(self.root / "PseudoDepth" / f"{i}.png", size))
        return sample

    def __getitem__(self, idx: int) -> dict:
        sample = self.load(idx)
        return self.transforms(sample) if self.transforms else sample
