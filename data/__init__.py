"""Datasets: VOC 2012 (+ pseudo depth, instances), your own VOC-format folder, Cityscapes, the synthetic demo set,
presets and transforms. A preset opens its splits: `preset.for_root(root).open(root, split, transforms, ...)`."""
import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from torch.utils.data import Dataset

from data import cityscapes
from data.cityscapes import CityscapesSegmentation, resolve_cityscapes_root
from data.folder import CLASSES_FILE, read_classes
from data.pools import (REST, DepthOnlyChoice, DepthOnlyImages, TrainPool, choose_depth_only, open_depth_only,
                        voc_fix_command, voc_images)
from data.transforms import collate, get_transform
from data.voc import (IGNORE_INDEX, VOC_CLASSES, VOC_COLOURS, DataError, Depth, VOCSegmentation, depth_fix_command,
                      resolve_voc_root)

READERS = ("voc", "folder", "cityscapes")


@dataclass(frozen=True)
class Preset:
    """Defaults a dataset brings; every field is overridable from the command line."""

    data_root: str | None  # None: the user must pass --data-root
    base_size: int  # random rescale is relative to this
    crop_size: int
    batch_size: int
    epochs: int  # per stage when neither --stage-epochs nor --stage-steps is given (and no stage_steps below)
    encoder_weights: str
    encoder: str = "resnet50"  # the paper's
    lr: float = 1e-4  # the paper's Adam learning rate
    lr_schedule: str = "constant"  # the paper's: no decay mentioned
    warmup: float = 0.0
    # stage lengths in steps by stage name ((name, steps) pairs), instead of `epochs`; None: epochs
    stage_steps: tuple[tuple[str, int], ...] | None = None
    val_every: int | None = None  # steps between validations in a stage given in steps (0: once, at its end)
    decoder_channels: tuple[int, ...] | None = None  # None: the encoder's (models.encoder.default_decoder_channels)
    num_classes: int = 21
    train_split: str = "train"
    val_split: str = "val"
    reader: str = "voc"  # voc | folder (VOC layout, classes.txt) | cityscapes (official layout): see open()
    class_names: tuple[str, ...] | None = VOC_CLASSES  # one per label value; None until for_root (folder)
    palette: tuple[tuple[int, int, int], ...] | None = VOC_COLOURS  # RGB per label value, as class_names
    # iIoU (evaluation.metrics.InstanceIoU): the classes that have instances (None: every foreground class, VOC's)
    # and fixed average instance sizes to weight them by, (class, pixels) pairs (None: the split's own averages)
    instance_classes: tuple[int, ...] | None = None
    avg_instance_size: tuple[tuple[int, float], ...] | None = None
    # the label value of unlabelled pixels in every reader's output (Cityscapes' void ids are mapped to it);
    # losses, metrics and the transforms' padding ignore it
    ignore_index: ClassVar[int] = IGNORE_INDEX

    def __post_init__(self):
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {self.reader!r}")
        for what in ("class_names", "palette"):
            given = getattr(self, what)
            if given is not None and len(given) != self.num_classes:
                raise ValueError(f"{what} has {len(given)} entries, num_classes is {self.num_classes}")

    def fill(self, args: argparse.Namespace) -> argparse.Namespace:
        """A copy of train.py's args with every flag left at None set to this preset's value (args is unchanged)."""
        filled = {k: getattr(self, k) for k in FROM_PRESET if getattr(args, k, None) is None}
        return argparse.Namespace(**{**vars(args), **filled})

    def metric_options(self) -> dict:
        """SegEvaluator's keyword arguments for this dataset: class names and how iIoU weights instances."""
        return {"class_names": self.class_names, "instance_classes": self.instance_classes,
                "avg_instance_size": dict(self.avg_instance_size) if self.avg_instance_size is not None else None}

    def for_root(self, root: str | Path) -> "Preset":
        """This preset completed from the dataset folder: for `folder`, num_classes, class_names and palette from its
        classes.txt (DataError naming the file and line when it is missing or malformed); others: unchanged."""
        if self.reader != "folder":
            return self
        names, colours = read_classes(resolve_voc_root(root))
        return replace(self, num_classes=len(names), class_names=names, palette=colours)

    def open(self, root: str | Path, split: str, transforms=None, with_depth: bool = False,
             check: bool = True) -> Dataset:
        """A split as a dataset of VOCSegmentation's sample dicts and attributes (ids, split, root, skipped,
        with_instances, num_classes, check_header, load, depth_fix); check: header checks up front."""
        if self.reader == "cityscapes":
            return CityscapesSegmentation(root, split, transforms, with_depth, check)
        return VOCSegmentation(root, split, transforms, with_depth, self.for_root(root).num_classes, check)

    def open_depth_only(self, root: str | Path, spec: str, labelled: list[str], val: list[str], with_val: bool = False,
                        transforms=None, check: bool = True) -> tuple[DepthOnlyImages | None, DepthOnlyChoice]:
        """The depth-only images of `--depth-only spec` (data/pools.py): none of the labelled ids, and none of the val
        ids unless with_val (None when `rest` leaves none: every image is labelled); DataError when a listed split
        leaves none, or an image has no pseudo depth."""
        if self.reader == "cityscapes":
            root = resolve_cityscapes_root(root)
            images = cityscapes.depth_only_images(root, spec)
            fix = (f"python -c \"from data.cityscapes import add_depth_view; add_depth_view('{root}', ('train', "
                   f"'val', 'train_extra'))\"\n  {depth_fix_command(root, 'trainval')}")
        else:
            root = resolve_voc_root(root)
            images, fix = voc_images(root, spec), voc_fix_command(root, spec)
        choice = choose_depth_only(list(images), labelled, val, with_val)
        if not choice.ids and spec != REST:  # `rest` may be empty: every image is labelled (a sweep's `all`)
            raise DataError(f"{root}: --depth-only {spec} leaves no image ({choice.listed} listed, "
                            f"{choice.labelled_dropped} labelled, {choice.val_dropped} in the val split)")
        if not choice.ids:
            return None, choice
        return open_depth_only(images, root / "PseudoDepth", choice, fix, transforms, check), choice


