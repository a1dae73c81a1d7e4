"""tools/make_subsets.py and data/subsets.py: nested, deterministic, class-covering labelled subsets."""
import json
import shutil
from itertools import pairwise

import numpy as np
import pytest
from PIL import Image
from test_cityscapes import TRAIN, scene, stripes, write_sample

from data.subsets import choose, make_subsets, parse_sizes
from tools.make_subsets import get_args_parser, main

SEG = ("ImageSets", "Segmentation")


def write_voc(root, labels: list[list[int]], split="train"):
    """A VOC folder whose image k has a 4x4 label holding the classes labels[k] (and 255); returns the ids."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"img{k:03d}" for k in range(len(labels))]
    for i, classes in zip(ids, labels):
        arr = np.full((4, 4), 255, np.uint8)
        arr.flat[: len(classes)] = classes
        label = Image.fromarray(arr, mode="P")
        label.putpalette([v for c in range(256) for v in (c, c, c)])
        label.save(root / "SegmentationClass" / f"{i}.png")
        Image.new("RGB", (4, 4)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return ids


def read_ids(root, name):
    return (root.joinpath(*SEG) / f"{name}.txt").read_text().split()


@pytest.fixture()
def voc(tiny_voc, tmp_path):
    """A private copy of the session's synthetic set (16 train images), so that written files stay here."""
    return shutil.copytree(tiny_voc, tmp_path / "voc")


def test_nested_ordered_and_deterministic(voc, tmp_path):
    record = make_subsets(voc, "train", [8, 4, 12], seed=0, progress=False)
    split = read_ids(voc, "train")
    subsets = [read_ids(voc, f"train_n{n}") for n in (4, 8, 12)]
    assert [len(s) for s in subsets] == [4, 8, 12]
    for small, large in pairwise(subsets):
        assert set(small) < set(large)
    for s in subsets:  # the split file's order
        assert s == [i for i in split if i in s]
    assert record["sizes"] == [4, 8, 12]
    files = sorted(voc.joinpath(*SEG).glob("train_*"))
    before = {p.name: p.read_bytes() for p in files}
    again = shutil.copytree(voc, tmp_path / "again")
    for p in files:
        (again.joinpath(*SEG) / p.name).unlink()
    make_subsets(again, "train", [4, 8, 12], seed=0, progress=False)
    assert {p.name: p.read_bytes() for p in sorted(again.joinpath(*SEG).glob("train_*"))} == before
    other = shutil.copytree(tmp_path / "again", tmp_path / "other")
    make_subsets(other, "train", [4, 8, 12], seed=1, overwrite=True, progress=False)
    assert read_ids(other, "train_n4") != subsets[0]
    meta = json.loads((other.joinpath(*SEG) / "train_subsets.json").read_text())
    assert meta["seed"] == 1 and meta["split"] == "train" and set(meta["subsets"]) == {"train_n4", "train_n8", "train_n12"}


def test_rare_class_always_covered(tmp_path):
    # 30 images: classes 0..3 common, class 4 in exactly one image (not the first of the split)
    labels = [[0, 1 + k % 3] for k in range(30)]
    labels[17] = [0, 4]
    write_voc(tmp_path, labels)
    sizes = [5, 6, 10, 20]
    for seed in range(5):
        make_subsets(tmp_path, "train", sizes, seed=seed, overwrite=True, progress=False)
        for n in sizes:
            assert "img017" in read_ids(tmp_path, f"train_n{n}"), (seed, n)
        meta = json.loads((tmp_path.joinpath(*SEG) / "train_subsets.json").read_text())
        assert meta["classes_present"] == [0, 1, 2, 3, 4]
        assert all(s["classes_covered"] == [0, 1, 2, 3, 4] and not s["classes_missing"]
                   for s in meta["subsets"].values())


def test_too_small_covers_rarest_first():
    # class 3 in 1 image, class 2 in 2, class 1 in 3; one slot: the class-3 image; two: classes 3 and 2
    classes = [frozenset(s) for s in ({0, 1}, {0, 1}, {0, 1, 2}, {0, 2}, {0, 3}, {0})]
    for seed in range(5):
        one, two, three = choose(classes, [1, 2, 3], seed=seed)
        assert one == [4]
        assert len(two) == 2 and 4 in two and set(two) & {2, 3}  # the next rarest, class 2: image 2 or 3
        assert len(three) == 3 and set(three) > set(two) and set().union(*(classes[i] for i in three)) == {0, 1, 2, 3}


def test_whole_split_when_size_too_large(voc, capsys):
    record = main(get_args_parser().parse_args(["--data-root", str(voc), "--sizes", "3,16,100", "--no-progress"]))
    assert read_ids(voc, "train_n100") == read_ids(voc, "train_n16") == read_ids(voc, "train")
    assert record["subsets"]["train_n100"]["whole_split"] and not record["subsets"]["train_n3"]["whole_split"]
    out = capsys.readouterr().out
    assert "train_n100: 16 images" in out and "the whole split" in out
    assert f"classes {len(record['classes_present'])}/{len(record['classes_present'])}" in out


def test_refuses_to_overwrite_different_contents(voc):
    args = ["--data-root", str(voc), "--split", "train", "--sizes", "4,8", "--no-progress"]
    main(get_args_parser().parse_args(args))
    main(get_args_parser().parse_args(args))  # identical contents: fine
    path = voc.joinpath(*SEG) / "train_n8.txt"
    old, meta = path.read_bytes(), (voc.joinpath(*SEG) / "train_subsets.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"train_n\d\.txt"):
        main(get_args_parser().parse_args(args + ["--seed", "7"]))
    assert path.read_bytes() == old and (voc.joinpath(*SEG) / "train_subsets.json").read_bytes() == meta
    main(get_args_parser().parse_args(args + ["--seed", "7", "--overwrite"]))
    assert json.loads((voc.joinpath(*SEG) / "train_subsets.json").read_text())["seed"] == 7
    assert not list(voc.joinpath(*SEG).glob(".*tmp*"))


@pytest.mark.parametrize("text", ["0,5", "5,5", "a,3", "-2", ""])
def test_bad_sizes(text, voc):
    with pytest.raises(ValueError, match="sizes"):
        parse_sizes(text)
    with pytest.raises(ValueError, match="sizes"):
        main(get_args_parser().parse_args(["--data-root", str(voc), "--sizes", text, "--no-progress"]))
    assert not list(voc.joinpath(*SEG).glob("train_n*"))


def test_cityscapes_ids_in_the_cityscapes_folder(tmp_path):
    root = tmp_path / "cityscapes"  # test_cityscapes' train: two aachen scenes and bochum, every class in stripes
    for id_, objects in TRAIN.items():
        write_sample(root, "train", id_, *(stripes() if id_.startswith("bochum") else scene(objects)))
    record = make_subsets(root, "train", [1, 2, 5], seed=0, progress=False)
    assert record["dataset"] == "cityscapes"
    assert read_ids(root, "train_n1") == ["bochum_000000_000313"]  # the only image of the rarest classes
    assert read_ids(root, "train_n5") == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]
    assert record["subsets"]["train_n1"]["classes_covered"] == record["classes_present"] == list(range(19))
