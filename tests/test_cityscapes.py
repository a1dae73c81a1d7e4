"""--dataset cityscapes on a tiny fake tree in the official layout (64x128 images, real-format label files)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_folder_dataset import run_make_depth, tiny_depth_model

from data import PRESETS, CityscapesSegmentation, DataError, collate, get_transform, guess_dataset, prepare_root
from data.checks import check_data
from data.cityscapes import OFFICIAL_AVG_INSTANCE_SIZE, add_depth_view
from evaluation.metrics import SegEvaluator

H, W = 64, 128
# train id of every label id 0..33, written out from cityscapesscripts' helpers/labels.py
TRAIN_ID = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                        255, 255, 16, 17, 18]
ROAD, SIDEWALK, BUILDING, PERSON, RIDER, CAR, BICYCLE = 0, 1, 2, 11, 12, 13, 18  # train ids


def scene(objects: list[tuple[int, int, int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """labelIds and instanceIds of a road scene with objects (label id, instance id or None, y0, y1, x0, x1)
    painted in order: instanceIds holds class*1000 + k on instances, the label id elsewhere (as in gtFine)."""
    label = np.full((H, W), 7, np.uint8)  # road
    label[:8] = 23  # sky
    label[-2:] = 0  # unlabeled
    inst = label.astype(np.uint16)
    for label_id, instance, y0, y1, x0, x1 in objects:
        label[y0:y1, x0:x1] = label_id
        inst[y0:y1, x0:x1] = label_id if instance is None else instance
    return label, inst


VAL = {  # two val images of one city: cars with k = 0, a crowd, a caravan (not evaluated), persons, a bicycle
    "frankfurt_000000_000001": [(26, 26000, 10, 30, 0, 30), (26, 26001, 40, 46, 40, 50), (24, 24000, 10, 20, 60, 66),
                                (24, None, 30, 38, 70, 78), (29, 29000, 40, 50, 100, 110), (8, None, 50, 62, 0, 128)],
    "frankfurt_000000_000002": [(26, 26000, 20, 36, 0, 20), (33, 33000, 40, 52, 30, 38), (24, 24000, 10, 20, 60, 70),
                                (24, 24001, 10, 16, 80, 85), (11, None, 8, 10, 0, 128)],
}
TRAIN = {"aachen_000000_000019": [(26, 26000, 10, 30, 0, 30)], "aachen_000001_000019": [(24, 24003, 5, 25, 5, 10)],
         "bochum_000000_000313": []}  # bochum: a stripe of every label id, below


def write_sample(root, split: str, id_: str, label: np.ndarray, inst: np.ndarray) -> None:
    """leftImg8bit RGB PNG, gtFine labelIds (8-bit grey) and instanceIds (16-bit grey) PNGs of one image."""
    city = id_.split("_")[0]
    for kind in ("leftImg8bit", "gtFine"):
        (root / kind / split / city).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(id_) + int(id_[-3:]))
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{id_}_leftImg8bit.png")
    Image.fromarray(label).save(root / "gtFine" / split / city / f"{id_}_gtFine_labelIds.png")
    Image.fromarray(inst).save(root / "gtFine" / split / city / f"{id_}_gtFine_instanceIds.png")


def stripes() -> tuple[np.ndarray, np.ndarray]:
    """Every label id 0..33 in a column band of its own."""
    label = (np.arange(W) * 34 // W).astype(np.uint8)[None].repeat(H, 0)
    return label, label.astype(np.uint16)


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "cityscapes"
    maps = {}
    for split, samples in (("train", TRAIN), ("val", VAL)):
        for id_, objects in samples.items():
            maps[id_] = stripes() if id_.startswith("bochum") else scene(objects)
            write_sample(root, split, id_, *maps[id_])
    return root, maps


def test_cityscapes_preset():
    p = PRESETS["cityscapes"]
    assert (p.num_classes, len(p.class_names), len(p.palette), p.encoder, p.encoder_weights, p.lr) == (
        19, 19, 19, "resnet50", "imagenet", 1e-4)
    assert p.class_names[:3] == ("road", "sidewalk", "building") and p.class_names[-1] == "bicycle"
    assert p.palette[0] == (128, 64, 128) and p.palette[CAR] == (0, 0, 142) and p.class_names[CAR] == "car"


def test_label_ids_become_train_ids_pixel_by_pixel(tree):
    root, maps = tree
    assert prepare_root("cityscapes", root) == root and guess_dataset(root) == "cityscapes"
    ds = PRESETS["cityscapes"].open(root, "train", get_transform(False, 0, 0))
    assert isinstance(ds, CityscapesSegmentation) and ds.with_instances and ds.num_classes == 19
    assert ds.ids == sorted(TRAIN) and (ds.split, ds.root, ds.skipped) == ("train", root, [])
    for k, id_ in enumerate(ds.ids):
        s = ds[k]
        label_ids = maps[id_][0]
        expected = np.array([[TRAIN_ID[v] for v in row] for row in label_ids], dtype=np.int64)
        assert s["id"] == id_ and s["image"].shape == (3, H, W) and s["label"].shape == (H, W)
        assert np.array_equal(s["label"].numpy().astype(np.int64), expected), id_
    assert set(np.unique(maps["bochum_000000_000313"][0])) == set(range(34))  # every id was checked


def test_instances_hold_the_instance_ids_of_the_8_evaluated_classes(tree):
    root, maps = tree
    ds = PRESETS["cityscapes"].open(root, "val")
    s = ds.load(ds.ids.index("frankfurt_000000_000001"))
    inst = s["instances"].numpy()
    assert inst.dtype == np.int32
    assert set(np.unique(inst)) == {0, 26000, 26001, 24000}  # not the crowd (24), not the caravan (29000)
    raw = maps["frankfurt_000000_000001"][1]
    assert np.array_equal(inst == 26000, raw == 26000) and (inst[raw == 29000] == 0).all() and (inst[raw == 24] == 0).all()
    # through random scale, crop (padding 255) and flip, and collate: still whole ids, label aligned
    torch.manual_seed(0)
    batch = collate([PRESETS["cityscapes"].open(root, "val", get_transform(True, 64, 48))[k] for k in range(2)])
    assert batch["instances"].dtype == torch.int64 and batch["instances"].shape == batch["label"].shape
    ids = set(batch["instances"].unique().tolist()) - {0, 255}
    assert ids <= {26000, 26001, 24000, 33000, 24001}
    for i in ids:  # an instance's pixels carry its class (nearest resampling of both maps)
        assert (batch["label"][batch["instances"] == i] == TRAIN_ID[i // 1000]).all()


def cityscapes_iiou(preds: list[np.ndarray], label_ids: list[np.ndarray], instance_ids: list[np.ndarray],
                    avg: dict[int, float]) -> dict[int, float]:
    """iIoU per class as cityscapesscripts' evalPixelLevelSemanticLabeling computes it, with train-id predictions:
    each instance (instanceIds > 1000, class not ignored in eval) adds tp*w and fn*w, w = avg[class] / its size;
    FP = pixels predicted the class whose ground truth is another evaluated class; iIoU = wTP / (wTP + wFN + FP)."""
    wtp, wfn, fp = {}, {}, {}
    for pred, lab, inst in zip(preds, label_ids, instance_ids):
        gt = np.array(TRAIN_ID)[lab]
        for iid in np.unique(inst[inst > 1000]):
            c = TRAIN_ID[iid // 1000]
            if c == 255:  # caravan, trailer
                continue
            mask = inst == iid
            size = mask.sum()
            tp = (pred[mask] == c).sum()
            wtp[c] = wtp.get(c, 0.0) + tp * avg[c] / size
            wfn[c] = wfn.get(c, 0.0) + (size - tp) * avg[c] / size
        for c in range(19):
            fp[c] = fp.get(c, 0) + ((pred == c) & (gt != c) & (gt != 255)).sum()
    # every instance class whose denominator is not 0 (no instance but false positives: 0), nan otherwise
    scores = {c: wtp.get(c, 0.0) / (wtp.get(c, 0.0) + wfn.get(c, 0.0) + fp[c]) for c in avg
              if wtp.get(c, 0.0) + wfn.get(c, 0.0) + fp[c] > 0}
    return scores


def predictions(maps: dict, false_positives: bool) -> dict[str, np.ndarray]:
    """Ground truth with known mistakes: parts of instances missed (predicted as stuff classes), ignored pixels
    predicted car (never a false positive), and with false_positives some road predicted car and person."""
    out = {}
    for id_, (label, _) in maps.items():
        pred = np.array(TRAIN_ID)[label]
        pred[pred == 255] = CAR
        out[id_] = pred
    a, b = out["frankfurt_000000_000001"], out["frankfurt_000000_000002"]
    a[10:20, 0:30] = ROAD  # big car: 300 of 600 pixels missed
    a[10:20, 63:66] = SIDEWALK  # person: 30 of 60 missed
    b[20:24, 0:20] = BUILDING  # car: 80 of 320 missed
    b[40:52, 30:38] = ROAD  # bicycle: all 96 missed
    b[10:14, 80:85] = ROAD  # small person: 20 of 30 missed
    if false_positives:
        a[40:44, 60:70] = CAR  # 40 road pixels
        b[30:32, 60:70] = PERSON  # 20 road pixels
        b[34:35, 60:70] = RIDER  # 10 road pixels: a class with no instance, only false positives, scores 0
    return out


@pytest.mark.parametrize("false_positives", [False, True])
def test_iiou_of_the_instances_matches_cityscapes_definition(tree, false_positives):
    root, maps = tree
    preset = PRESETS["cityscapes"]
    ds = preset.open(root, "val")
    preds = predictions(maps, false_positives)
    batch = collate([ds[k] for k in range(len(ds))])
    pred = torch.stack([torch.from_numpy(preds[i]) for i in batch["id"]]).long()
    evaluator = SegEvaluator(19, **preset.metric_options())  # what train.py and tools/evaluate.py build
    evaluator.update({"seg": F.one_hot(pred, 19).permute(0, 3, 1, 2).float()}, batch)
    got = evaluator.compute()
    per_class = {c: v for c, v in enumerate(got["iiou_per_class"]) if v is not None}

    val = [maps[i] for i in batch["id"]]
    official = cityscapes_iiou([preds[i] for i in batch["id"]], [m[0] for m in val], [m[1] for m in val],
                               OFFICIAL_AVG_INSTANCE_SIZE)
    assert per_class == pytest.approx(official, abs=1e-12)
    assert got["iIoU"] == pytest.approx(np.mean(list(official.values())), abs=1e-12)
    if not false_positives:
        # no false positive: iIoU_c is the mean over instances of TP_i / size_i, whatever the average sizes
        assert per_class == pytest.approx({CAR: (0.5 + 1 + 0.75) / 3, PERSON: (0.5 + 1 + 1 / 3) / 3, BICYCLE: 0.0})
    else:
        # by hand: car instances keep 1/2, 1 and 3/4 of their pixels, each weighted by the official 12794 px
        # average over its own size; 40 road pixels predicted car
        car = OFFICIAL_AVG_INSTANCE_SIZE[CAR]
        assert per_class[CAR] == pytest.approx(car * 2.25 / (car * 3 + 40))
        assert per_class[RIDER] == 0.0 and set(per_class) == {PERSON, RIDER, CAR, BICYCLE}  # rider: FPs only
        assert got["iIoU"] == pytest.approx((per_class[CAR] + per_class[PERSON] + per_class[BICYCLE] + 0) / 4)


def test_bad_cityscapes_files_name_the_file(tree, tmp_path):
    root, maps = tree
    path = root / "gtFine/val/frankfurt/frankfurt_000000_000002_gtFine_labelIds.png"
    label = maps["frankfurt_000000_000002"][0].copy()
    label[0, 0] = 40
    Image.fromarray(label).save(path)
    ds = PRESETS["cityscapes"].open(root, "val")
    with pytest.raises(DataError, match=rf"^{path}: label ids \[40\] are not Cityscapes label ids \(0\.\.33\)"):
        ds[1]
    inst = root / "gtFine/val/frankfurt/frankfurt_000000_000001_gtFine_instanceIds.png"
    Image.fromarray(np.zeros((H, W // 2), np.uint16)).save(inst)
    with pytest.raises(DataError, match=rf"^{inst}: instance ids size \(64, 64\) differs from the image's \(128, 64\)"):
        PRESETS["cityscapes"].open(root, "val")
    report, errors = check_data(root, ["train", "val"], False, PRESETS["cityscapes"])
    assert errors == 2 and str(path) in report and str(inst) in report
    with pytest.raises(DataError, match=rf"^{tmp_path}: not a Cityscapes folder \(no leftImg8bit/ or gtFine/"):
        prepare_root("cityscapes", tmp_path)
    with pytest.raises(DataError, match=r"leftImg8bit/test: not found \(split 'test'"):
        PRESETS["cityscapes"].open(root, "test")


def test_pseudo_depth_missing_says_how_to_make_it_then_make_depth_makes_it(tree, tmp_path, fresh_accelerate):
    root, _ = tree
    with pytest.raises(DataError) as err:
        PRESETS["cityscapes"].open(root, "val", with_depth=True)
    msg = str(err.value)
    assert "PseudoDepth: 2 of 2 pseudo depth files of split 'val' are missing" in msg
    assert f"add_depth_view('{root}')" in msg and "make_depth.py" in msg and "--schedule s" in msg
    assert PRESETS["cityscapes"].open(root, "val").with_depth is False  # a seg-only schedule does not need it
    add_depth_view(root)
    assert (root / "ImageSets/Segmentation/trainval.txt").read_text().split() == sorted(TRAIN) + sorted(VAL)
    run_make_depth(root, tiny_depth_model(tmp_path / "dpt"), "val")
    ds = PRESETS["cityscapes"].open(root, "val", get_transform(False, 0, 0), with_depth=True)
    for k in range(len(ds)):
        depth = ds[k]["depth"]
        assert depth.shape == (1, H, W) and depth.min() == 0 and depth.max() == 1
    add_depth_view(root)  # again: the links are there, nothing changes


def test_cityscapes_trains_and_evaluates_with_official_iiou(tree, tmp_path, fresh_accelerate):
    import train
    from tools import evaluate

    root, _ = tree
    args = train.get_args_parser().parse_args(
        ["--dataset", "cityscapes", "--data-root", str(root), "--output-dir", str(tmp_path / "run"), "--schedule", "s",
         "--encoder", "resnet18", "--encoder-weights", "none", "--crop-size", "32", "--base-size", "64",
         "--batch-size", "2", "--stage-epochs", "1", "--max-steps-per-epoch", "1", "--workers", "0"])
    metrics = train.main(PRESETS["cityscapes"].fill(args))
    report = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "run"), "--data-root", str(root), "--output", str(tmp_path / "e.json"),
         "--workers", "0"]))
    assert report["per_class"][CAR]["name"] == "car" and len(report["per_class"]) == 19
    assert report["iIoU_available"] and report["iIoU"] == pytest.approx(metrics["iIoU"])
    assert report["confusion_matrix"] == metrics["confusion_matrix"]
    # iIoU is defined for instance classes only (Cityscapes' 8), whatever else the model predicts
    assert all(v is None for c, v in enumerate(metrics["iiou_per_class"]) if c not in OFFICIAL_AVG_INSTANCE_SIZE)
