"""The edge encoders (MobileNetV3, EfficientNet, RegNetY from torchvision, models/encoder.StagedEncoder): features at
strides 2..32 with the stated channels, a d_s_b --copy-weights run and its resume through train.py, ONNX parity at an
odd size and the INT8 export through tools/export.py, weights from a local torchvision file, the offline `imagenet`
message, and the encoder's default decoder widths. Random weights, tiny images, one thread (the machine is shared)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import parse
from torch import nn

import train
from models import ModelConfig, build_model, load_model, save_model
from models.deploy import onnx_session, run_onnx
from models.encoder import EDGE_DECODER, ENCODERS, RESNET_DECODER, StagedEncoder, build_encoder
from models.model import MultiDecoderModel
from tools import export

CHANNELS = {
    "mobilenet_v3_small": (16, 16, 24, 48, 96),
    "mobilenet_v3_large": (16, 24, 40, 112, 160),
    "efficientnet_b0": (16, 24, 40, 112, 320),
    "efficientnet_b2": (16, 24, 48, 120, 352),
    "regnet_y_400mf": (32, 48, 104, 208, 440),
    "regnet_y_800mf": (32, 64, 144, 320, 784),
}
EDGE = list(CHANNELS)
STRIDES = (2, 4, 8, 16, 32)
ODD = (67, 93)
ORT_TOL = 1e-4  # ONNX Runtime: max abs diff / max |logit| (test_export.py's, export.py's default)
# ONNX exporter per encoder: torch.export (export.py's default) for one of each family, the legacy TorchScript-based one
# for its sibling of another width (the same operators; torch.export costs ~10 s a model here)
EXPORTER = {"mobilenet_v3_small": "dynamo", "mobilenet_v3_large": "legacy", "efficientnet_b0": "dynamo",
            "efficientnet_b2": "legacy", "regnet_y_400mf": "dynamo", "regnet_y_800mf": "legacy"}
# int8 vs fp32 on two val images of a random, untrained model (near-ties everywhere), 3 calibration images: argmax
# agreement measured 0.91-1.0, max |diff| 0.007-0.22 of the logit scale; loose bounds that garbage logits (argmax
# agreement ~1/21, |diff| ~1) miss
ARGMAX_FLOOR, INT8_DIFF_CEILING = 0.6, 0.5
# train.py's run: the paper's schedule with the copy, one step per stage, 32 px crops, batch 2, one thread
RUN = ["--schedule", "d_s_b", "--copy-weights", "--stage-steps", "1", "--crop-size", "32", "--base-size", "64",
       "--batch-size", "2", "--val-batch-size", "7", "--threads", "1", "--deterministic"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_run(root, out, name, *extra):
    """train.py's main in this process on the tiny synthetic set (test_reliability.parse), Accelerate reset around."""
    reset_accelerate()
    try:
        return train.main(parse(root, out, "--encoder", name, *RUN, *extra))
    finally:
        reset_accelerate()


def torchvision_layout(name: str, tv: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, tuple[str, ...]]:
    """The torchvision model spelled out: its first conv, the last block the encoder keeps, the feature extractor up
    to that block, and the state-dict prefixes the encoder leaves out (classifier; MobileNet / EfficientNet: also the
    last 1x1 expansion of `features`)."""
    if name.startswith("regnet"):
        return tv.stem[0], tv.trunk_output.block4, nn.Sequential(tv.stem, tv.trunk_output), ("fc.",)
    last = len(tv.features) - 1
    return tv.features[0][0], tv.features[last - 1], tv.features[:last], (f"features.{last}.", "classifier.")


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so folding them (ONNX) is really checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.rand(n, generator=gen) - 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.rand(n, generator=gen) - 0.1)


def torchvision_file(name: str, path, seed: int = 1) -> nn.Module:
    """A torchvision model of the encoder's architecture, seeded, BN statistics perturbed, saved as
    torch.save(model.state_dict()); returns the model (eval)."""
    torch.manual_seed(seed)
    tv = ENCODERS[name].builder(weights=None)
    randomise_batchnorm(tv, seed)
    torch.save(tv.state_dict(), path)
    return tv.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on this shared 2-core machine two threads spend most of the time waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the encoders


def test_every_non_resnet_encoder_is_tested_here():
    assert sorted(n for n in ENCODERS if not n.startswith("resnet")) == sorted(EDGE)


@pytest.mark.parametrize("name", EDGE)
def test_five_features_at_strides_2_to_32_with_the_stated_channels(name):
    torch.manual_seed(0)
    encoder = build_encoder(name).eval()
    assert isinstance(encoder, StagedEncoder)
    assert encoder.out_channels == CHANNELS[name]
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 64 // s) for c, s in zip(CHANNELS[name], STRIDES)]
    with torch.no_grad():  # odd sizes: each stride-2 step rounds up, as the decoder expects
        features = encoder(torch.randn(1, 3, *ODD))
    assert [tuple(f.shape[-2:]) for f in features] == [tuple(math.ceil(d / s) for d in ODD) for s in STRIDES]


