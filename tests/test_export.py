"""tools/export.py: the seg-only model matches the multi-decoder model's seg output in every format and costs
exactly what the single-decoder model costs."""
import copy
import json

import onnx
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from models import ModelConfig, build_model, load_model, save_model
from models.files import verify
from models.deploy import SegLogits, export_onnx, load_torchscript, onnx_session, run_onnx
from tools import export

TINY = ModelConfig(encoder="resnet18", decoder_channels=(64, 32, 16, 16, 8))
FLOPS_SIZE = (64, 64)
SHAPES = [(b, 3, h, w) for h, w in [(64, 64), (67, 71), (96, 128)] for b in (1, 2)]  # export traced at 2x64x64
TS_TOL = 1e-5  # TorchScript: max abs diff / max |logit|
ORT_TOL = 1e-4  # ONNX Runtime: max abs diff / max |logit|


def tiny_checkpoint(root, tasks=("seg", "depth")):
    """A random tiny model saved like a training run (run/checkpoints/last); returns (model, run folder)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY.__dict__, "tasks": tasks})).eval()
    save_model(model, root / "run" / "checkpoints" / "last")
    return model, root / "run"


def run_export(run, out, *extra):
    args = export.get_args_parser().parse_args(
        ["--checkpoint", str(run), "--out", str(out), "--flops-size", "64x64", "--check-sizes", "67x71", *extra])
    export.main(args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(full multi-decoder model, exported folder) via the default (dynamo) ONNX exporter."""
    root = tmp_path_factory.mktemp("export")
    model, run = tiny_checkpoint(root)
    run_export(run, root / "out")
    return model, root / "out"


@pytest.fixture(scope="module")
def backends(exported):
    _, out = exported
    return load_model(out), load_torchscript(out / "model.pt"), onnx_session(out / "model.onnx")


def test_export_writes_a_seg_only_model_loadable_with_load_model(exported):
    model, out = exported
    files = {"model.safetensors", "config.json", "model.pt", "model.onnx", "export.json"}
    assert {p.name for p in out.iterdir()} == files | {"manifest.json"}
    assert set(json.loads((out / "manifest.json").read_text())["files"]) == files and verify(out) == []
    assert not (out.parent / ".out.tmp").exists()
    slim = load_model(out)
    assert slim.tasks == ("seg",)
    assert slim.config == ModelConfig(**{**model.config.__dict__, "tasks": ("seg",)})
    keys = load_file(out / "model.safetensors").keys()
    assert not [k for k in keys if "depth" in k]
    assert set(keys) == {k for k in model.state_dict() if ".seg." in k or k.startswith("encoder.")}


def test_onnx_names_and_dynamic_axes(exported):
    graph = onnx.load(str(exported[1] / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(graph.output[0]) == ["batch", 21, "height", "width"]
    assert not [t.name for t in graph.initializer if "depth" in t.name]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exported_logits_equal_the_multi_decoder_seg_output(exported, backends, shape):
    model, _ = exported
    eager, scripted, session = backends
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = model(x)["seg"]  # the full model, both decoders run
        got_eager, got_ts = eager(x)["seg"], scripted(x)
    got_ort = run_onnx(session, x)
    scale = ref.abs().max().item()
    assert ref.shape == (shape[0], 21, *shape[2:])
    assert torch.equal(got_eager, ref)  # PyTorch: exact
    assert got_ts.shape == ref.shape and (got_ts - ref).abs().max().item() <= TS_TOL * scale
    assert got_ort.shape == ref.shape and (got_ort - ref).abs().max().item() <= ORT_TOL * scale


def flops(model, size):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, *size))
    return counter.get_total_flops()


def test_exported_cost_is_exactly_the_single_decoder_model(exported):
    model, out = exported
    single = build_model(ModelConfig(encoder="resnet18", decoder_channels=TINY.decoder_channels, tasks=("seg",)))
    slim = load_model(out)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(slim) == n(single)
    assert {k: v.shape for k, v in slim.state_dict().items()} == {k: v.shape for k, v in single.state_dict().items()}
    depth_params = n(model.decoders["depth"]) + n(model.heads["depth"])
    assert depth_params > 0 and n(model) == n(slim) + depth_params
    cost = {"full": flops(model, FLOPS_SIZE), "exported": flops(slim, FLOPS_SIZE)}
    assert cost["exported"] == flops(single, FLOPS_SIZE) < cost["full"]
    report = json.loads((out / "export.json").read_text())
    assert report["params"] == {"full": n(model), "exported": n(single)}
    assert report["flops"] == cost and report["flops_size"] == list(FLOPS_SIZE)
    assert [r["backend"] for r in report["parity"] if r["ok"]] == ["pytorch", "torchscript", "onnxruntime"]


def test_legacy_onnx_exporter_keeps_sizes_dynamic(tmp_path, exported):
    model, _ = exported
    slim = load_model(exported[1])
    export_onnx(SegLogits(slim), tmp_path / "m.onnx", exporter="legacy")
    x = torch.randn(2, 3, 67, 71)
    with torch.no_grad():
        ref = model(x)["seg"]
    got = run_onnx(onnx_session(tmp_path / "m.onnx"), x)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= ORT_TOL * ref.abs().max().item()


def test_parity_failure_is_loud_and_leaves_out_untouched(tmp_path, monkeypatch):
    _, run = tiny_checkpoint(tmp_path)

    def broken_onnx(module, path, exporter):  # a wrong ONNX file must not pass the check
        bad = copy.deepcopy(module)
        with torch.no_grad():
            bad.model.heads["seg"].bias += 0.05
        export_onnx(bad, path, "legacy")

    monkeypatch.setattr(export, "export_onnx", broken_onnx)
    with pytest.raises(RuntimeError, match="parity check failed for 1 of 3 cases.*onnxruntime"):
        run_export(run, tmp_path / "out", "--check-sizes", "35x37", "--check-batch", "1")
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.tmp" / "model.onnx").is_file()  # kept for inspection


def test_checkpoint_without_seg_decoder_or_out_over_the_checkpoint_is_refused(tmp_path):
    _, run = tiny_checkpoint(tmp_path, tasks=("depth",))
    with pytest.raises(ValueError, match="no seg decoder"):
        run_export(run, tmp_path / "out")
    for out in (run, run / "checkpoints" / "last"):
        with pytest.raises(ValueError, match="is a checkpoint or run folder"):
            run_export(run, out)


def test_size_arguments(capsys):
    parse = export.get_args_parser().parse_args
    required = ["--checkpoint", "c", "--out", "o"]
    assert parse([*required, "--flops-size", "512"]).flops_size == (512, 512)
    assert parse([*required, "--flops-size", "480x640"]).flops_size == (480, 640)
    assert parse([*required, "--check-sizes", "64x64,67x71"]).check_sizes == [(64, 64), (67, 71)]
    for bad in ("0", "axb", "1x2x3"):
        with pytest.raises(SystemExit):
            parse([*required, "--flops-size", bad])
        assert "expected S or HxW" in capsys.readouterr().err
