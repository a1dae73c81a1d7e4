"""The control: train.py must be able to fit a tiny fixed set. A change that stops the model learning (a broken
loss, labels out of line with their images, a learning rate that never reaches the optimizer) fails here."""
import json
from pathlib import Path

import pytest

import train
from data.synthetic import make_synthetic

IMAGES = 8
SIZE = 64
REPEATS = 24  # the train list names each image this often: 24 steps of batch 8 per epoch
EPOCHS = 10  # 240 steps at 64 px, about 45 s on 2 cores; few epochs, so few checkpoints


@pytest.fixture(scope="module")
def fixed_set(tmp_path_factory) -> Path:
    """8 synthetic scenes, validated on the same 8 images: what the run fits is what it is scored on."""
    root = make_synthetic(tmp_path_factory.mktemp("fit") / "set", num_train=IMAGES, num_val=1, size=SIZE, seed=3)
    lists = root / "ImageSets" / "Segmentation"
    ids = (lists / "train.txt").read_text()
    (lists / "val.txt").write_text(ids)
    (lists / "train.txt").write_text(ids * REPEATS)
    return root


def test_a_short_run_fits_a_tiny_fixed_set(fixed_set, tmp_path, fresh_accelerate):
    out = tmp_path / "run"
    args = train.get_args_parser().parse_args([
        "--data-root", str(fixed_set), "--output-dir", str(out), "--schedule", "s", "--encoder", "resnet18",
        "--crop-size", str(SIZE), "--base-size", str(SIZE), "--batch-size", str(IMAGES), "--stage-epochs", str(EPOCHS),
        "--workers", "0", "--val-batch-size", str(IMAGES), "--seed", "0"])
    train.main(args)

    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [line["train"]["seg"] for line in lines]
    assert len(losses) == EPOCHS
    # measured: the epoch-average focal loss goes 1.9 -> 0.1, pixel accuracy 0.98 and fg_mIoU 0.71 on the 8 images
    # (predicting background everywhere: pixel accuracy 0.76, fg_mIoU 0)
    assert losses[-1] < losses[0] / 10, losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pixel_acc"] > 0.95, metrics
    assert metrics["fg_mIoU"] > 0.6, metrics