@pytest.mark.parametrize("name", EDGE)
def test_odd_input_gives_full_size_logits_with_the_edge_decoder(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=name)).eval()
    assert model.config.decoder_channels == EDGE_DECODER == (96, 48, 24, 16)
    assert [b.conv2[0].out_channels for b in model.decoders["seg"].blocks] == list(EDGE_DECODER)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *ODD))
    assert out["seg"].shape == (1, 21, *ODD) and out["depth"].shape == (1, 1, *ODD)
    assert torch.isfinite(out["seg"]).all()


def test_default_decoder_widths_by_encoder_and_explicit_ones_win():
    assert ModelConfig(encoder="resnet18").decoder_channels == RESNET_DECODER == (256, 128, 64, 32, 16)
    assert all(ModelConfig(encoder=n).decoder_channels == (96, 48, 24, 16) for n in EDGE)
    assert ModelConfig(encoder="efficientnet_b0", decoder_channels=(32, 16, 16, 8, 8)).decoder_channels == (32, 16, 16, 8, 8)
    with pytest.raises(ValueError, match="unknown encoder 'efficientnet_b7'"):
        ModelConfig(encoder="efficientnet_b7")


# ------------------------------------------------------------------------------------------ training through train.py


@pytest.fixture(scope="module")
def runs(tiny_voc, tmp_path_factory):
    """runs(name) -> (run folder, copies): a finished d_s_b --copy-weights run of the encoder (trained once per module),
    and what each copy_decoder call did: (src, dst, every copied tensor equal to its source)."""
    root = tmp_path_factory.mktemp("edge_runs")
    done = {}

    def get(name):
        if name not in done:
            copies = []
            real_copy = MultiDecoderModel.copy_decoder

            def checked_copy(self, src, dst):
                names = real_copy(self, src, dst)
                a, b = self.decoders[src].state_dict(), self.decoders[dst].state_dict()
                copies.append((src, dst, a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)))
                return names

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(MultiDecoderModel, "copy_decoder", checked_copy)
                train_run(tiny_voc, root / name, name)
            done[name] = root / name, copies
        return done[name]

    return get


@pytest.mark.parametrize("name", EDGE)
def test_d_s_b_with_copy_trains_and_copies_every_decoder_tensor_but_the_head(name, runs):
    out, copies = runs(name)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(x["stage_name"], x["steps"]) for x in lines] == [("d", 1), ("s", 1), ("b", 1)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("mIoU", "fg_mIoU", "pixel_acc", "iIoU"))
    model = load_model(out / "checkpoints" / "last")
    assert model.config.encoder == name and model.tasks == ("seg", "depth")
    assert isinstance(model.encoder, StagedEncoder) and model.encoder.out_channels == CHANNELS[name]

    assert copies == [("depth", "seg", True)]  # once, before the s stage, every tensor equal to its source
    listed = (out / "copied_tensors.txt").read_text().splitlines()
    seg_keys = list(model.decoders["seg"].state_dict())
    assert listed == [f"decoders.depth.{k} -> decoders.seg.{k}" for k in seg_keys]
    assert {k for k in model.state_dict() if k.startswith("decoders.seg.")} == {f"decoders.seg.{k}" for k in seg_keys}
    assert not [line for line in listed if "heads." in line]
    assert [k for k in model.state_dict() if k.startswith("heads.")]  # the model has heads; none was copied

    # no --decoder-channels: the edge encoders' default widths, in run_config.json and the checkpoint
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"]["encoder"] == name
    assert config["model"]["decoder_channels"] == [96, 48, 24, 16]
    assert model.config.decoder_channels == EDGE_DECODER


class Interrupted(Exception):
    """Stands for a kill between two stages."""


