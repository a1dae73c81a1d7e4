"""Few labels, many images: the training pool of labelled images and of depth-only images (pseudo depth, no label).

A depth-only image never has a label read: its sample carries a label of 255 everywhere (ignored by the focal loss
and by every metric), so it can teach the depth decoder and the encoder, never the segmentation decoder. Which
images are depth-only (`--depth-only`):

- `none`: no depth-only images (every stage trains on the labelled split);
- `rest`: every image of the dataset outside the labelled split and the val split (VOC layout: JPEGImages/;
  Cityscapes: leftImg8bit/train and leftImg8bit/train_extra);
- a split name or a .txt file of ids (VOC layout: ImageSets/Segmentation/<name>.txt; Cityscapes: ids found in
  leftImg8bit/{train,train_extra,val,test}).

Labelled images are never also depth-only (no image counts twice), and val images are left out unless the user
opts in (`--depth-only-val`), so validation stays images the model never trained on.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from schedules import Stage, stage_rounds

from data.sampler import Stream
from data.voc import (
    IGNORE_INDEX, MISSING_SHOWN, DataError, Depth, depth_fix_command, list_images, read_depth, read_header,
    read_rgb, read_split, size_error,
)

NONE, REST = "none", "rest"


class DepthOnlyImages(Dataset):
    """Images with pseudo depth and no segmentation label: VOCSegmentation's samples (image, label, depth, id), the
    label 255 everywhere. `images` and `depths`: {id: path}."""

    def __init__(self, ids: list[str], images: dict[str, Path], depths: dict[str, Path], transforms=None,
                 depth_fix: str = "", check: bool = True):
        self.ids, self.images, self.depths, self.transforms = list(ids), images, depths, transforms
        self.split, self.fix = "depth-only", depth_fix
        self.root = next(iter(depths.values())).parent if depths else Path(".")
        self.skipped: list[str] = []
        if check:  # every listed file is there and the depth map is the image's size, from the headers
            missing = [i for i in self.ids if not self.depths[i].is_file()]
            if missing:
                raise DataError(f"{self.depths[missing[0]].parent}: {len(missing)} of {len(self.ids)} depth-only images "
                                f"have no pseudo depth (e.g. {', '.join(missing[:MISSING_SHOWN])}). {self.depth_fix()}")
            for idx in range(len(self.ids)):
                self.check_header(idx)

    def __len__(self) -> int:
        return len(self.ids)

    def depth_fix(self) -> str:
        return f"Make the pseudo depth with:\n  {self.fix}" if self.fix else ""

    def check_header(self, idx: int) -> list[str]:
        """Raise DataError for a missing file or a depth map of another size than its image."""
        i = self.ids[idx]
        size, _ = read_header(self.images[i], "image")
        other, _ = read_header(self.depths[i], "pseudo depth")
        if other != size:
            raise size_error(self.depths[i], "pseudo depth", other, size)
        return []

    def load(self, idx: int) -> dict:
        i = self.ids[idx]
        image = read_rgb(self.images[i])
        size = tuple(image.shape[-2:])
        return {"image": tv_tensors.Image(image), "id": i, "depth": Depth(read_depth(self.depths[i], size)),
                "label": tv_tensors.Mask(torch.full(size, IGNORE_INDEX, dtype=torch.uint8))}

    def __getitem__(self, idx: int) -> dict:
        sample = self.load(idx)
        return self.transforms(sample) if self.transforms else sample


def voc_images(root: Path, spec: str) -> dict[str, Path]:
    """{id: image} of a VOC-layout folder for `rest` (every image) or a split name / .txt list."""
    ids = list_images(root) if spec == REST else read_split(root, spec)
    return {i: root / "JPEGImages" / f"{i}.jpg" for i in ids}


@dataclass
class DepthOnlyChoice:
    """The depth-only images a run trains on, and what was left out of them and why (for the log)."""

    ids: list[str]
    listed: int  # before leaving anything out
    labelled_dropped: int  # also in the labelled split: they train as labelled images
    val_dropped: int  # in the val split (kept only with --depth-only-val)


def choose_depth_only(listed: list[str], labelled: list[str], val: list[str], with_val: bool) -> DepthOnlyChoice:
    """The listed ids less the labelled ones (and the val ones unless with_val), sorted: the order does not depend on
    the labelled split, so a depth stage over labelled + depth-only images is the same whatever the split."""
    labelled_set, val_set = set(labelled), set(val)
    not_labelled = [i for i in listed if i not in labelled_set]
    kept = not_labelled if with_val else [i for i in not_labelled if i not in val_set]
    return DepthOnlyChoice(sorted(set(kept)), len(listed), len(listed) - len(not_labelled),
                           len(not_labelled) - len(kept))


def open_depth_only(images: dict[str, Path], depth_dir: Path, choice: DepthOnlyChoice, fix_command: str,
                    transforms=None, check: bool = True) -> DepthOnlyImages:
    """The chosen ids as a dataset, each image's pseudo depth in depth_dir/<id>.png."""
    missing = [i for i in choice.ids if i not in images]
    if missing:
        raise DataError(f"{len(missing)} depth-only ids have no image (e.g. {', '.join(missing[:MISSING_SHOWN])})")
    return DepthOnlyImages(choice.ids, {i: images[i] for i in choice.ids},
                           {i: depth_dir / f"{i}.png" for i in choice.ids}, transforms, fix_command, check)


