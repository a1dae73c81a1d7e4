"""Your own dataset end to end: a 3-class folder (classes.txt) trains, evaluates with its class names, exports
and predicts in its colours; a label value 3 stops training with an error naming the file."""
import json

import numpy as np
import pytest
from PIL import Image
from test_folder_dataset import COLOURS, NAMES, make_folder

import train
from data import PRESETS, DataError
from data.visualize import to_palette_png
from models import load_model
from tools import evaluate, export, predict

TINY = ["--dataset", "folder", "--schedule", "s", "--encoder", "resnet18", "--encoder-weights", "none",
        "--crop-size", "32", "--base-size", "40", "--batch-size", "2", "--stage-epochs", "1",
        "--max-steps-per-epoch", "2", "--workers", "0", "--val-batch-size", "2"]


def run_train(root, out):
    args = train.get_args_parser().parse_args([*TINY, "--data-root", str(root), "--output-dir", str(out)])
    return train.main(PRESETS["folder"].fill(args))


def test_three_class_folder_trains_evaluates_exports_and_predicts(tmp_path, fresh_accelerate):
    make_folder(tmp_path / "data")
    metrics = run_train(tmp_path / "data", tmp_path / "run")
    assert np.array(metrics["confusion_matrix"]).shape == (3, 3)
    config = load_model(tmp_path / "run").config
    assert (config.num_classes, config.names(), config.colours()) == (3, NAMES, COLOURS)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["model"]["class_names"] == list(NAMES)

    report = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "run"), "--data-root", str(tmp_path / "data"), "--output",
         str(tmp_path / "eval.json"), "--workers", "0"]))
    assert [c["name"] for c in report["per_class"]] == list(NAMES)
    assert np.array_equal(report["confusion_matrix"], metrics["confusion_matrix"])  # one prediction rule
    assert "| 2 | traffic light |" in (tmp_path / "eval.md").read_text()

    export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exported"), "--flops-size", "32",
         "--check-sizes", "35x37", "--check-batch", "1", "--onnx-exporter", "legacy"]))
    assert load_model(tmp_path / "exported").config.names() == NAMES
    image = tmp_path / "data" / "JPEGImages" / "val_0.jpg"
    for backend in ("torch", "onnx"):
        out = tmp_path / f"pred_{backend}"
        predict.main(predict.get_args_parser().parse_args(
            ["--model", str(tmp_path / "exported"), "--backend", backend, "--input", str(image), "--out", str(out),
             "--overlay"]))
        mask = Image.open(out / "val_0.png")
        assert mask.mode == "P" and set(np.unique(np.array(mask))) <= {0, 1, 2}
        assert mask.getpalette()[:9] == [v for c in COLOURS for v in c]  # the dataset's 3 colours


def test_label_value_3_stops_training_naming_the_file(tmp_path, fresh_accelerate):
    make_folder(tmp_path / "data")
    path = tmp_path / "data" / "SegmentationClass" / "train_1.png"
    label = np.array(Image.open(path))
    label[3, 4] = 3
    to_palette_png(label).save(path)
    with pytest.raises(DataError, match=rf"{path}: label values \[3\] outside 0\.\.2"):
        run_train(tmp_path / "data", tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
