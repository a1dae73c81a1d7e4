"""--dataset folder: a VOC-format folder with its own classes.txt (3 classes here), and make_depth.py on it."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from data import PRESETS, DataError, get_transform, guess_dataset, prepare_root
from data.checks import check_data
from data.visualize import to_palette_png
from models.model import ModelConfig
from tools import make_depth

CLASSES = "background\nroad 128 64 128\ntraffic light\n\n"  # a colour, none (VOC's colour of 2), a trailing blank
NAMES = ("background", "road", "traffic light")
COLOURS = ((0, 0, 0), (128, 64, 128), (0, 128, 0))
SPLITS = {"train": 4, "val": 2}
H, W = 40, 48


def make_folder(root, classes: str | None = CLASSES):
    """A 3-class VOC-format folder: random JPEGs, labels 0..2 with a 255 band, split lists, classes.txt."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    labels = {}
    for split, n in SPLITS.items():
        ids = [f"{split}_{k}" for k in range(n)]
        for i in ids:
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
            label = rng.integers(0, 3, (H, W)).astype(np.uint8)
            label[:, 20] = 255
            to_palette_png(label, COLOURS).save(root / "SegmentationClass" / f"{i}.png")
            labels[i] = label
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return labels


def test_folder_preset_takes_classes_and_colours_from_classes_txt(tmp_path):
    labels = make_folder(tmp_path)
    assert prepare_root("folder", tmp_path) == tmp_path and guess_dataset(tmp_path) == "folder"
    preset = PRESETS["folder"].for_root(tmp_path)
    assert (preset.num_classes, preset.class_names, preset.palette) == (3, NAMES, COLOURS)
    assert PRESETS["voc"].for_root(tmp_path) is PRESETS["voc"]  # only the folder reader reads classes.txt
    ds = preset.open(tmp_path, "train", get_transform(False, 0, 0))
    assert (len(ds), ds.split, ds.root, ds.skipped, ds.with_instances, ds.num_classes) == (4, "train", tmp_path, [],
                                                                                          False, 3)
    s = ds[1]
    assert s["id"] == "train_1" and s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    assert torch.equal(s["label"].as_subclass(torch.Tensor), torch.from_numpy(labels["train_1"]))
    crop = preset.open(tmp_path, "val", get_transform(True, 40, 32))[0]
    assert crop["label"].shape == (32, 32) and set(crop["label"].unique().tolist()) <= {0, 1, 2, 255}
    report, errors = check_data(tmp_path, ["train", "val"], False, preset)
    assert errors == 0 and "split 'val': 2 samples, 0 with errors" in report


