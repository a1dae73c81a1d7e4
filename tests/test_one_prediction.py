"""One prediction rule (evaluation/inference.py): on real VOC images of odd sizes, train.py's validation,
tools/evaluate.py and the masks tools/predict.py writes give the same confusion matrix, exactly; and so do
evaluate.py and predict.py on the exported ONNX file."""
import json

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

import train
from data import PRESETS
from data.transforms import SIZE_DIVISOR
from tools import evaluate, export, predict

NUM_VAL = 8  # real val images (VOC sizes: 500x333, 375x500, ... none a multiple of 32)
NUM_TRAIN = 8
TRAIN = ["--dataset", "voc", "--schedule", "s", "--encoder", "resnet18", "--encoder-weights", "none",
         "--crop-size", "64", "--base-size", "64", "--batch-size", "4", "--stage-epochs", "1",
         "--max-steps-per-epoch", "2", "--workers", "0", "--val-batch-size", "3", "--lr", "1e-3",
         "--seed", "2"]  # a seed whose 2-step model predicts several classes (the comparison means something)


def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def voc_subset(voc_mini, folder):
    """A VOC folder of the first NUM_TRAIN train and NUM_VAL val images of the mini set (files linked, not copied)."""
    (folder / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name in ("JPEGImages", "SegmentationClass"):
        (folder / name).symlink_to(voc_mini / name)
    ids = {}
    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        ids[split] = (voc_mini / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
        (folder / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids[split]) + "\n")
    return ids["val"]


def confusion_from_pngs(masks, root, ids, num_classes=21):
    """Rows ground truth, columns prediction, label 255 ignored; from the files alone (numpy, no repo code)."""
    mat = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in ids:
        pred = np.array(Image.open(masks / f"{i}.png"))
        label = np.array(Image.open(root / "SegmentationClass" / f"{i}.png"))
        assert pred.shape == label.shape, f"{i}: mask {pred.shape} vs label {label.shape}"
        keep = label != 255
        mat += np.bincount(label[keep].astype(np.int64) * num_classes + pred[keep], minlength=num_classes**2
                           ).reshape(num_classes, num_classes)
    return mat


def run_evaluate(*argv):
    reset_accelerate()
    try:
        return evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, val ids, run folder): a 2-step train.py run on real VOC images, validated on NUM_VAL of them."""
    from tests.conftest import VOC_MINI

    voc_mini = VOC_MINI / "VOCdevkit" / "VOC2012"
    if not voc_mini.is_dir():
        pytest.skip(f"VOC mini set not found at {VOC_MINI} (set VOC_MINI)")
    base = tmp_path_factory.mktemp("one_rule")
    ids = voc_subset(voc_mini, base / "voc")
    sizes = [Image.open(base / "voc" / "JPEGImages" / f"{i}.jpg").size for i in ids]
    assert all(w % SIZE_DIVISOR or h % SIZE_DIVISOR for w, h in sizes) and len(set(sizes)) > 1
    args = train.get_args_parser().parse_args([*TRAIN, "--data-root", str(base / "voc"), "--output-dir", str(base / "run")])
    reset_accelerate()
    try:
        train.main(PRESETS["voc"].fill(args))
    finally:
        reset_accelerate()
    return base / "voc", ids, base / "run"


def test_train_validation_equals_evaluate(trained):
    root, ids, run = trained
    validated = np.array(json.loads((run / "metrics.json").read_text())["confusion_matrix"])
    report = run_evaluate("--checkpoint", run, "--data-root", root, "--output", run.parent / "eval.json",
                          "--batch-size", 2, "--workers", 0)
    assert report["settings"]["num_images"] == NUM_VAL
    assert np.array_equal(np.array(report["confusion_matrix"]), validated)
    assert (validated.sum(0) > 0).sum() >= 3, "the model predicts at most 2 classes: the comparison shows little"


def test_predict_masks_score_exactly_what_evaluate_reports(trained):
    root, ids, run = trained
    report = run_evaluate("--checkpoint", run, "--data-root", root, "--output", run.parent / "eval4.json",
                          "--batch-size", 4, "--workers", 0)
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    predict.main(predict.get_args_parser().parse_args(
        ["--model", str(run), "--input", *map(str, images), "--out", str(run.parent / "masks"), "--device", "cpu"]))
    assert np.array_equal(confusion_from_pngs(run.parent / "masks", root, ids), np.array(report["confusion_matrix"]))


def test_the_exported_onnx_file_scores_as_its_masks(trained):
    root, ids, run = trained
    out = run.parent / "exported"
    export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(run), "--out", str(out), "--flops-size", "32", "--check-sizes", "35x37",
         "--check-batch", "1", "--onnx-exporter", "legacy"]))
    report = run_evaluate("--checkpoint", out / "model.onnx", "--data-root", root, "--workers", 0)
    assert report["settings"]["backend"] == "onnx" and (out / "eval_val_model.json").is_file()
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    predict.main(predict.get_args_parser().parse_args(
        ["--model", str(out / "model.onnx"), "--input", *map(str, images), "--out", str(run.parent / "onnx_masks")]))
    assert np.array_equal(confusion_from_pngs(run.parent / "onnx_masks", root, ids),
                          np.array(report["confusion_matrix"]))
