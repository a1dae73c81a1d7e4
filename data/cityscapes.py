"""Cityscapes in its official layout (`--dataset cityscapes`): fine labels as the 19 train ids, instances for iIoU.

    DIR/leftImg8bit/{train,val,test}/<city>/<id>_leftImg8bit.png
    DIR/gtFine/{train,val,test}/<city>/<id>_gtFine_labelIds.png      label ids 0..33
    DIR/gtFine/{train,val,test}/<city>/<id>_gtFine_instanceIds.png   16-bit: class*1000 + k on instances, else the label id
    DIR/PseudoDepth/<id>.png                                         optional, as tools/make_depth.py writes it

<id> is `<city>_<sequence>_<frame>`, unique over the whole set. torchvision's `datasets.Cityscapes` lists the
files and gives the class table (ids, train ids, colours); reading, checks and the sample format are VOC's
(data/voc.py). Labels: each label id -> its train id, every other id (void, and caravan, trailer, license
plate, which Cityscapes does not evaluate) -> 255. Instances: the raw instance id (class*1000 + k, k from 0)
on the pixels of an instance of the 8 evaluated instance classes (person, rider, car, truck, bus, train,
motorcycle, bicycle), 0 elsewhere (crowd regions, which carry the bare label id, are not instances), so that
evaluation.metrics.InstanceIoU weights each ground-truth instance as Cityscapes' iIoU does.

Pseudo depth: tools/make_depth.py reads VOC-format folders (JPEGImages/<id>.jpg, ImageSets/Segmentation/).
`add_depth_view(DIR)` adds such a view to DIR (links to the leftImg8bit PNGs, and the split lists), after which
`python tools/make_depth.py --data-root DIR` writes DIR/PseudoDepth/<id>.png unchanged:

    python -c "from data.cityscapes import add_depth_view; add_depth_view('DIR')"
"""
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import Cityscapes

from data.voc import (
    DEPTH_MODES_16BIT,
    IGNORE_INDEX,
    MISSING_SHOWN,
    DataError,
    Depth,
    depth_fix_command,
    print_warnings,
    read_depth,
    read_header,
    read_png_array,
    read_rgb,
    read_split,
    size_error,
    split_file,
)

SPLITS = ("train", "val", "test")  # gtFine's
IMAGE_SPLITS = ("train", "train_extra", "val", "test")  # leftImg8bit's (train_extra: the 19,998 coarse images)
REST_SPLITS = ("train", "train_extra")  # --depth-only rest: these, less the labelled images
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
INSTANCE_DIVISOR = 1000  # instance id = label id * 1000 + k
DEPTH_DIR = "PseudoDepth"

EVALUATED = sorted((c for c in Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX), key=lambda c: c.train_id)
CLASS_NAMES = tuple(c.name for c in EVALUATED)  # the 19 train ids' names, road .. bicycle
COLOURS = tuple(tuple(c.color) for c in EVALUATED)  # their official colours
NUM_CLASSES = len(EVALUATED)
LABEL_IDS = sorted(c.id for c in Cityscapes.classes if c.id >= 0)  # 0..33 (license plate, -1, is never stored)
TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # label id -> train id, 255 = not evaluated
TRAIN_ID[[c.id for c in EVALUATED]] = [c.train_id for c in EVALUATED]
INSTANCE_LABEL_IDS = tuple(c.id for c in EVALUATED if c.has_instances)  # 24..33 less caravan, trailer: 8 classes
# The official script (cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py, args.avgClassSize) weights
# instances by these fixed averages (pixels, over the train set); the cityscapes preset gives them to InstanceIoU
# (which otherwise uses the evaluated split's own averages). Train id -> average instance size.
OFFICIAL_AVG_INSTANCE_SIZE = {11: 3462.4756337644, 12: 3930.4788056518, 13: 12794.0202738185, 14: 27855.1264367816,
                              15: 35732.1511111111, 16: 67583.7075812274, 17: 6298.7200839748, 18: 4672.3249222261}


def resolve_cityscapes_root(path: str | Path) -> Path:
    """The folder holding leftImg8bit/ and gtFine/."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist (expected the Cityscapes folder with leftImg8bit/ and gtFine/)")
    missing = [d for d in ("leftImg8bit", "gtFine") if not (path / d).is_dir()]
    if missing:
        raise DataError(f"{path}: not a Cityscapes folder (no {' or '.join(d + '/' for d in missing)} here; unpack "
                        f"leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into it)")
    return path


def list_split(root: Path, split: str) -> dict[str, str]:
    """{id: city} of a split, through torchvision's Cityscapes (which checks the split name and folders)."""
    for kind in ("leftImg8bit", "gtFine"):  # checked here so that torchvision never tries to unpack zips
        if not (root / kind / split).is_dir():
            raise DataError(f"{root / kind / split}: not found (split {split!r}; gtFine has {', '.join(SPLITS)})")
    try:
        images = Cityscapes(str(root), split=split, mode="fine", target_type="semantic").images
    except (ValueError, OSError) as exc:  # an unknown split name, a file where a city folder should be
        raise DataError(f"{root}: cannot list split {split!r} of Cityscapes ({exc})") from exc
    found = {Path(p).name.removesuffix(IMAGE_SUFFIX): Path(p).parent.name for p in images if p.endswith(IMAGE_SUFFIX)}
    if not found:
        raise DataError(f"{root / 'leftImg8bit' / split}: split {split!r} is empty (no <city>/*{IMAGE_SUFFIX})")
    return dict(sorted(found.items()))


