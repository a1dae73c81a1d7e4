"""tools/export.py --int8: the int8 ONNX model of a tiny trained run runs in ONNX Runtime, gives the fp32 logits to
a stated tolerance, and export.json holds both models' size, latency and val metrics, scored as evaluate.py scores."""
import json
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from onnx import numpy_helper

from data import VOCSegmentation, get_transform
from evaluation.inference import onnx_predictor
from models import ModelConfig, build_model, load_model, save_model
from models.deploy import onnx_session, run_onnx
from evaluation.int8 import find_dataset
from evaluation.scoring import get_dataset, score
from models.quantize import chunk, spread
from tools import export

TINY = ModelConfig(encoder="resnet18", tasks=("seg", "depth"), decoder_channels=(64, 32, 16, 16, 8))
TRAIN_STEPS, BATCH, LR = 40, 4, 3e-3  # seconds; beyond "all background" but many pixels stay near a tie
CALIBRATION_IMAGES = 8
# int8 vs fp32 on the val images: max |diff| / max |fp32 logit| per image (measured 0.08), the share of pixels whose
# argmax agrees (measured 0.94: this barely trained model has many near-ties; the default synthetic run: 0.997), and
# the same share among the pixels where fp32's two best logits are CONFIDENT_MARGIN of the logit scale apart
LOGIT_TOL = 0.15
ARGMAX_AGREEMENT = 0.9
CONFIDENT_MARGIN, CONFIDENT_AGREEMENT = 0.05, 0.995


