"""tools/evaluate.py (evaluation/scoring.py, evaluation/report.py): per-image scores, prediction at original size, TTA, report files, 2 processes = 1, real VOC."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from torchmetrics.classification import MulticlassConfusionMatrix

from models import ModelConfig, build_model, load_model, save_model
from evaluation import report as rep
from evaluation.scoring import collate_eval, get_dataset
from tools import evaluate as ev
from evaluation.inference import predict_batch, predict_image, torch_predictor
from evaluation.metrics import ConfusionMatrix, SegEvaluator

REPO = Path(__file__).resolve().parents[1]
SMALL_DECODER = (32, 16, 16, 8, 8)  # resnet18 is the smallest encoder; keep the decoders cheap too


def random_model(tasks=("seg", "depth")):
    """A random resnet18 model whose BatchNorm statistics are set from one random batch, so that its
    predictions vary over the image (fresh statistics make every pixel the same class)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", tasks=tasks, decoder_channels=SMALL_DECODER))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(random_model(), folder)
    return folder


def run_main(*argv) -> dict:
    return ev.main(ev.get_args_parser().parse_args([*map(str, argv), "--workers", "0"]))


def labelled_pixels(root: Path, ids) -> int:
    return sum(int((np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) != 255).sum()) for i in ids)


def test_sample_miou_hand_computed():
    # K=3. image 0: gt [0,0,1,1] pred [0,1,1,1]: IoU_0 = 1/2, IoU_1 = 2/3, class 2 nowhere -> mean 7/12
    # image 1: everything ignored -> NaN. image 2: gt [2,2] pred [0,0]: IoU_0 = 0, IoU_2 = 0 -> 0
    # image 3: gt [0,255] pred [0,2]: the 2 sits on an ignored pixel, so only class 0 counts -> 1
    target = torch.tensor([[0, 0, 1, 1], [255] * 4, [2, 2, 255, 255], [0, 255, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [1] * 4, [0, 0, 1, 1], [0, 2, 2, 2]])
    counts = ConfusionMatrix.batch_counts(pred[:, None], target[:, None], 3)
    got = ConfusionMatrix.sample_miou(counts, 3).tolist()
    assert got[0] == pytest.approx(7 / 12) and math.isnan(got[1]) and got[2:] == [0.0, 1.0]


def test_seg_evaluator_leaves_out_what_it_cannot_measure():
    g = torch.Generator().manual_seed(0)
    logits, label = torch.randn(2, 4, 6, 6, generator=g), torch.randint(0, 4, (2, 6, 6), generator=g)
    label[:, 0] = 255
    evaluator = SegEvaluator(4)
    rows = evaluator.update({"seg": logits}, {"label": label})
    m = evaluator.compute()
    cm = ConfusionMatrix(4)
    cm.update(logits.argmax(1), label)
    assert rows.shape == (2, 16) and m["confusion_matrix"] == cm.mat.tolist() and m["mIoU"] == cm.compute()["mIoU"]
    assert "iIoU" not in m and "depth_rmse" not in m  # no instances in the batch, no depth in the outputs
    evaluator.update({"seg": logits, "depth": torch.rand(2, 1, 6, 6)},
                     {"label": label, "instances": (label > 0).long(), "depth": torch.rand(2, 1, 6, 6)})
    assert {"iIoU", "depth_rmse"} <= set(evaluator.compute())


def test_predict_ignores_batch_companions_and_tta_is_flip_equivariant():
    model = random_model(("seg",))
    run = torch_predictor(model)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 40, 56, generator=g), torch.randn(3, 64, 48, generator=g)
    sample = lambda x, i: {"image": x, "label": torch.zeros(x.shape[1:], dtype=torch.long), "id": str(i), "index": i}  # noqa: E731
    both = predict_batch(run, collate_eval([sample(a, 0), sample(b, 1)]))["seg"]
    alone = predict_batch(run, collate_eval([sample(a, 0)]))["seg"]
    assert both.shape == (2, 21, 64, 64)
    assert torch.equal(both[0, :, :40, :56], alone[0, :, :40, :56])  # each image alone: bit for bit
    assert both[0, :, 40:].abs().sum() == 0  # the padding of the canvas holds no prediction
    with torch.no_grad():
        logits = model(a[None].contiguous(memory_format=torch.channels_last), tasks=("seg",))["seg"][0]
    assert torch.equal(logits, alone[0, :, :40, :56])  # one view: the logits at the image's own size, nothing padded

    # flip + multi-scale: probabilities at the original size, and mirroring the input mirrors the output
    tta = dict(scales=(0.75, 1.0, 1.25), flip=True)
    p = predict_image(run, a, **tta)["seg"]
    p_mirror = predict_image(run, a.flip(-1), **tta)["seg"]
    assert p.shape == (21, 40, 56)
    torch.testing.assert_close(p.sum(0), torch.ones(40, 56))
    torch.testing.assert_close(p_mirror.flip(-1), p, atol=1e-5, rtol=0)
    plain = predict_image(run, a)["seg"].softmax(0)
    assert (plain - p).abs().max() > 1e-3  # the augmentation changed something