def list_images(root: Path, splits: tuple[str, ...] = IMAGE_SPLITS) -> dict[str, Path]:
    """{id: leftImg8bit image} of the splits present among `splits` (a glob: train_extra has no fine labels)."""
    found = {}
    for split in splits:
        for path in sorted((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")):
            found[path.name.removesuffix(IMAGE_SUFFIX)] = path
    return found


def listed_split(root: Path, split: str) -> dict[str, tuple[str, str]]:
    """{id: (gtFine split, city)} of a split: gtFine's own (train, val, test), or a list of ids (a name in
    ImageSets/Segmentation/ as tools/make_subsets.py writes them, or a .txt path) found in gtFine's train or val."""
    if split in SPLITS:
        return {i: (split, city) for i, city in list_split(root, split).items()}
    ids = read_split(root, split)
    known = {i: (s, city) for s in ("train", "val") if (root / "gtFine" / s).is_dir()
             for i, city in list_split(root, s).items()}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DataError(f"{split_file(root, split)}: {len(unknown)} ids are not in gtFine's train or val "
                        f"(e.g. {', '.join(unknown[:MISSING_SHOWN])})")
    return {i: known[i] for i in ids}


def depth_only_images(root: Path, spec: str) -> dict[str, Path]:
    """{id: image} for --depth-only: `rest` (train and train_extra images) or a list of ids (any leftImg8bit split)."""
    if spec == "rest":
        return list_images(root, REST_SPLITS)
    every = list_images(root)
    ids = read_split(root, spec)
    unknown = [i for i in ids if i not in every]
    if unknown:
        raise DataError(f"{split_file(root, spec)}: {len(unknown)} ids have no image in leftImg8bit/"
                        f"{{{','.join(IMAGE_SPLITS)}}} (e.g. {', '.join(unknown[:MISSING_SHOWN])})")
    return {i: every[i] for i in ids}


def to_train_ids(label_ids: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) label ids -> train ids (255 = ignored), naming the file on an id Cityscapes does not have."""
    bad = np.setdiff1d(np.unique(label_ids), LABEL_IDS)
    if bad.size:
        raise DataError(f"{path}: label ids {bad[:10].tolist()} are not Cityscapes label ids (0..{LABEL_IDS[-1]})")
    return TRAIN_ID[label_ids]


def to_instances(instance_ids: np.ndarray) -> np.ndarray:
    """(H, W) gtFine instanceIds -> int32 map: the instance id on instances of the 8 evaluated classes, else 0."""
    ids = instance_ids.astype(np.int32)
    keep = (ids >= INSTANCE_DIVISOR) & np.isin(ids // INSTANCE_DIVISOR, INSTANCE_LABEL_IDS)
    return np.where(keep, ids, 0).astype(np.int32)


class CityscapesSegmentation(Dataset):
    """Samples as VOCSegmentation's: image, label (train ids), instances (if instanceIds exist), depth (if asked), id."""

    def __init__(self, root, split: str = "train", transforms=None, with_depth: bool = False, check: bool = True):
        self.root = resolve_cityscapes_root(root)
        self.split = split
        self.where = listed_split(self.root, split)  # {id: (gtFine split, city)}
        self.ids = list(self.where)
        self.transforms = transforms
        self.with_depth = with_depth
        self.num_classes = NUM_CLASSES
        self.with_instances = self.path("instances", 0).is_file()
        self.skipped: list[str] = []  # problems of the samples --skip-bad-samples removed
        if check:  # what file headers tell, before training: missing files, sizes, formats
            self.check_files()
            print_warnings([w for i in range(len(self.ids)) for w in self.check_header(i)], len(self.ids), split)

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, kind: str, idx: int) -> Path:
        """The file of sample idx: kind is image | label | instances | depth."""
        i = self.ids[idx]
        split, city = self.where[i]
        if kind == "depth":
            return self.root / DEPTH_DIR / f"{i}.png"
        if kind == "image":
            return self.root / "leftImg8bit" / split / city / f"{i}{IMAGE_SUFFIX}"
        return self.root / "gtFine" / split / city / f"{i}{LABEL_SUFFIX if kind == 'label' else INSTANCE_SUFFIX}"

    def kinds(self) -> dict[str, str]:
        """The files each sample needs besides its image: kind -> what the messages call it."""
        kinds = {"label": "label", "instances": "instance ids"} if self.with_instances else {"label": "label"}
        return {**kinds, "depth": "pseudo depth"} if self.with_depth else kinds

    def depth_fix(self) -> str:
        """How to make this split's missing pseudo depth (appended to messages about it)."""
        view = f"python -c \"from data.cityscapes import add_depth_view; add_depth_view('{self.root}')\""
        return (f"Make it with tools/make_depth.py on a VOC-format view of this folder:\n  {view}\n  "
                f"{depth_fix_command(self.root, self.split)}\nor train a schedule without depth (--schedule s)")

    def check_files(self) -> None:
        """Fail before training when files of the split are missing, naming a few (and, for depth, the fix)."""
        for kind, what in self.kinds().items():
            missing = [i for k, i in enumerate(self.ids) if not self.path(kind, k).is_file()]
            if missing:
                folder = self.path(kind, self.ids.index(missing[0])).parent
                fix = f". {self.depth_fix()}" if kind == "depth" else ""
                raise DataError(f"{folder}: {len(missing)} of {len(self.ids)} {what} files of split {self.split!r} "
                                f"are missing (e.g. {', '.join(missing[:MISSING_SHOWN])}){fix}")

    def check_header(self, idx: int) -> list[str]:
        """Raise DataError for a missing file, a size mismatch or a wrong format; return warnings (8-bit depth)."""
        size, _ = read_header(self.path("image", idx), "image")
        modes = {"label": ("L", "P"), "instances": ("L", *DEPTH_MODES_16BIT), "depth": ("L", *DEPTH_MODES_16BIT)}
        found = []
        for kind, what in self.kinds().items():
            path = self.path(kind, idx)
            other, mode = read_header(path, what)
            if mode not in modes[kind]:
                raise DataError(f"{path}: {what} must be a single-channel PNG ({' or '.join(modes[kind])}), "
                                f"got mode {mode}")
            if other != size:
                raise size_error(path, what, other, size)
            if kind == "depth" and mode == "L":
                found.append(f"{path}: 8-bit pseudo depth (expected 16-bit, as tools/make_depth.py writes); read as 0..255")
        return found

    def read_image(self, idx: int) -> torch.Tensor:
        """Decoded RGB image (3, H, W) uint8."""
        return read_rgb(self.path("image", idx))

    def read_map(self, kind: str, idx: int, size: tuple[int, int]) -> np.ndarray:
        """A single-channel map of the sample, checked against the image's size."""
        path = self.path(kind, idx)
        if not path.is_file():
            raise DataError(f"{path}: {self.kinds()[kind]} missing (the image is in the split)")
        arr = read_png_array(path)
        if arr.ndim != 2:
            raise DataError(f"{path}: {self.kinds()[kind]} must be a single-channel PNG, got shape {arr.shape}")
        if arr.shape != size:
            raise size_error(path, self.kinds()[kind], arr.shape, size)
        return arr

    def load(self, idx: int) -> dict:
        """The sample before transforms."""
        image = self.read_image(idx)
        size = tuple(image.shape[-2:])
        label = to_train_ids(self.read_map("label", idx, size), self.path("label", idx))
        sample = {"image": tv_tensors.Image(image), "label": tv_tensors.Mask(torch.from_numpy(label)),
                  "id": self.ids[idx]}
        if self.with_instances:
            sample["instances"] = tv_tensors.Mask(torch.from_numpy(to_instances(self.read_map("instances", idx, size))))
        if self.with_depth:
            path = self.path("depth", idx)
            if not path.is_file():
                raise DataError(f"{path}: pseudo depth missing. {self.depth_fix()}")
            sample["depth"] = Depth(read_depth(path, size))
        return sample

    def __getitem__(self, idx: int) -> dict:
        sample = self.load(idx)
        return self.transforms(sample) if self.transforms else sample


def link(target: Path, link_path: Path) -> None:
    """A relative symlink link_path -> target (the dataset folder can move), replacing one that points elsewhere."""
    relative = Path(os.path.relpath(target, link_path.parent))
    if link_path.is_symlink() and Path(os.readlink(link_path)) == relative:
        return
    if link_path.exists() and not link_path.is_symlink():
        raise DataError(f"{link_path}: exists and is not a link made by add_depth_view; left as it is")
    link_path.unlink(missing_ok=True)
    link_path.symlink_to(relative)


def add_depth_view(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Make tools/make_depth.py read the folder: JPEGImages/<id>.jpg links to the leftImg8bit PNGs (PIL reads them
    by content, not by name) and ImageSets/Segmentation/<split>.txt lists, trainval (its default: the splits given)
    included. Add "train_extra" to the splits for depth-only training on its images (--depth-only rest)."""
    root = resolve_cityscapes_root(root)
    images, lists = root / "JPEGImages", root / "ImageSets" / "Segmentation"
    images.mkdir(exist_ok=True)
    lists.mkdir(parents=True, exist_ok=True)
    every = {}
    for split in splits:
        found = list_images(root, (split,))
        if not found:
            raise DataError(f"{root / 'leftImg8bit' / split}: no <city>/*{IMAGE_SUFFIX} images")
        for i, path in found.items():
            link(path, images / f"{i}.jpg")
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in found))
        every.update(found)
    (lists / "trainval.txt").write_text("".join(f"{i}\n" for i in every))
    return images