@pytest.mark.parametrize("name", EDGE)
def test_a_run_interrupted_after_its_first_stage_resumes_to_the_same_weights(name, runs, tiny_voc, tmp_path,
                                                                            monkeypatch, capsys):
    """Stopped after the d stage (its checkpoint written), then `--resume auto`: the copy still happens at the s
    stage's start, and the finished run equals the uninterrupted one (runs) tensor for tensor, log line for line."""
    reference, _ = runs(name)
    out = tmp_path / "run"
    real_fault_point = train.fault_point

    def stop_after_first_stage(event):
        real_fault_point(event)
        if event == "stage":
            raise Interrupted

    monkeypatch.setattr(train, "fault_point", stop_after_first_stage)
    with pytest.raises(Interrupted):
        train_run(tiny_voc, out, name)
    monkeypatch.setattr(train, "fault_point", real_fault_point)
    state = json.loads((out / "checkpoints" / "last" / "train_state.json").read_text())
    assert (state["stage"], state["global_step"]) == (0, 1) and not (out / "copied_tensors.txt").exists()
    capsys.readouterr()

    train_run(tiny_voc, out, name, "--resume", "auto")
    assert "resumed from" in capsys.readouterr().out
    assert (out / "copied_tensors.txt").read_text() == (reference / "copied_tensors.txt").read_text()
    a, b = (load_file(f / "checkpoints" / "last" / "model.safetensors") for f in (reference, out))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (out / "log.jsonl").read_text() == (reference / "log.jsonl").read_text()


# ---------------------------------------------------------------------------------------- export: ONNX and INT8


@pytest.fixture(scope="module")
def exports(tiny_voc, tmp_path_factory):
    """exports(name) -> (model, export folder, export.json): a random model of the encoder with randomised BatchNorm
    statistics, saved like a run (run_config.json naming the tiny set), exported by tools/export.py with --int8 at
    the odd size (EXPORTER's ONNX exporter); once per module."""
    root = tmp_path_factory.mktemp("edge_exports")
    done = {}

    def get(name):
        if name not in done:
            torch.manual_seed(0)
            model = build_model(ModelConfig(encoder=name)).eval()
            randomise_batchnorm(model, seed=1)
            run, out = root / name / "run", root / name / "out"
            save_model(model, run / "checkpoints" / "last")
            (run / "run_config.json").write_text(json.dumps({"dataset": "synthetic", "data_root": str(tiny_voc)}))
            args = export.get_args_parser().parse_args(
                ["--checkpoint", str(run), "--out", str(out), "--flops-size", "64x64",
                 "--check-sizes", f"{ODD[0]}x{ODD[1]}", "--check-batch", "1", "--int8", "--calibration-images", "3",
                 "--eval-images", "2", "--latency-runs", "1", "--latency-threads", "1",
                 "--onnx-exporter", EXPORTER[name]])
            reset_accelerate()
            try:
                export.main(args)
            finally:
                reset_accelerate()
            done[name] = model, out, json.loads((out / "export.json").read_text())
        return done[name]

    return get


@pytest.mark.parametrize("name", EDGE)
def test_onnx_gives_the_pytorch_logits_at_an_odd_size(name, exports):
    model, out, report = exports(name)
    assert report["onnx_exporter"] == EXPORTER[name]
    rows = {r["backend"]: r for r in report["parity"]}
    assert set(rows) == {"pytorch", "torchscript", "onnxruntime"} and all(r["ok"] for r in rows.values())
    # no --onnx-tol: the encoder's own default (EfficientNet's SiLU + SE blocks drift further in fp32 ONNX Runtime)
    assert rows["onnxruntime"]["tol"] == (1e-3 if name.startswith("efficientnet") else 1e-4)
    assert all(r["shape"] == [1, 21, *ODD] for r in rows.values())
    # the stats reached the export: a default BatchNorm (mean 0, var 1) would make the check trivial
    assert any(k.endswith("running_var") and not torch.equal(v, torch.ones_like(v))
               for k, v in load_file(out / "model.safetensors").items())
    x = torch.randn(2, 3, *ODD, generator=torch.Generator().manual_seed(7))  # batch 2: not the checked batch
    with torch.no_grad():
        ref = model(x)["seg"]  # the full two-decoder model
    got = run_onnx(onnx_session(out / "model.onnx", threads=1), x)
    assert got.shape == ref.shape == (2, 21, *ODD)
    assert (got - ref).abs().max().item() <= ORT_TOL * ref.abs().max().item()


@pytest.mark.parametrize("name", EDGE)
def test_int8_export_runs_and_reports_its_argmax_agreement(name, exports):
    _, out, report = exports(name)
    assert (out / "model_int8.onnx").is_file()
    r = report["int8"]
    assert r["file"] == "model_int8.onnx" and r["quantization"]["calibration_images"] == 3
    assert r["agreement"]["images"] == 2
    agreement = r["agreement"]["argmax_agreement"]
    assert 0.0 <= agreement <= 1.0 and agreement >= ARGMAX_FLOOR, agreement
    assert 0.0 < r["agreement"]["max_abs_diff_rel"] <= INT8_DIFF_CEILING  # quantized (not equal), yet close
    assert r["size_bytes"]["int8"] == (out / "model_int8.onnx").stat().st_size < r["size_bytes"]["fp32"]
    got = run_onnx(onnx_session(out / "model_int8.onnx", threads=1), torch.randn(1, 3, *ODD))
    assert got.shape == (1, 21, *ODD) and torch.isfinite(got).all()


