"""Tests for the synthetic VOC-format demo set (data/synthetic.py, tools/make_synthetic.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.synthetic as synthetic
from data.synthetic import VOC_CLASSES, VOC_PALETTE, make_synthetic

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"num_train": 8, "num_val": 4, "size": 64, "seed": 0}
SUBDIRS = ("JPEGImages", "SegmentationClass", "SegmentationObject", "PseudoDepth")
PNG_BIT_DEPTH_OFFSET = 24  # IHDR: 8 signature + 8 chunk header + 4 width + 4 height
INFORMATIVE_RATIO = 100  # depth jump across label changes vs within a label
PAIR_GAP = 3  # pixels; crosses the 2 px ignore band that separates differently labelled pixels


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small generated set shared by the read-only tests."""
    return make_synthetic(tmp_path_factory.mktemp("syn") / "set", **PARAMS)


def ids(root: Path, split: str) -> list[str]:
    """Return the ids listed for a split."""
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def file_bytes(root: Path) -> dict[str, bytes]:
    """Return every file of a set keyed by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_palette_and_classes() -> None:
    assert len(VOC_PALETTE) == 256 * 3
    assert VOC_PALETTE[3:6] == [128, 0, 0]  # aeroplane
    assert VOC_PALETTE[15 * 3:16 * 3] == [192, 128, 128]  # person
    assert VOC_PALETTE[255 * 3:] == [224, 224, 192]  # boundary
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def test_layout_and_lists(root: Path) -> None:
    train, val = ids(root, "train"), ids(root, "val")
    assert train == [f"syn_train_{i:05d}" for i in range(PARAMS["num_train"])]
    assert val == [f"syn_val_{i:05d}" for i in range(PARAMS["num_val"])]
    assert ids(root, "trainval") == train + val
    suffix = {"JPEGImages": ".jpg"}
    for sub in SUBDIRS:
        names = sorted(p.name for p in (root / sub).iterdir() if p.name != "meta.json")
        assert names == sorted(f"{i}{suffix.get(sub, '.png')}" for i in train + val)
    meta = json.loads((root / "PseudoDepth/meta.json").read_text())
    assert meta["model"] == "synthetic-ground-truth" and meta["native_output"] == "metric_depth"
    assert meta["count"] == len(train) + len(val)
    assert json.loads((root / "SYNTHETIC.json").read_text()) == {**PARAMS, "depth_cue": 0.0,
                                                                 "version": synthetic.GENERATOR_VERSION}
    assert [p.name for p in root.parent.iterdir()] == ["set"]  # no temporary sibling left behind


def test_images_and_labels(root: Path) -> None:
    size = PARAMS["size"]
    for name in ids(root, "trainval"):
        image = Image.open(root / "JPEGImages" / f"{name}.jpg")
        assert image.mode == "RGB" and image.size == (size, size)
        label_png = Image.open(root / "SegmentationClass" / f"{name}.png")
        object_png = Image.open(root / "SegmentationObject" / f"{name}.png")
        for png in (label_png, object_png):
            assert png.mode == "P" and png.size == (size, size)
            assert png.getpalette() == VOC_PALETTE
        label, objects = np.asarray(label_png), np.asarray(object_png)
        assert set(np.unique(label)) <= set(range(21)) | {255}
        assert (label > 0).any() and (label == 0).any() and (label == 255).any()
        # The boundary band is the same in both maps; instances cover exactly the foreground.
        np.testing.assert_array_equal(label == 255, objects == 255)
        np.testing.assert_array_equal((label > 0) & (label < 255), (objects > 0) & (objects < 255))
        instance_ids = sorted(set(np.unique(objects)) - {0, 255})
        assert instance_ids == list(range(1, len(instance_ids) + 1))
        for k in instance_ids:  # every instance has one class
            assert len(np.unique(label[objects == k])) == 1


def test_depth_pngs(root: Path) -> None:
    for name in ids(root, "trainval"):
        path = root / "PseudoDepth" / f"{name}.png"
        raw = path.read_bytes()
        assert raw[PNG_BIT_DEPTH_OFFSET] == 16 and raw[PNG_BIT_DEPTH_OFFSET + 1] == 0  # 16-bit greyscale
        depth = np.asarray(Image.open(path)).astype(np.int64)
        assert depth.shape == (PARAMS["size"],) * 2
        assert depth.min() == 0 and depth.max() == 65535
        label = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
        # Inverse depth: objects (near) get larger codes than the background (far).
        assert depth[(label > 0) & (label < 255)].mean() > depth[label == 0].mean()


def test_depth_is_informative_of_segmentation(root: Path) -> None:
    same, change = [], []
    for name in ids(root, "trainval"):
        label = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
        depth = np.asarray(Image.open(root / "PseudoDepth" / f"{name}.png")).astype(np.float64) / 65535
        left, right = label[:, :-PAIR_GAP], label[:, PAIR_GAP:]
        diff = np.abs(depth[:, :-PAIR_GAP] - depth[:, PAIR_GAP:])
        valid = (left != 255) & (right != 255)
        same.append(diff[valid & (left == right)])
        change.append(diff[valid & (left != right)])
    same, change = np.concatenate(same), np.concatenate(change)
    assert len(change) > 0 and len(same) > 0
    # Measured ~1500x; the 100x bar fails for objects with steep depth slopes or noisy depth.
    assert change.mean() > INFORMATIVE_RATIO * same.mean()


def test_deterministic(root: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", **PARAMS)
    assert file_bytes(again) == file_bytes(root)
    other = make_synthetic(tmp_path / "other", **{**PARAMS, "seed": 1})
    first = "JPEGImages/syn_train_00000.jpg"
    assert (other / first).read_bytes() != (root / first).read_bytes()


def test_idempotent_and_mismatch(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path / "set", **PARAMS)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert make_synthetic(out, **PARAMS) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    with pytest.raises(ValueError, match="overwrite"):
        make_synthetic(out, **{**PARAMS, "seed": 5})
    make_synthetic(out, **{**PARAMS, "num_val": 2, "seed": 5}, overwrite=True)
    assert json.loads((out / "SYNTHETIC.json").read_text())["seed"] == 5
    assert len(ids(out, "val")) == 2 and len(list((out / "JPEGImages").iterdir())) == PARAMS["num_train"] + 2
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path, **PARAMS, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_killed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = synthetic._render_scene

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path / "set", **PARAMS)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "tools/make_synthetic.py", "--out", str(out), "--num-train", "3", "--num-val", "2",
           "--size", "32", "--seed", "7"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(ids(out, "train")) == 3 and len(ids(out, "val")) == 2
    assert Image.open(out / "JPEGImages/syn_val_00001.jpg").size == (32, 32)
    assert json.loads((out / "SYNTHETIC.json").read_text())["seed"] == 7



def test_cli_parser_and_clash(tmp_path: Path) -> None:
    from tools.make_synthetic import get_args_parser, main

    args = get_args_parser().parse_args(["--out", str(tmp_path / "set")])
    assert (args.num_train, args.num_val, args.size, args.seed, args.overwrite) == (1000, 200, 96, 0, False)
    assert args.depth_cue == 0.0
    assert get_args_parser().parse_args(["--out", "x", "--depth-cue"]).depth_cue == synthetic.CUE_TESTBED
    small = ["--out", str(tmp_path / "set"), "--num-train", "2", "--num-val", "1", "--size", "32"]
    main(get_args_parser().parse_args(small))
    with pytest.raises(ValueError, match="overwrite"):
        main(get_args_parser().parse_args(small + ["--seed", "1"]))
    main(get_args_parser().parse_args(small + ["--seed", "1", "--overwrite"]))
    assert json.loads((tmp_path / "set/SYNTHETIC.json").read_text())["seed"] == 1


def read(root: Path, folder: str, name: str) -> np.ndarray:
    """One file of a set as an array (images as float RGB)."""
    ext = ".jpg" if folder == "JPEGImages" else ".png"
    image = Image.open(root / folder / f"{name}{ext}")
    return np.asarray(image.convert("RGB") if folder == "JPEGImages" else image).astype(np.float64)


def edge_contrast(root: Path) -> tuple[float, float]:
    """Mean |colour step| across object/background edges and across background-only pixel pairs (PAIR_GAP apart)."""
    edge, flat = [], []
    for name in ids(root, "trainval"):
        image, label = read(root, "JPEGImages", name), read(root, "SegmentationClass", name)
        left, right = label[:, :-PAIR_GAP], label[:, PAIR_GAP:]
        step = np.abs(image[:, :-PAIR_GAP] - image[:, PAIR_GAP:]).sum(-1)
        edge.append(step[(left == 0) != (right == 0)])
        flat.append(step[(left == 0) & (right == 0)])
    return np.concatenate(edge).mean(), np.concatenate(flat).mean()


@pytest.fixture(scope="module")
def cue_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The depth-cue family with the same parameters and seed as `root`."""
    return make_synthetic(tmp_path_factory.mktemp("cue") / "set", **PARAMS, depth_cue=1.0)