def voc_fix_command(root: Path, spec: str) -> str:
    """make_depth's command for the depth-only images of a VOC-layout folder."""
    return depth_fix_command(root, "all" if spec == REST else spec)


class TrainPool(Dataset):
    """What training reads: the labelled samples at [0, L), the depth-only ones at [L, L + D). The streams a stage
    draws from are lists of these indices (`streams`)."""

    def __init__(self, labelled: Dataset, depth_only: DepthOnlyImages | None = None):
        self.labelled, self.depth_only = labelled, depth_only
        self.num_labelled = len(labelled)
        self.num_depth_only = len(depth_only) if depth_only is not None else 0

    def __len__(self) -> int:
        return self.num_labelled + self.num_depth_only

    def __getitem__(self, idx: int) -> dict:
        if idx < self.num_labelled:
            sample = self.labelled[idx]
            sample.pop("instances", None)  # training never uses them; depth-only samples have none
            return sample
        return self.depth_only[idx - self.num_labelled]

    def ids(self) -> list[str]:
        return list(self.labelled.ids) + (list(self.depth_only.ids) if self.depth_only is not None else [])

    def streams(self) -> dict[str, list[int]]:
        """labelled: the labelled split's order; depth_only: sorted by id; all: both, sorted by id (the same list for
        every labelled split that, with its depth-only images, covers the same images)."""
        ids = self.ids()
        every = sorted(range(len(ids)), key=lambda i: ids[i])
        return {"labelled": list(range(self.num_labelled)),
                "depth_only": list(range(self.num_labelled, len(ids))), "all": every}


@dataclass(frozen=True)
class StagePlan:
    """What a stage trains on and for how long: the streams its batches draw from, the steps of each of its rounds (a
    round ends with validation and a checkpoint), and the steps of one epoch (one pass over its images)."""

    stage: Stage
    streams: tuple[Stream, ...]
    rounds: tuple[int, ...]
    epoch_steps: int
    images: str  # which images, in words

    @property
    def steps(self) -> int:
        return sum(self.rounds)

    def progress(self, round_: int, step: int) -> float:
        """Fraction of the stage done at step `step` of round `round_` (the learning rate's clock)."""
        return (sum(self.rounds[:round_]) + step) / self.steps

    def record(self, pool: "TrainPool") -> dict:
        """For run_config.json: what trains on which images, how many, and what an epoch and a round are."""
        return {"stage": self.stage.name, "decoders": list(self.stage.tasks), "images": self.images, "count": sum(len(s.indices) for s in self.streams),
                "per_batch": {name: s.per_batch for name, s in zip(self.names(pool), self.streams)},
                "epoch_steps": self.epoch_steps, "steps": self.steps, "rounds": len(self.rounds)}

    def describe(self, index: int, pool: "TrainPool") -> str:
        """One log line: the stage, its images, its length and what an epoch of it is."""
        count = sum(len(s.indices) for s in self.streams)
        length = (f"{self.stage.epochs} epochs of {self.rounds[0]} steps" if self.stage.steps is None else
                  f"{self.steps} steps in {len(self.rounds)} rounds of {self.rounds[0]}")
        return (f"stage {index} ({self.stage.name}, {'+'.join(self.stage.tasks)} decoder"
                f"{'s' if len(self.stage.tasks) > 1 else ''}): {count} {self.images}; {length}; an epoch (one pass "
                f"over its {'labelled ' if len(self.streams) > 1 else ''}images) is {self.epoch_steps} steps")

    def names(self, pool: "TrainPool") -> list[str]:
        kinds = {tuple(v): k for k, v in pool.streams().items()}
        return [kinds.get(s.indices, "images") for s in self.streams]