# ------------------------------------------------------------------------------------------------ encoder weights


@pytest.mark.parametrize("name", EDGE)
def test_encoder_weights_from_a_local_torchvision_file(name, tmp_path):
    path = tmp_path / f"{name}.pth"
    tv = torchvision_file(name, path)
    encoder = build_encoder(name, str(path)).eval()
    first_conv, last_block, trunk, left_out = torchvision_layout(name, tv)
    assert torch.equal(encoder.stages[0][0][0].weight, first_conv.weight)
    ours, theirs = encoder.stages[4][-1].state_dict(), last_block.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # every tensor of the encoder, in order, is the file's, less the classifier (and MobileNet's / EfficientNet's
    # last 1x1 expansion): nothing more, nothing less
    expected = [v for k, v in tv.state_dict().items() if not k.startswith(left_out)]
    got = list(encoder.state_dict().values())
    assert len(got) == len(expected) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, expected))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x)[-1], trunk(x))
    assert not torch.equal(build_encoder(name).stages[0][0][0].weight, first_conv.weight)  # not the random init


# a model whose state-dict keys share nothing with the encoder's (MobileNet and EfficientNet share `features.N...`)
OTHER_FAMILY = {"mobilenet": "regnet_y_400mf", "efficientnet": "regnet_y_400mf", "regnet": "efficientnet_b0"}


@pytest.mark.parametrize("name", EDGE)
def test_a_file_of_another_model_is_refused_clearly(name, tmp_path):
    other = OTHER_FAMILY[name.split("_")[0]]
    path = tmp_path / f"{other}.pth"
    torchvision_file(other, path)
    with pytest.raises(ValueError, match=f"encoder weights '{path}' do not fit {name}: missing"):
        build_encoder(name, str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_encoder(name, str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name, sibling", [("mobilenet_v3_large", "mobilenet_v3_small"),
                                           ("efficientnet_b2", "efficientnet_b0"),
                                           ("regnet_y_800mf", "regnet_y_400mf"),
                                           ("efficientnet_b0", "mobilenet_v3_small")])
def test_a_file_whose_keys_match_but_not_its_shapes_is_refused_clearly(name, sibling, tmp_path):
    path = tmp_path / f"{sibling}.pth"
    torchvision_file(sibling, path)
    with pytest.raises(ValueError, match=f"do not fit {name}.*other shapes") as err:
        build_encoder(name, str(path))
    assert str(path) in str(err.value)


def test_encoder_weights_file_and_decoder_channels_reach_a_train_py_run(tiny_voc, tmp_path):
    """--encoder-weights PATH through train.py (lr 0: the weights stay the file's) and an explicit
    --decoder-channels, in the model and run_config.json."""
    name = "mobilenet_v3_small"
    path = tmp_path / "weights.pth"
    tv = torchvision_file(name, path)
    out = tmp_path / "run"
    train_run(tiny_voc, out, name, "--schedule", "s", "--encoder-weights", str(path), "--lr", "0",
              "--decoder-channels", "32,16,16,8,8")
    config = json.loads((out / "run_config.json").read_text())
    assert config["encoder_weights"] == str(path) and config["model"]["decoder_channels"] == [32, 16, 16, 8, 8]
    model = load_model(out / "checkpoints" / "last")
    assert model.config.decoder_channels == (32, 16, 16, 8, 8)
    assert [b.conv2[0].out_channels for b in model.decoders["seg"].blocks] == [32, 16, 16, 8, 8]
    left_out = torchvision_layout(name, tv)[3]
    expected = [p for k, p in tv.named_parameters() if not k.startswith(left_out)]
    got = list(model.encoder.parameters())
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("name", EDGE)
def test_imagenet_weights_offline_error_says_how_to_supply_them(name, monkeypatch):
    enum = ENCODERS[name].weights
    file_name = enum.url.rsplit("/", 1)[-1]

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(enum), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="--encoder-weights") as err:
        build_model(ModelConfig(encoder=name), "imagenet")
    msg = str(err.value)
    assert name in msg and enum.url in msg and "network unreachable" in msg
    assert "cache" in msg and f"--encoder-weights /path/to/{file_name}" in msg and "--encoder-weights none" in msg


# ------------------------------------------------------------------------------------------------- train.py flags


def test_train_help_lists_every_encoder_and_the_edge_decoder_default():
    parser = train.get_args_parser()
    text = parser.format_help()
    assert all(name in text for name in ENCODERS)
    assert "96,48,24,16" in text and "256,128,64,32,16" in text
    for name in EDGE:
        assert parser.parse_args(["--encoder", name]).encoder == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--encoder", "efficientnet_b7"])