def test_depth_cue_keeps_geometry_and_changes_only_the_look(root: Path, cue_root: Path) -> None:
    for name in ids(root, "trainval"):
        for folder in ("SegmentationClass", "SegmentationObject", "PseudoDepth"):
            np.testing.assert_array_equal(read(cue_root, folder, name), read(root, folder, name))
    assert (cue_root / "JPEGImages/syn_train_00000.jpg").read_bytes() != (root / "JPEGImages/syn_train_00000.jpg").read_bytes()
    assert json.loads((cue_root / "SYNTHETIC.json").read_text())["depth_cue"] == 1.0


def class_saturations(root: Path) -> np.ndarray:
    """Saturation of each class's mean colour over the set: what colour alone says about the class."""
    colours = {}
    for name in ids(root, "trainval"):
        image, label = read(root, "JPEGImages", name), read(root, "SegmentationClass", name)
        for c in np.unique(label):
            if 0 < c < 255:
                colours.setdefault(int(c), []).append(image[label == c])
    means = np.stack([np.concatenate(v).mean(0) for v in colours.values()])  # (classes, 3)
    return (means.max(1) - means.min(1)) / means.max(1)


def test_depth_cue_hides_objects_from_colour(root: Path, cue_root: Path) -> None:
    # colour family: saturated class colours on grey ground; measured 0.45-0.85, object edges ~11x ground steps
    assert class_saturations(root).min() > 0.4
    edge, flat = edge_contrast(root)
    assert edge > 6 * flat
    # depth-cue family: objects wear the ground's colour and stripes (measured: saturation <= 0.15, edges half as
    # strong, what is left is the break in the ground's stripes and the shading)
    assert class_saturations(cue_root).max() < 0.2
    assert edge_contrast(cue_root)[0] < 0.6 * edge