def reset_accelerate():
    """score() builds an Accelerator: process-wide state that other tests' runs must not inherit."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_tiny(root):
    """A tiny model trained a few dozen Adam steps on the synthetic training split (seg loss only)."""
    torch.manual_seed(0)
    model = build_model(TINY).train()
    train = VOCSegmentation(root, "train", get_transform(False, 0, 0))
    images = torch.stack([train[i]["image"].as_subclass(torch.Tensor) for i in range(len(train))])
    labels = torch.stack([train[i]["label"].as_subclass(torch.Tensor).long() for i in range(len(train))])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(TRAIN_STEPS):
        idx = torch.arange(step * BATCH, (step + 1) * BATCH) % len(train)
        loss = F.cross_entropy(model(images[idx], ("seg",))["seg"], labels[idx], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def run(tiny_voc, tmp_path_factory):
    """(model, run folder): saved like a training run, run_config.json naming its dataset."""
    folder = tmp_path_factory.mktemp("int8") / "run"
    model = train_tiny(tiny_voc)
    save_model(model, folder / "checkpoints" / "last")
    (folder / "run_config.json").write_text(json.dumps({"dataset": "synthetic", "data_root": str(tiny_voc)}))
    return model, folder


def run_export(run_folder, out, *extra):
    args = export.get_args_parser().parse_args(
        ["--checkpoint", str(run_folder), "--out", str(out), "--flops-size", "64x64", "--check-sizes", "67x71",
         "--check-batch", "1", "--int8", "--calibration-images", str(CALIBRATION_IMAGES), "--latency-runs", "5",
         *extra])
    reset_accelerate()
    try:
        export.main(args)
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def exported(run):
    out = run[1].parent / "out"
    run_export(run[1], out)
    return out, json.loads((out / "export.json").read_text())


def val_images(root, n=None):
    val = VOCSegmentation(root, "val", get_transform(False, 0, 0))
    return [val[i]["image"].as_subclass(torch.Tensor)[None] for i in range(n or len(val))]


def test_int8_logits_agree_with_fp32_on_val_images(exported, tiny_voc):
    out, _ = exported
    fp32, int8 = onnx_session(out / "model.onnx"), onnx_session(out / "model_int8.onnx")
    agree, confident = [], []
    for x in val_images(tiny_voc):
        a, b = run_onnx(fp32, x), run_onnx(int8, x)
        assert b.shape == a.shape == (1, 21, 64, 64) and b.dtype == torch.float32
        scale = a.abs().max().item()
        assert (b - a).abs().max().item() <= LOGIT_TOL * scale
        top2 = a.topk(2, dim=1).values  # (1, 2, H, W)
        same = a.argmax(1) == b.argmax(1)
        agree.append(same.flatten())
        confident.append(same[top2[:, 0] - top2[:, 1] >= CONFIDENT_MARGIN * scale])
    assert torch.cat(agree).float().mean().item() >= ARGMAX_AGREEMENT
    confident = torch.cat(confident)
    assert confident.numel() > 0.5 * torch.cat(agree).numel()  # most pixels are not near a tie
    assert confident.float().mean().item() >= CONFIDENT_AGREEMENT


def test_int8_model_keeps_dynamic_sizes(exported, tiny_voc):
    out, _ = exported
    fp32, int8 = onnx_session(out / "model.onnx"), onnx_session(out / "model_int8.onnx")
    for x in val_images(tiny_voc, 2):
        x = x[..., 3:, 5:62]  # (1, 3, 61, 57): odd, never traced; cropped, so the statistics calibrated on hold
        a, b = run_onnx(fp32, x), run_onnx(int8, x)
        assert b.shape == a.shape == (1, 21, 61, 57)
        assert (b - a).abs().max().item() <= LOGIT_TOL * a.abs().max().item()


def test_report_holds_size_latency_and_metrics_of_both(exported, tiny_voc, run):
    out, report = exported
    r = report["int8"]
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model_int8.onnx", "export.json"}
    sizes = r["size_bytes"]
    assert sizes["fp32"] == (out / "model.onnx").stat().st_size
    assert sizes["int8"] == (out / "model_int8.onnx").stat().st_size
    assert sizes["ratio"] > 3.5  # int8 weights: a quarter of the float bytes, plus scales and graph
    lat = r["latency"]
    assert lat["size"] == [64, 64] and lat["batch"] == 1 and lat["runs"] == 5
    assert all(lat[k]["median_ms"] >= lat[k]["min_ms"] > 0 for k in ("fp32", "int8"))
    assert lat["speedup"] == pytest.approx(lat["fp32"]["median_ms"] / lat["int8"]["median_ms"])
    q = r["quantization"]
    assert q["calibration_images"] == CALIBRATION_IMAGES and q["calibration_split"] == "train"
    assert q["data_root"] == str(tiny_voc)
    m = r["metrics"]
    assert m["split"] == "val" and m["images"] == 7
    dataset, _, _ = get_dataset(tiny_voc, "val", load_model(out).config, None)
    reset_accelerate()
    for name, file in (("fp32", "model.onnx"), ("int8", "model_int8.onnx")):
        metrics, _ = score(onnx_predictor(out / file), dataset, 21)  # the report is the score of the shipped file
        assert {k: m[name][k] for k in ("mIoU", "fg_mIoU")} == {k: metrics[k] for k in ("mIoU", "fg_mIoU")}
        assert 0.0 <= m[name]["fg_mIoU"] <= m[name]["mIoU"] <= 1.0
    reset_accelerate()
    assert m["fp32"]["pixel_acc"] > 0.6  # trained (measured 0.7): the agreement tests compare meaningful logits
    assert m["mIoU_drop"] == pytest.approx(m["fp32"]["mIoU"] - m["int8"]["mIoU"])
    assert r["agreement"]["images"] == 7 and r["agreement"]["argmax_agreement"] >= ARGMAX_AGREEMENT


def test_int8_graph_is_qdq_with_per_channel_int8_weights(exported):
    out, _ = exported
    graph = onnx.load(str(out / "model_int8.onnx")).graph
    weights = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    assert len(convs) == 31  # resnet18 20, decoder 10, head 1: every one quantized, no BatchNorm left
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    for conv in convs:
        x, w = dq[conv.input[0]], dq[conv.input[1]]  # activations and weights both come dequantized from int8
        assert numpy_helper.to_array(weights[x.input[2]]).dtype.name == "uint8"
        q_weight, scale = numpy_helper.to_array(weights[w.input[0]]), numpy_helper.to_array(weights[w.input[1]])
        assert q_weight.dtype.name == "int8" and scale.shape == (q_weight.shape[0],)  # one scale per out channel


def test_int8_model_is_model_onnx_quantized(exported):
    """model_int8.onnx is model.onnx (whose BatchNorms the exporter folded) with QDQ pairs around the same
    convolutions: the same Conv nodes, each weight the fp32 weight to within its quantization step."""
    out, _ = exported
    fp32, int8 = (onnx.load(str(out / name)).graph for name in ("model.onnx", "model_int8.onnx"))
    assert not [n for n in fp32.node if n.op_type == "BatchNormalization"]
    fp32_weights = {t.name: numpy_helper.to_array(t) for t in fp32.initializer}
    int8_weights = {t.name: numpy_helper.to_array(t) for t in int8.initializer}
    dq = {n.output[0]: n for n in int8.node if n.op_type == "DequantizeLinear"}
    fp32_convs = {n.name: n for n in fp32.node if n.op_type == "Conv"}  # by name: the quantizer may reorder nodes
    int8_convs = {n.name: n for n in int8.node if n.op_type == "Conv"}
    assert fp32_convs.keys() == int8_convs.keys() and fp32_convs
    for a, b in ((fp32_convs[k], int8_convs[k]) for k in fp32_convs):
        w = fp32_weights[a.input[1]]
        q = dq[b.input[1]]
        q_weight, scale = int8_weights[q.input[0]], int8_weights[q.input[1]]
        restored = q_weight.astype("float32") * scale.reshape(-1, *[1] * (q_weight.ndim - 1))
        assert restored.shape == w.shape and abs(restored - w).max() <= scale.max() / 2 + 1e-7


def test_missing_onnxruntime_is_named_before_anything_is_written(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        run_export(run[1], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


def test_dataset_is_found_from_the_run_or_the_flags(tmp_path, tiny_voc):
    started = tmp_path / "work"  # train.py ran here with --output-dir runs/a and a relative data root
    (started / "datasets" / "mine").mkdir(parents=True)
    run = started / "runs" / "a"
    (run / "checkpoints" / "best").mkdir(parents=True)
    config = {"dataset": "voc", "data_root": "datasets/mine", "output_dir": "runs/a"}
    (run / "run_config.json").write_text(json.dumps(config))
    assert find_dataset(run / "checkpoints" / "best", None, None) == ("voc", started / "datasets" / "mine")
    assert find_dataset(run, "synthetic", str(tiny_voc)) == ("synthetic", tiny_voc)
    (started / "datasets" / "mine").rmdir()
    with pytest.raises(FileNotFoundError, match="pass --data-root"):
        find_dataset(run, None, None)
    with pytest.raises(ValueError, match="no run_config.json.*pass --dataset"):
        find_dataset(tmp_path, None, None)


def test_calibration_images_spread_over_the_split():
    assert spread(10, 4) == [0, 3, 6, 9]
    assert spread(3, 300) == [0, 1, 2]
    assert spread(5, 1) == [0]


def test_calibration_chunks_divide_the_set():
    assert [chunk(n) for n in (1, 7, 16, 30, 300)] == [1, 7, 16, 15, 15]


def test_latency_sessions_are_the_prediction_sessions_with_threads(exported):
    """One place makes ONNX Runtime sessions (models/deploy.onnx_session): the int8 latency asks it for a thread count."""
    out, _ = exported
    session = onnx_session(out / "model.onnx", "cpu", threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    config = session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert config == "0"