# train.py flags whose default (None) means "the dataset preset's"
FROM_PRESET = ("data_root", "encoder", "encoder_weights", "batch_size", "crop_size", "base_size", "lr", "lr_schedule",
               "warmup", "train_split", "val_every", "decoder_channels")


PRESETS = {
    # from scratch in minutes on a 2-core CPU (README: the default run's metrics): a small encoder, 96 px, and the
    # higher lr with warmup and cosine decay that from-scratch training wants (docs/results.md: what 1e-4 gives)
    # the five-minute demo: 96 px scenes, 64 px crops (scale 0.5-2 of 96), stage lengths in steps (an epoch is 62),
    # validated once at each stage's end; docs/results.md and the README say what each choice costs and buys
    "synthetic": Preset("datasets/synthetic", base_size=96, crop_size=64, batch_size=16, epochs=3, encoder_weights="none",
                        encoder="resnet18", lr=1e-3, lr_schedule="cosine", warmup=0.05,
                        stage_steps=(("d", 60), ("s", 360), ("b", 140)), val_every=0),
    # torchvision reference sizes (base 520, crop 480); the paper gives no epochs, 30 per stage is our choice
    "voc": Preset("datasets/VOCdevkit/VOC2012", base_size=520, crop_size=480, batch_size=8, epochs=30, encoder_weights="imagenet"),
    # your own VOC-format folder: VOC's recipe; the classes (and their number) come from its classes.txt (for_root)
    "folder": Preset(None, base_size=520, crop_size=480, batch_size=8, epochs=30, encoder_weights="imagenet",
                     num_classes=0, reader="folder", class_names=None, palette=None),
    # 1024x2048 images: the shorter side rescaled to 512..2048 (scale 0.5..2, as DeepLab and mmsegmentation train
    # Cityscapes), 768 px crops (DeepLab's 769, a multiple of 32 here); the paper's ResNet50 and Adam 1e-4; epochs ours
    "cityscapes": Preset("datasets/cityscapes", base_size=1024, crop_size=768, batch_size=8, epochs=60,
                         encoder_weights="imagenet", num_classes=cityscapes.NUM_CLASSES, reader="cityscapes",
                         class_names=cityscapes.CLASS_NAMES, palette=cityscapes.COLOURS,
                         instance_classes=tuple(sorted(cityscapes.OFFICIAL_AVG_INSTANCE_SIZE)),
                         avg_instance_size=tuple(sorted(cityscapes.OFFICIAL_AVG_INSTANCE_SIZE.items()))),
}


def prepare_root(dataset: str, data_root: str | Path | None) -> Path:
    """The dataset folder; the synthetic set is generated on first use (one of an older generator: again)."""
    if data_root is None:
        raise DataError(f"--dataset {dataset} needs --data-root DIR"
                        + (f" (a VOC-format folder with {CLASSES_FILE} next to JPEGImages/)" if dataset == "folder" else ""))
    if dataset == "synthetic":
        from data.synthetic import make_synthetic, regenerate_if_old

        if not (Path(data_root) / "SYNTHETIC.json").is_file():
            return make_synthetic(data_root)
        if regenerate_if_old(data_root):
            print(f"{data_root}: made by an older synthetic generator; regenerated with the same parameters")
    if PRESETS[dataset].reader == "cityscapes":
        return resolve_cityscapes_root(data_root)
    root = resolve_voc_root(data_root)
    if PRESETS[dataset].reader == "folder":
        read_classes(root)  # a missing or malformed classes.txt stops here, before anything is built
    return root


def guess_dataset(data_root: str | Path) -> str:
    """The PRESETS name a folder looks like (for tools given only --data-root): cityscapes (leftImg8bit/ and
    gtFine/), folder (classes.txt next to JPEGImages/), else voc."""
    path = Path(data_root)
    if (path / "leftImg8bit").is_dir() and (path / "gtFine").is_dir():
        return "cityscapes"
    try:
        return "folder" if (resolve_voc_root(path) / CLASSES_FILE).is_file() else "voc"
    except DataError:
        return "voc"  # opening it says what is wrong


__all__ = ["PRESETS", "CityscapesSegmentation", "DataError", "Depth", "DepthOnlyChoice", "DepthOnlyImages", "Preset",
           "TrainPool", "VOCSegmentation", "collate", "get_transform", "guess_dataset", "prepare_root"]