def test_default_val_split_has_every_class() -> None:
    params = {**synthetic.DEFAULTS, "seed": 0}
    seen = set()
    for i in range(params["num_val"]):
        scene = synthetic._render_scene(np.random.default_rng([params["seed"], 1, i]), params["size"])
        seen |= set(np.unique(scene["label"]).tolist())
    assert seen == set(range(21)) | {255}


def test_old_generator_version_is_regenerated_or_refused(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path / "set", **PARAMS)
    meta = out / "SYNTHETIC.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": synthetic.GENERATOR_VERSION - 1}))
    with pytest.raises(ValueError, match=f"generator version {synthetic.GENERATOR_VERSION - 1}, this code makes "
                                         f"version {synthetic.GENERATOR_VERSION}"):
        make_synthetic(out, **PARAMS)
    from data import prepare_root

    assert prepare_root("synthetic", out) == out  # the default path: regenerated with its own parameters
    assert json.loads(meta.read_text()) == {**PARAMS, "depth_cue": 0.0, "version": synthetic.GENERATOR_VERSION}
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


# --- depth-only extra scenes (num_extra) ---

NUM_EXTRA = 3


@pytest.fixture(scope="module")
def extra_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`root`'s set with depth-only extra scenes."""
    return make_synthetic(tmp_path_factory.mktemp("extra") / "set", **PARAMS, num_extra=NUM_EXTRA)