def test_confusion_heat_map_is_row_normalised_and_labelled():
    mat = [[3, 1, 0], [0, 0, 0], [0, 5, 5]]
    img = np.array(rep.confusion_image(mat, ["bg", "a", "b"]))
    font = ImageFont.load_default()
    left, top = rep.heat_map_origin(["0 bg", "1 a", "2 b"], font)
    line = font.getbbox("Ag")[3] + rep.TEXT_PAD  # an axis title's strip
    cell = lambda r, c: img[top + r * rep.CELL + 3, left + c * rep.CELL + 3].tolist()  # noqa: E731
    low, high = np.array(rep.HEAT_LOW), np.array(rep.HEAT_HIGH)
    assert cell(0, 0) == np.round(low + 0.75 * (high - low)).astype(int).tolist()
    assert cell(2, 1) == cell(2, 2) == np.round(low + 0.5 * (high - low)).astype(int).tolist()
    assert cell(0, 2) == list(rep.HEAT_LOW) and cell(1, 1) == list(rep.HEAT_ABSENT)  # row 1 has no ground truth
    dark = lambda region: int((region.max(-1) < 128).sum())  # noqa: E731  (pixels of black text)
    columns = [img[line : top - rep.TEXT_PAD, left + c * rep.CELL : left + (c + 1) * rep.CELL] for c in range(3)]
    assert all(dark(band) > 5 for band in columns)  # each column carries its class label
    # renaming class 2 changes the label above column 2 only
    other = np.array(rep.confusion_image(mat, ["bg", "a", "e"]))
    assert rep.heat_map_origin(["0 bg", "1 a", "2 e"], font) == (left, top)
    kept, renamed = slice(left, left + 2 * rep.CELL), slice(left + 2 * rep.CELL, left + 3 * rep.CELL)
    assert (other[:top, kept] == img[:top, kept]).all() and (other[:top, renamed] != img[:top, renamed]).any()
    assert dark(img[:line, left:]) > 10  # the "prediction" axis title
    assert dark(img[top : top + 3 * rep.CELL, :line]) > 10  # the "ground truth" axis title, turned
    legend = img[top + 3 * rep.CELL + 1 :]  # a grey swatch and the line that explains it
    assert (legend == rep.HEAT_ABSENT).all(-1).sum() >= (rep.CELL // 2) ** 2 and dark(legend) > 100
    assert rep.ABSENT_LEGEND.startswith("grey row: class absent from the ground truth")
    assert img.shape[1] >= rep.CELL + font.getlength(rep.ABSENT_LEGEND)  # not cut off


def test_nan_depth_metrics_are_explained_in_the_report():
    evaluator = SegEvaluator(2)
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    evaluator.update({"seg": torch.randn(1, 2, 4, 4), "depth": torch.rand(1, 1, 4, 4)},
                     {"label": label, "depth": torch.zeros(1, 1, 4, 4)})  # constant maps stored as zeros
    metrics = evaluator.compute()
    assert math.isnan(metrics["depth_absrel"]) and metrics["depth_nan_reason"] == evaluator.depth.nan_reason()
    settings = {"checkpoint": "c", "split": "val", "num_images": 1, "split_size": 1, "flip": False, "scales": [1.0],
                "world_size": 1}
    report = rep.build_report(metrics, {0: 1.0}, ["a"], ["bg", "fg"], ["iIoU not available"], settings)
    assert report["depth_absrel"] is None and report["notes"] == ["iIoU not available", metrics["depth_nan_reason"]]
    table = rep.markdown_table(report)
    assert "| depth_absrel | – |" in table and f"- {metrics['depth_nan_reason']}" in table
    evaluator = SegEvaluator(2)  # a fresh one: train.py and evaluate.py make one per split
    evaluator.update({"seg": torch.randn(1, 2, 4, 4), "depth": torch.rand(1, 1, 4, 4)},
                     {"label": label, "depth": torch.rand(1, 1, 4, 4) + 0.1})
    assert "depth_nan_reason" not in evaluator.compute()


def test_parser_contract():
    args = ev.get_args_parser().parse_args(["--checkpoint", "c", "--data-root", "d"])
    assert (args.split, args.output, args.flip, args.scales, args.save_worst) == ("val", None, False, (1.0,), 0)
    tta = ev.get_args_parser().parse_args(["--checkpoint", "c", "--data-root", "d", "--scales", "0.75,1,1.25"])
    assert tta.scales == (0.75, 1.0, 1.25)
    with pytest.raises(SystemExit):
        ev.get_args_parser().parse_args(["--checkpoint", "c", "--data-root", "d", "--scales", "0,1"])


def test_two_processes_count_each_image_once(tiny_voc, checkpoint, tmp_path, fresh_accelerate, launch_two_ranks):
    # 7 val images, batch 2, 2 processes: 8 slots, so the last batch is padded with a duplicate
    one = run_main("--checkpoint", checkpoint, "--data-root", tiny_voc, "--output", tmp_path / "one.json", "--batch-size", "2")
    proc = launch_two_ranks(REPO / "tools" / "evaluate.py", "--checkpoint", checkpoint, "--data-root", tiny_voc,
                            "--output", tmp_path / "two.json", "--batch-size", "2", "--workers", "0", cwd=tmp_path,
                            timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    ids = (tiny_voc / "ImageSets/Segmentation/val.txt").read_text().split()

    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert one["settings"]["num_images"] == two["settings"]["num_images"] == one["settings"]["split_size"] == 7
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert np.sum(two["confusion_matrix"]) == labelled_pixels(tiny_voc, ids)
    assert two["per_image_mIoU"] == one["per_image_mIoU"] and list(two["per_image_mIoU"]) == ids
    assert all(two[k] == pytest.approx(one[k], rel=1e-12) for k in ("mIoU", "fg_mIoU", "pixel_acc", "iIoU"))
    # depth is float arithmetic in a different thread count: equal to rounding
    assert all(two[k] == pytest.approx(one[k], rel=1e-5) for k in ("depth_mse", "depth_absrel", "depth_delta1"))
    assert 0 < one["mIoU"] < 1 and one["iIoU_available"] and 0 <= one["iIoU"] <= 1

    # an independent confusion matrix: torchmetrics on a plain forward pass of every image
    model, ref = load_model(checkpoint), MulticlassConfusionMatrix(21, ignore_index=255)
    dataset = get_dataset(tiny_voc, "val", model.config, None)[0]
    with torch.no_grad():
        for i in range(len(dataset)):
            s = dataset[i]
            ref.update(model(s["image"][None], tasks=("seg",))["seg"].argmax(1), s["label"].as_subclass(torch.Tensor)[None].long())
    assert ref.compute().tolist() == one["confusion_matrix"]


def test_report_files_and_batch_size_invariance(tiny_voc, checkpoint, tmp_path, fresh_accelerate):
    out = tmp_path / "r.json"
    report = run_main("--checkpoint", checkpoint, "--data-root", tiny_voc, "--output", out,
                      "--batch-size", "3", "--save-worst", "2")
    single = run_main("--checkpoint", checkpoint, "--data-root", tiny_voc, "--output", tmp_path / "b1.json", "--batch-size", "1")
    assert report["confusion_matrix"] == single["confusion_matrix"]
    on_disk = json.loads(out.read_text())
    assert on_disk["mIoU"] == report["mIoU"] and [c["name"] for c in on_disk["per_class"]][:2] == ["background", "aeroplane"]
    mat = np.array(on_disk["confusion_matrix"])
    assert on_disk["pixel_acc"] == pytest.approx(np.trace(mat) / mat.sum())
    absent = [c for c in range(21) if mat[c].sum() + mat[:, c].sum() == 0]
    assert [c["id"] for c in on_disk["absent_classes"]] == absent and absent  # tiny_voc lacks some classes
    assert all(on_disk["per_class"][c]["iou"] is None for c in absent)
    md = out.with_suffix(".md").read_text()
    assert "| 1 | aeroplane |" in md and f"| mIoU (%) | {100 * report['mIoU']:.2f} |" in md and "left out of the means" in md
    assert Image.open(tmp_path / "r_confusion.png").size[0] > 21 * rep.CELL
    worst = sorted(on_disk["per_image_mIoU"].items(), key=lambda kv: kv[1])[:2]
    assert [w["id"] for w in on_disk["worst_images"]] == [k for k, _ in worst]
    panel = Image.open(tmp_path / "r_worst" / on_disk["worst_images"][0]["file"])
    assert panel.size == (3 * 64, 64)


def test_voc_mini_end_to_end_without_instances(voc_mini, checkpoint, tmp_path, fresh_accelerate):
    n = 8  # real images are up to 500 px: a few keep this quick on a CPU
    out = tmp_path / "voc.json"
    report = run_main("--checkpoint", checkpoint, "--data-root", voc_mini, "--output", out, "--max-images", n, "--save-worst", "1")
    ids = (voc_mini / "ImageSets/Segmentation/val.txt").read_text().split()
    assert "iIoU" not in report and report["iIoU_available"] is False
    assert any("iIoU not available" in note for note in report["notes"])
    assert any("depth metrics not available" in note for note in report["notes"])  # no PseudoDepth/ there
    assert "| iIoU | not available" in out.with_suffix(".md").read_text()
    assert (report["settings"]["num_images"], report["settings"]["split_size"]) == (n, len(ids))
    assert list(report["per_image_mIoU"]) == ids[:n]
    assert np.sum(report["confusion_matrix"]) == labelled_pixels(voc_mini, ids[:n])
    worst = report["worst_images"][0]
    label = Image.open(voc_mini / "SegmentationClass" / f"{worst['id']}.png")
    assert Image.open(tmp_path / "voc_worst" / worst["file"]).size == (3 * label.size[0], label.size[1])
    assert Image.open(tmp_path / "voc_worst" / worst["file"].replace(".png", "_pred.png")).size == label.size
