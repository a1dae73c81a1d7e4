import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from data import DataError, Depth, VOCSegmentation, collate, get_transform
from data.voc import DataWarning
from data.sampler import SeededDataset, Stream, StreamSampler
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from data.visualize import TITLE_HEIGHT, colorize_depth, colorize_label, denormalize, log_images, to_palette_png


def test_synthetic_samples_have_aligned_fields(tiny_voc):
    ds = VOCSegmentation(tiny_voc, "train", get_transform(False, 0, 0), with_depth=True)
    assert len(ds) == 16 and ds.with_instances
    s = ds[0]
    assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
    assert s["label"].shape == s["instances"].shape == (64, 64)
    assert s["depth"].shape == (1, 64, 64) and 0 <= s["depth"].min() and s["depth"].max() <= 1


def test_train_transform_keeps_image_label_depth_aligned():
    # an image whose red channel encodes the label, a depth that encodes it too: after random
    # scale/crop/flip the three must still agree pixel for pixel (away from resampled edges)
    label = torch.zeros(96, 128, dtype=torch.uint8)
    label[:, 64:] = 7
    label[48:, :32] = 3
    image = torch.stack([label * 30, torch.zeros_like(label), torch.zeros_like(label)])
    sample = {"image": tv_tensors.Image(image), "label": tv_tensors.Mask(label),
              "depth": Depth(label[None].float() / 10), "id": "x"}
    transform = get_transform(True, base_size=96, crop_size=80)
    mean, std = IMAGENET_MEAN[0], IMAGENET_STD[0]
    flipped_or_padded = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(sample)
        lab = out["label"].long()
        red = ((out["image"][0] * std + mean) * 255 / 30).round().long()
        depth = out["depth"][0]
        valid = lab != 255
        assert out["image"].shape[-2:] == lab.shape == (80, 80)
        assert torch.isnan(depth[~valid]).all(), "padding must mark depth invalid"
        assert torch.equal((depth[valid] * 10).round().long(), lab[valid])
        # compare away from class edges, where resampling legitimately mixes colours
        lab_f = lab.float()[None]
        flat = torch.nn.functional.max_pool2d(lab_f, 7, 1, 3) == -torch.nn.functional.max_pool2d(-lab_f, 7, 1, 3)
        interior = flat[0] & valid
        agree = (red[interior] == lab[interior]).float().mean()
        assert interior.sum() > 1000 and agree > 0.99, f"seed {seed}: image and label disagree on {1 - agree:.1%} of pixels"
        flipped_or_padded += int((~valid).any()) + int(lab[0, 0] == 7)
    assert flipped_or_padded > 0  # the random ops did happen


def test_collate_pads_labels_255_and_depth_nan():
    a = {"image": torch.zeros(3, 40, 50), "label": torch.zeros(40, 50, dtype=torch.uint8),
         "depth": torch.zeros(1, 40, 50), "id": "a"}
    b = {"image": torch.zeros(3, 70, 33), "label": torch.ones(70, 33, dtype=torch.uint8),
         "depth": torch.ones(1, 70, 33), "id": "b"}
    batch = collate([a, b])
    assert batch["image"].shape == (2, 3, 96, 64)  # padded to multiples of 32
    assert batch["label"].dtype == torch.int64
    assert (batch["label"][0, 40:] == 255).all() and (batch["label"][0, :40, :50] == 0).all()
    assert torch.isnan(batch["depth"][1, 0, :, 33:]).all() and batch["id"] == ["a", "b"]


def test_seeded_augmentation_and_order_are_reproducible(tiny_voc):
    ds = SeededDataset(VOCSegmentation(tiny_voc, "train", get_transform(True, 64, 48)), seed=5)
    assert torch.equal(ds[(3, 7)]["image"], ds[(3, 7)]["image"])
    assert not torch.equal(ds[(3, 7)]["image"], ds[(3, 8)]["image"])  # another key, another crop
    sampler = StreamSampler([Stream(tuple(range(16)), 4, 1)], seed=5, rounds=(4, 4, 4, 4))
    sampler.set_epoch(2)
    first = list(sampler)
    assert first == list(sampler) and sorted(i for i, _ in first) == list(range(16))  # one pass: each image once
    assert len({key for _, key in first}) == 16
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in first]  # the next pass, another order