def test_extra_scenes_have_image_and_depth_only(root: Path, extra_root: Path) -> None:
    extra = [f"syn_extra_{i:05d}" for i in range(NUM_EXTRA)]
    assert ids(extra_root, "extra") == extra
    for split in ("train", "val", "trainval"):  # listed nowhere else
        assert ids(extra_root, split) == ids(root, split)
    assert not (root / "ImageSets/Segmentation/extra.txt").exists()
    size = PARAMS["size"]
    for name in extra:
        assert Image.open(extra_root / "JPEGImages" / f"{name}.jpg").size == (size, size)
        depth = read(extra_root, "PseudoDepth", name)
        assert depth.shape == (size, size) and depth.min() == 0 and depth.max() == 65535
        for folder in ("SegmentationClass", "SegmentationObject"):
            assert not (extra_root / folder / f"{name}.png").exists()
    meta = json.loads((extra_root / "PseudoDepth/meta.json").read_text())
    assert meta["count"] == PARAMS["num_train"] + PARAMS["num_val"] + NUM_EXTRA  # every depth map written
    assert json.loads((extra_root / "SYNTHETIC.json").read_text())["num_extra"] == NUM_EXTRA


def test_extra_scenes_leave_train_and_val_unchanged(root: Path, extra_root: Path) -> None:
    before, after = file_bytes(root), file_bytes(extra_root)
    changed = {"SYNTHETIC.json", "PseudoDepth/meta.json"}
    assert {k: v for k, v in before.items() if k not in changed} == {k: after[k] for k in before if k not in changed}
    added = sorted(set(after) - set(before))
    assert added == sorted(["ImageSets/Segmentation/extra.txt"]
                           + [f"JPEGImages/syn_extra_{i:05d}.jpg" for i in range(NUM_EXTRA)]
                           + [f"PseudoDepth/syn_extra_{i:05d}.png" for i in range(NUM_EXTRA)])
    # their own per-image seeds: not copies of the first train or val scene
    first = after["JPEGImages/syn_extra_00000.jpg"]
    assert first not in (after["JPEGImages/syn_train_00000.jpg"], after["JPEGImages/syn_val_00000.jpg"])


def test_default_parameters_add_no_keys(root: Path, tmp_path: Path) -> None:
    # num_extra=0 and bands=False are the defaults: SYNTHETIC.json (which make_synthetic compares for equality with an
    # existing set's) and every file stay as before they existed
    assert set(json.loads((root / "SYNTHETIC.json").read_text())) == {*PARAMS, "depth_cue", "version"}
    same = make_synthetic(tmp_path / "same", **PARAMS, num_extra=0, bands=False)
    assert file_bytes(same) == file_bytes(root)
    assert make_synthetic(root, **PARAMS, num_extra=0, bands=False) == root  # a no-op, not a refusal


def test_bad_extra_and_bands_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_extra"):
        make_synthetic(tmp_path / "a", **PARAMS, num_extra=-1)
    with pytest.raises(ValueError, match="choose one"):
        make_synthetic(tmp_path / "c", **PARAMS, depth_cue=0.7, bands=True)
    assert list(tmp_path.iterdir()) == []


# --- the bands family: class = silhouette group x depth band ---

BAND_PARAMS = {**PARAMS, "num_train": 120, "num_val": 30}  # enough objects per class for statistics


@pytest.fixture(scope="module")
def bands_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("bands") / "set", **BAND_PARAMS, bands=True)