def plan_stage(pool: "TrainPool", stage: Stage, index: int, batch_size: int, depth_only_fraction: float,
               processes: int = 1, val_every: int | None = None, cap: int | None = None) -> StagePlan:
    """A `d` stage draws from the labelled and the depth-only images together, an `s` stage from the labelled ones,
    a `b` stage takes both kinds in every batch: round(depth_only_fraction * batch_size) depth-only images (at least
    one, and at least one labelled), the segmentation loss on the labelled ones only. An epoch is one pass over the
    stage's images (a `b` stage: over its labelled images; the depth-only ones cycle at their own pace)."""
    streams = pool.streams()
    tag = 4 * index  # each stage's streams are its own
    if "seg" not in stage.tasks:
        chosen, what = [Stream(tuple(streams["all"]), batch_size, tag)], "labelled + depth-only images"
    elif "depth" not in stage.tasks or not pool.num_depth_only:
        chosen, what = [Stream(tuple(streams["labelled"]), batch_size, tag + 1)], "labelled images"
    else:
        if batch_size < 2:
            raise DataError(f"a b stage mixing labelled and depth-only images needs a batch of 2 or more, got {batch_size}")
        k = min(max(round(depth_only_fraction * batch_size), 1), batch_size - 1)
        chosen = [Stream(tuple(streams["labelled"]), batch_size - k, tag + 1),
                  Stream(tuple(streams["depth_only"]), k, tag + 2)]
        what = f"labelled + depth-only images, {batch_size - k} + {k} in each batch"
    driver = chosen[0]
    epoch_steps = len(driver.indices) // (driver.per_batch * processes)
    if epoch_steps < 1:
        raise DataError(f"stage {index} ({stage.name}) has {len(driver.indices)} {what.split(',')[0]}, fewer than one "
                        f"batch ({driver.per_batch} per process x {processes} processes): lower --batch-size")
    return StagePlan(stage, tuple(chosen), tuple(stage_rounds(stage, epoch_steps, val_every, cap)), epoch_steps, what)


def images_record(train_split: str, depth_only_spec: str, with_val: bool, pool: TrainPool, val_set: Dataset,
                  choice: DepthOnlyChoice | None, plans: list[StagePlan]) -> dict:
    """run_config.json's `images`: which images trained which decoder, with counts, and what a stage's epoch is."""
    record = {"labelled": {"split": train_split, "count": pool.num_labelled},
              "val": {"split": val_set.split, "count": len(val_set)},
              "depth_only": {"from": depth_only_spec, "count": pool.num_depth_only}}
    if choice is not None:
        record["depth_only"].update(listed=choice.listed, left_out_labelled=choice.labelled_dropped,
                                    left_out_val=choice.val_dropped, val_included=with_val)
    record["stages"] = [plan.record(pool) for plan in plans]
    return record


def describe_images(record: dict) -> str:
    """The log's line about the images of a run."""
    d = record["depth_only"]
    depth = f"{d['count']} depth-only ({d['from']}"
    if "listed" in d:
        depth += f": {d['listed']} listed, {d['left_out_labelled']} of them labelled"
        depth += (", val images included (--depth-only-val)" if d["val_included"] else
                  f", {d['left_out_val']} in the val split left out (--depth-only-val keeps them)")
    trained = "val images may train the depth decoder" if d.get("val_included") else "never trained on"
    return (f"images: {record['labelled']['count']} labelled ({record['labelled']['split']}), {depth}), "
            f"{record['val']['count']} val ({record['val']['split']}, {trained})")
