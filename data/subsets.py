"""Deterministic nested labelled subsets of a split, for label-count experiments (tools/make_subsets.py).

`make_subsets(DIR, "train", [25, 100, 400], seed=0)` writes ImageSets/Segmentation/train_n25.txt,
train_n100.txt and train_n400.txt (in the VOC root, or in the Cityscapes folder for Cityscapes' ids), then
train_subsets.json: the seed, sizes, and for each subset the classes it covers and the classes it could not.
For VOC-format folders a subset is a split like any other (`preset.open(root, "train_n25")`); Cityscapes' reader
lists its folders and does not read these files (yet).

How the subsets are chosen (`choose`):
  1. the classes of each image: the label values present, 255 (ignore) excluded;
  2. a permutation of the split by `random.Random(seed)`;
  3. for the smallest size: for each class of the split that the subset does not cover yet, rarest first (fewest
     images containing it, ties by class id), add the first image in the permutation that contains it, while the
     size allows; then fill up to the size with the next images in permutation order;
  4. each larger size starts from the previous subset and does the same (3.), so every subset holds every smaller
     one, and covers every class of the split when its size is at least the number of classes.
A size at least the split's gives the whole split. Each file lists its ids in the split file's order. Same split,
sizes and seed -> the same files, byte for byte. An existing subset file with other contents is not replaced
without overwrite=True (nothing is written then); the JSON records the latest run.
"""
import json
import os
import random
from pathlib import Path

import torch
from tqdm import tqdm

from data import PRESETS, guess_dataset
from data.cityscapes import resolve_cityscapes_root
from data.voc import IGNORE_INDEX, resolve_voc_root

SUBSET_DIR = Path("ImageSets") / "Segmentation"


def subset_name(split: str, size: int) -> str:
    """The split name of a subset: train_n25."""
    return f"{split}_n{size}"


def parse_sizes(text: str) -> list[int]:
    """'25,100,400' -> [25, 100, 400] (sorted); ValueError unless positive integers, all different."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise ValueError(f"--sizes must be comma-separated positive integers, got {text!r}") from exc
    return check_sizes(sizes)


def check_sizes(sizes: list[int]) -> list[int]:
    """The sizes sorted; ValueError if empty, not positive integers, or not strictly increasing once sorted."""
    sizes = sorted(sizes)
    if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be positive integers, got {sizes}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be different from each other (strictly increasing once sorted), got {sizes}")
    return sizes


def label_classes(ds, progress: bool = True) -> list[frozenset[int]]:
    """The set of classes (label values but 255) in each sample of a dataset opened by a preset."""
    found = []
    for i in tqdm(range(len(ds)), desc=f"classes of {ds.split}", unit="img", disable=not progress):
        values = torch.unique(ds.load(i)["label"]).tolist()
        found.append(frozenset(v for v in values if v != IGNORE_INDEX))
    return found


def choose(classes: list[frozenset[int]], sizes: list[int], seed: int = 0) -> list[list[int]]:
    """Nested subsets as sorted index lists, one per size (sorted sizes): the module docstring's algorithm."""
    sizes = check_sizes(sizes)
    order = list(range(len(classes)))
    random.Random(seed).shuffle(order)
    count: dict[int, int] = {}
    for found in classes:
        for c in found:
            count[c] = count.get(c, 0) + 1
    rarest_first = sorted(count, key=lambda c: (count[c], c))
    chosen: list[int] = []
    taken: set[int] = set()
    covered: set[int] = set()
    subsets = []
    for size in sizes:
        size = min(size, len(classes))
        for c in rarest_first:
            if len(chosen) >= size:
                break
            if c not in covered:
                first = next(i for i in order if c in classes[i] and i not in taken)
                chosen.append(first)
                taken.add(first)
                covered |= classes[first]
        for i in order:
            if len(chosen) >= size:
                break
            if i not in taken:
                chosen.append(i)
                taken.add(i)
                covered |= classes[i]
        subsets.append(sorted(chosen))
    return subsets


def subset_root(data_root: str | Path, dataset: str) -> Path:
    """The folder whose ImageSets/Segmentation/ gets the subset files (the VOC root, or the Cityscapes folder)."""
    if PRESETS[dataset].reader == "cityscapes":
        return resolve_cityscapes_root(data_root)
    return resolve_voc_root(data_root)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and os.replace, so that readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_subsets(data_root: str | Path, split: str, sizes: list[int], seed: int = 0, dataset: str | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Write the subset files and <split>_subsets.json (module docstring) and return the JSON's record; FileExistsError
    naming the file (nothing written) when an existing subset file differs and overwrite is False."""
    sizes = check_sizes(sizes)
    dataset = dataset or guess_dataset(data_root)
    if dataset not in PRESETS:
        raise ValueError(f"unknown dataset {dataset!r} (one of {', '.join(PRESETS)})")
    root = subset_root(data_root, dataset)
    ds = PRESETS[dataset].for_root(root).open(root, split, transforms=None, with_depth=False, check=False)
    classes = label_classes(ds, progress)
    present = sorted(set().union(*classes))
    texts, record = {}, {"dataset": dataset, "split": split, "seed": seed, "sizes": sizes,
                         "split_size": len(ds), "classes_present": present, "subsets": {}}
    for size, subset in zip(sizes, choose(classes, sizes, seed)):
        name = subset_name(split, size)
        covered = sorted(set().union(*(classes[i] for i in subset)))
        texts[root / SUBSET_DIR / f"{name}.txt"] = "".join(f"{ds.ids[i]}\n" for i in subset)
        record["subsets"][name] = {"size": size, "count": len(subset), "whole_split": len(subset) == len(ds),
                                   "classes_covered": covered,
                                   "classes_missing": [c for c in present if c not in covered]}
    if not overwrite:
        differ = [str(p) for p, text in texts.items() if p.is_file() and p.read_text() != text]
        if differ:
            raise FileExistsError(f"{', '.join(differ)}: already there with other ids (another seed, sizes or "
                                  "split?); nothing written: pass --overwrite to replace, or remove the file(s)")
    (root / SUBSET_DIR).mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        write_atomic(path, text)
    write_atomic(root / SUBSET_DIR / f"{split}_subsets.json", json.dumps(record, indent=1) + "\n")
    return record


def summary_lines(record: dict) -> list[str]:
    """One line per subset: name, count, classes covered / present (and what is not covered)."""
    lines = []
    for name, sub in record["subsets"].items():
        line = (f"{name}: {sub['count']} images, classes {len(sub['classes_covered'])}/"
                f"{len(record['classes_present'])}")
        if sub["whole_split"]:
            line += f" (size {sub['size']} >= the split's {record['split_size']}: the whole split)"
        if sub["classes_missing"]:
            line += f" (not covered: {sub['classes_missing']})"
        lines.append(line)
    return lines