def copy_voc(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_label_values_name_the_file(tiny_voc, tmp_path):
    root = copy_voc(tiny_voc, tmp_path / "voc")
    i = (root / "ImageSets/Segmentation/train.txt").read_text().split()[2]
    path = root / "SegmentationClass" / f"{i}.png"
    arr = np.array(Image.open(path))
    arr[0, 0] = 42
    to_palette_png(arr).save(path)
    ds = VOCSegmentation(root, "train")
    with pytest.raises(DataError, match=rf"{i}\.png: label values \[42\]"):
        ds[2]


def test_missing_depth_fails_fast_with_the_fix_command(tiny_voc, tmp_path):
    root = copy_voc(tiny_voc, tmp_path / "voc")
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    for i in ids[:3]:
        (root / "PseudoDepth" / f"{i}.png").unlink()
    with pytest.raises(DataError) as err:
        VOCSegmentation(root, "train", with_depth=True)
    msg = str(err.value)
    assert "3 of 16" in msg and ids[0] in msg and f"tools/make_depth.py --data-root {root} --split train" in msg
    VOCSegmentation(root, "train", with_depth=False)  # a seg-only schedule does not need depth


def test_8bit_and_constant_depth_warn_naming_the_file(tiny_voc, tmp_path, capsys):
    root = copy_voc(tiny_voc, tmp_path / "voc")
    eight, flat = (root / "ImageSets/Segmentation/train.txt").read_text().split()[:2]
    depth16 = np.array(Image.open(root / "PseudoDepth" / f"{eight}.png"))
    Image.fromarray((depth16 >> 8).astype(np.uint8)).save(root / "PseudoDepth" / f"{eight}.png")  # mode L
    Image.fromarray(np.full((64, 64), 1000, np.uint16)).save(root / "PseudoDepth" / f"{flat}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # printed as the other messages are, not a Python warning
        ds = VOCSegmentation(root, "train", with_depth=True)
    path = root / "PseudoDepth" / f"{eight}.png"  # one line, no "UserWarning", no source line under it
    assert capsys.readouterr().err == (f"warning: 1 of 16 samples of split 'train': {path}: 8-bit pseudo depth "
                                       "(expected 16-bit, as tools/make_depth.py writes); read as 0..255\n")
    depth = ds.load(0)["depth"]
    assert torch.allclose(depth[0], torch.from_numpy((depth16 >> 8) / 255.0).float())  # 0..1, not 0..255/65535
    with pytest.warns(DataWarning, match=rf"{flat}\.png: constant pseudo depth"):
        ds.load(1)


def test_empty_split_and_unreadable_image(tiny_voc, tmp_path):
    root = copy_voc(tiny_voc, tmp_path / "voc")
    (root / "ImageSets/Segmentation/empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty.txt: split 'empty' is empty"):
        VOCSegmentation(root, "empty")
    i = (root / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    (root / "JPEGImages" / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=rf"{i}\.jpg: unreadable image"):
        VOCSegmentation(root, "train")[0]


def test_missing_root_says_it_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nowhere'}: does not exist \(expected VOCdevkit/VOC2012"):
        VOCSegmentation(tmp_path / "nowhere")
    with pytest.raises(DataError, match=rf"^{tmp_path}: not a VOC 2012 folder"):  # there, but without JPEGImages/
        VOCSegmentation(tmp_path)


class Writer:
    """Stands in for TensorBoard's SummaryWriter: keeps what add_image got."""

    def __init__(self):
        self.images = {}

    def add_image(self, tag, image, step):
        self.images[tag] = image


def test_tensorboard_panels_carry_titles():
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 40, 64, generator=g), "label": torch.randint(0, 21, (2, 40, 64), generator=g),
             "depth": torch.rand(2, 1, 40, 64, generator=g)}
    outputs = {"seg": torch.randn(2, 21, 40, 64, generator=g), "depth": torch.rand(2, 1, 40, 64, generator=g)}
    writer = Writer()
    accelerator = type("Accelerator", (), {"get_tracker": lambda self, name, unwrap: writer})()
    log_images(accelerator, batch, outputs, step=3)
    row = writer.images["val/1_input|label|pred|depth|pred_depth"]
    assert len(writer.images) == 2 and row.shape == (3, TITLE_HEIGHT + 40, 5 * 64) and row.dtype == torch.uint8
    panels = [denormalize(batch["image"][1]), colorize_label(batch["label"][1]),
              colorize_label(outputs["seg"][1].argmax(0)), colorize_depth(batch["depth"][1]),
              colorize_depth(outputs["depth"][1])]
    assert torch.equal(row[:, TITLE_HEIGHT:], torch.cat(panels, dim=2))  # the panels themselves are untouched
    strips = row[:, :TITLE_HEIGHT].split(64, dim=2)  # input, label, prediction, pseudo depth, predicted depth
    assert all((s == 255).all(0).float().mean() > 0.6 and (s.max(0).values < 128).sum() > 10 for s in strips)
    assert len({s.numpy().tobytes() for s in strips}) == 5  # five different titles


def test_real_voc_mini(voc_mini):
    from data import guess_dataset

    assert guess_dataset(voc_mini.parent.parent) == "voc"
    train = VOCSegmentation(voc_mini.parent.parent, "train")  # the VOCdevkit parent works too
    val = VOCSegmentation(voc_mini, "val", get_transform(False, 0, 0))
    assert (len(train), len(val)) == (330, 346)
    assert not val.with_instances
    with Image.open(voc_mini / "SegmentationClass" / f"{val.ids[0]}.png") as im:
        assert im.mode == "P"
    s = val[0]
    assert s["image"].shape[-2:] == s["label"].shape
    values = set(torch.unique(s["label"]).tolist())
    assert values <= set(range(21)) | {255} and 255 in values and len(values - {0, 255}) >= 1
    with pytest.raises(DataError, match="(?s)PseudoDepth.*make_depth.py"):
        VOCSegmentation(voc_mini, "val", with_depth=True)


def test_label_colours_follow_the_dataset_palette():
    palette = ((10, 20, 30), (40, 50, 60), (70, 80, 90))  # a 3-class label set
    label = torch.tensor([[0, 1], [2, 255]])
    rgb = colorize_label(label, palette)
    assert rgb[:, 0, 0].tolist() == [10, 20, 30] and rgb[:, 1, 0].tolist() == [70, 80, 90]
    assert rgb[:, 1, 1].tolist() == [224, 224, 192]  # ignore keeps VOC's boundary colour
    assert colorize_label(label)[:, 0, 1].tolist() == [128, 0, 0]  # no palette: VOC's
    png = to_palette_png(label, palette)
    assert png.mode == "P" and png.getpalette()[:9] == [v for c in palette for v in c]
    assert np.array_equal(np.array(png), label.numpy())  # the indices are the class ids
    assert to_palette_png(label).getpalette()[3:6] == [128, 0, 0]
    writer = Writer()
    accelerator = type("Accelerator", (), {"get_tracker": lambda self, name, unwrap: writer})()
    batch = {"image": torch.zeros(1, 3, 2, 2), "label": label[None]}
    log_images(accelerator, batch, {"seg": torch.nn.functional.one_hot(label.clamp(0, 2), 3).permute(2, 0, 1)[None].float()},
               step=0, palette=palette)
    row = next(iter(writer.images.values()))[:, TITLE_HEIGHT:]
    assert torch.equal(row[:, :, 2:4], rgb) and row[:, 0, 4:6].tolist() == [[10, 40], [20, 50], [30, 60]]