def test_label_value_3_names_the_file(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "SegmentationClass" / "train_2.png"
    label = np.array(Image.open(path))
    label[5, 7] = 3
    to_palette_png(label).save(path)
    preset = PRESETS["folder"].for_root(tmp_path)
    ds = preset.open(tmp_path, "train")  # the headers are fine: found when the sample is decoded
    ds[1]
    with pytest.raises(DataError, match=rf"^{path}: label values \[3\] outside 0\.\.2 and 255"):
        ds[2]
    report, errors = check_data(tmp_path, ["train", "val"], False, preset)
    assert errors == 1 and f"error: [train] {path}: label values [3]" in report


@pytest.mark.parametrize("text, message", [
    (None, r"classes\.txt: not found\. --dataset folder needs a classes\.txt next to JPEGImages/"),
    ("\n \n", r"classes\.txt: empty"),
    ("background\n\ncar\n", r"classes\.txt: line 2 is empty"),
    ("background\nroad 128 64\n", r"classes\.txt: line 2 \('road 128 64'\): expected `name` or `name R G B`"),
    ("background\nroad 128 64 300\n", r"classes\.txt: line 2 \('road 128 64 300'\): colour \(128, 64, 300\) outside"),
    ("background\ncar\ncar 1 2 3\n", r"classes\.txt: line 3: class 'car' already on line 2"),
    ("".join(f"c{k} 1 2 3\n" for k in range(256)), r"classes\.txt: 256 classes; at most 255"),
])
def test_bad_classes_txt_names_the_file_and_line(tmp_path, text, message):
    make_folder(tmp_path, classes=text)
    pattern = rf"^{tmp_path}/{message}"
    with pytest.raises(DataError, match=pattern):
        prepare_root("folder", tmp_path)
    with pytest.raises(DataError, match=pattern):
        PRESETS["folder"].open(tmp_path, "train")
    report, errors = check_data(tmp_path, ["train"], False, PRESETS["folder"])
    assert errors == 1 and f"{tmp_path}/classes.txt" in report


def test_folder_needs_a_data_root():
    with pytest.raises(DataError, match="--dataset folder needs --data-root DIR"):
        prepare_root("folder", PRESETS["folder"].data_root)


def test_model_config_carries_the_label_set(tmp_path):
    make_folder(tmp_path)
    preset = PRESETS["folder"].for_root(tmp_path)
    config = ModelConfig(encoder="resnet18", num_classes=preset.num_classes, class_names=preset.class_names,
                         palette=preset.palette)
    config.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["class_names"] == list(NAMES) and saved["palette"] == [list(c) for c in COLOURS]
    loaded = ModelConfig.load(tmp_path / "config.json")
    assert loaded == config and hash(loaded) == hash(config)
    assert (loaded.names(), loaded.colours()) == (NAMES, COLOURS)
    with pytest.raises(ValueError, match="class_names has 2 entries, num_classes is 3"):
        ModelConfig(num_classes=3, class_names=("a", "b"))
    with pytest.raises(ValueError, match="RGB triples"):
        ModelConfig(num_classes=1, palette=((0, 0, 256),))


def test_old_config_json_loads_with_voc_names_and_colours(tmp_path):
    old = {"encoder": "resnet18", "tasks": ["seg", "depth"], "num_classes": 21, "decoder_channels": [64, 32, 16, 16, 8]}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = ModelConfig.load(tmp_path / "config.json")
    assert config.class_names is None and config.names() == PRESETS["voc"].class_names
    assert config.colours() == PRESETS["voc"].palette and config.colours()[15] == (192, 128, 128)  # person
    # VOC's label set spelled out is the same config (a resume compares them), saved as before
    spelled = ModelConfig(encoder="resnet18", decoder_channels=(64, 32, 16, 16, 8), class_names=PRESETS["voc"].class_names,
                          palette=PRESETS["voc"].palette)
    assert spelled == config
    assert ModelConfig(num_classes=4).names() == ("0", "1", "2", "3")


def tiny_depth_model(out):
    """A random DPT head on a tiny DINOv2 backbone with the NYU heads' processor, as tests/test_make_depth.py builds."""
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=56,
                            patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False, apply_layernorm=False)
    config = DPTConfig(backbone_config=backbone, add_projection=False, use_bias_in_fusion_residual=False,
                       is_hybrid=False, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, head_hidden_size=8)
    model = DPTForDepthEstimation(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        model.head.head[-2].bias.fill_(20.0)  # positive metres, varying
    model.save_pretrained(out)
    DPTImageProcessor(do_resize=False, do_rescale=False, do_pad=True, size_divisor=14,
                      image_mean=(123.675, 116.28, 103.53), image_std=(58.395, 57.12, 57.375)).save_pretrained(out)
    return out


def run_make_depth(root, model, split):
    """tools/make_depth.py's main in this process, CPU, no workers."""
    argv = ["--data-root", str(root), "--model", str(model), "--split", split, "--batch-size", "2", "--workers", "0"]
    make_depth.main(make_depth.get_args_parser().parse_args(argv))


def test_make_depth_works_on_a_folder_dataset(tmp_path, fresh_accelerate):
    make_folder(tmp_path / "data")
    root = tmp_path / "data"
    preset = PRESETS["folder"].for_root(root)
    with pytest.raises(DataError, match=r"(?s)PseudoDepth: 4 of 4 files of split 'train' are missing.*make_depth\.py"):
        preset.open(root, "train", with_depth=True)
    run_make_depth(root, tiny_depth_model(tmp_path / "dpt"), "train")
    assert json.loads((root / "PseudoDepth" / "meta.json").read_text())["count"] == 4
    assert (root / "classes.txt").read_text() == CLASSES
    ds = preset.open(root, "train", get_transform(False, 0, 0), with_depth=True)
    for k in range(len(ds)):
        with Image.open(root / "PseudoDepth" / f"{ds.ids[k]}.png") as im:
            assert im.mode.startswith("I;16") and im.size == (W, H)
        depth = ds[k]["depth"]
        assert depth.shape == (1, H, W) and depth.min() == 0 and depth.max() == 1  # min-max normalised
