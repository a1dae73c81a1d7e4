"""tools/encoder_table.py: one run measures every encoder and the lraspp anchor; --accuracy adds export.json scores."""
import argparse
import json

import pytest

from models import ModelConfig
from models.deploy import parse_size
from tools import encoder_table

pytest.importorskip("onnxruntime")


def table_args(**kw) -> argparse.Namespace:
    args = encoder_table.get_args_parser().parse_args([])
    return argparse.Namespace(**{**vars(args), "size": parse_size("64"), "runs": 1, "calibration_images": 1,
                                 "threads": 1, **kw})


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("table")
    args = table_args(encoders=["resnet18", "mobilenet_v3_small"], json=str(out / "t.json"),
                      markdown=str(out / "t.md"))
    return encoder_table.main(args), out


def test_every_encoder_and_the_anchor_measured_in_one_run(result):
    res, out = result
    assert [r["model"] for r in res["rows"]] == ["resnet18", "mobilenet_v3_small", encoder_table.ANCHOR]
    for row in res["rows"]:
        assert row["params"] > 0 and row["macs"] > 0
        assert row["size_bytes"]["fp32"] > 2 * row["size_bytes"]["int8"] > 0  # int8 weights: about 4x smaller
        assert row["latency"]["fp32"] > 0 and row["latency"]["int8"] > 0
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["mobilenet_v3_small"]["macs"] < rows["resnet18"]["macs"] / 4
    assert rows["resnet18"]["decoder_channels"] == [256, 128, 64, 32, 16]
    assert rows["mobilenet_v3_small"]["decoder_channels"] == list(ModelConfig("mobilenet_v3_small").decoder_channels)
    assert res["size"] == [64, 64] and res["batch"] == 1 and res["runs"] == 1
    assert json.loads((out / "t.json").read_text())["rows"][0]["model"] == "resnet18"
    md = (out / "t.md").read_text()
    assert f"| {encoder_table.ANCHOR} (anchor) |" in md and "| resnet18 |" in md and "64x64" in md


def test_what_stays_float_is_named(result):
    rows = {r["model"]: r for r in result[0]["rows"]}
    assert rows["resnet18"]["kept_in_float"] == {}  # every ResNet op has an int8 form
    kept = rows["mobilenet_v3_small"]["kept_in_float"]
    assert kept.get("HardSwish", 0) > 0 and kept.get("HardSigmoid", 0) > 0  # MobileNetV3's activations and SE gates
    assert "HardSwish x" in (result[1] / "t.md").read_text()


def fake_export(folder, encoder: str, fp32: float, int8: float):
    folder.mkdir()
    ModelConfig(encoder=encoder, tasks=("seg",)).save(folder / "config.json")
    metrics = {"split": "val", "images": 7, "fp32": {"fg_mIoU": fp32}, "int8": {"fg_mIoU": int8},
               "fg_mIoU_drop": fp32 - int8}
    (folder / "export.json").write_text(json.dumps({"int8": {"metrics": metrics,
                                                             "agreement": {"argmax_agreement": 0.99}}}))
    return str(folder)


def test_accuracy_columns_come_from_export_folders(tmp_path, result):
    acc = encoder_table.read_accuracy([fake_export(tmp_path / "a", "resnet18", 0.80, 0.79),
                                       fake_export(tmp_path / "b", "mobilenet_v3_small", 0.70, 0.66)])
    assert acc["mobilenet_v3_small"]["fg_mIoU_drop"] == pytest.approx(0.04)
    md = encoder_table.markdown({**result[0], "accuracy": acc})
    assert "fg_mIoU int8" in md
    assert "| 0.700 | 0.660 | +0.040 |" in md
    assert md.count("|  |  |  |") == 1  # the anchor has no accuracy


def test_bad_accuracy_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tools/export.py folder"):
        encoder_table.read_accuracy([str(tmp_path)])
    with pytest.raises(ValueError, match="two folders for resnet18"):
        encoder_table.read_accuracy([fake_export(tmp_path / "a", "resnet18", 0.8, 0.8),
                                     fake_export(tmp_path / "b", "resnet18", 0.8, 0.8)])
    (tmp_path / "c").mkdir()
    ModelConfig(encoder="resnet18").save(tmp_path / "c" / "config.json")
    (tmp_path / "c" / "export.json").write_text("{}")
    with pytest.raises(ValueError, match="without --int8"):
        encoder_table.read_accuracy([str(tmp_path / "c")])