def object_stats(root: Path) -> dict[int, list[tuple[float, float, float]]]:
    """Per class, for every visible instance (5 pixels or more): (median stored depth, hue in turns, pixel count)."""
    found = {}
    for name in ids(root, "trainval"):
        image, label = read(root, "JPEGImages", name), read(root, "SegmentationClass", name)
        objects, depth = read(root, "SegmentationObject", name), read(root, "PseudoDepth", name) / 65535
        for k in set(np.unique(objects).astype(int)) - {0, 255}:
            inside = objects == k
            if inside.sum() >= 5:
                r, g, b = image[inside].mean(0)
                hue = np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b) / (2 * np.pi)
                found.setdefault(int(label[inside][0]), []).append((float(np.median(depth[inside])), hue, inside.sum()))
    return found


def test_bands_set_is_a_valid_set(bands_root: Path) -> None:
    assert json.loads((bands_root / "SYNTHETIC.json").read_text()) == {
        **BAND_PARAMS, "depth_cue": 0.0, "bands": True, "version": synthetic.GENERATOR_VERSION}
    test_images_and_labels(bands_root)
    for name in ids(bands_root, "trainval"):  # 16-bit; the ground's bottom row is every scene's nearest pixel
        depth = np.asarray(Image.open(bands_root / "PseudoDepth" / f"{name}.png")).astype(np.int64)
        assert depth.min() == 0 and depth.max() == 65535 and depth[-1].max() == 65535
    assert set(object_stats(bands_root)) == set(range(1, 21))


def test_bands_depth_tells_the_band_and_the_hue_tells_the_group(bands_root: Path) -> None:
    """The stored depth of an object falls in its class's band, the four bands' ranges apart (the depth map tells the
    class within a group); the four classes of a group share one hue (colour tells the group, not the band)."""
    stats = object_stats(bands_root)
    bands = len(synthetic.BAND_DEPTHS)
    ranges = [[d for c in range(1 + b, 21, bands) for d, _, _ in stats[c]] for b in range(bands)]
    for near, far in zip(ranges, ranges[1:]):
        assert min(near) > max(far)  # nearer band: larger inverse depth, and never overlapping
    for group in range(len(synthetic.BAND_GROUP_SHAPES)):
        hues = [h for c in range(1 + group * bands, 1 + (group + 1) * bands) for _, h, _ in stats[c]]
        mean = np.angle(np.exp(2j * np.pi * np.array(hues)).mean()) / (2 * np.pi)
        assert np.abs(np.exp(2j * np.pi * (np.array(hues) - mean)).mean()) > 0.9  # one hue a group
    sizes = {b: np.median([n for c in range(1 + b, 21, bands) for _, _, n in stats[c]]) for b in range(bands)}
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]  # perspective: nearer objects look larger


def test_bands_cli_and_regeneration(tmp_path: Path) -> None:
    from tools.make_synthetic import get_args_parser, main

    parser = get_args_parser()
    args = parser.parse_args(["--out", "x"])
    assert (args.bands, args.num_extra) == (False, 0)
    small = ["--out", str(tmp_path / "set"), "--num-train", "2", "--num-val", "1", "--size", "32"]
    main(parser.parse_args(small + ["--bands", "--num-extra", "2"]))
    meta = tmp_path / "set/SYNTHETIC.json"
    params = json.loads(meta.read_text())
    assert params["bands"] is True and params["num_extra"] == 2 and len(ids(tmp_path / "set", "extra")) == 2
    with pytest.raises(ValueError, match="choose one"):
        main(parser.parse_args(small + ["--bands", "--depth-cue", "--overwrite"]))
    # an older generator's set is regenerated with its own parameters, bands and extras included
    meta.write_text(json.dumps({**params, "version": synthetic.GENERATOR_VERSION - 1}))
    assert synthetic.regenerate_if_old(tmp_path / "set")
    assert json.loads(meta.read_text()) == params
    done = subprocess.run([sys.executable, "tools/make_synthetic.py", *small, "--bands", "--depth-cue", "--overwrite"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "choose one" in done.stderr
