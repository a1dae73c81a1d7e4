"""Deployment: the seg-only model, its cost, TorchScript and ONNX export and ONNX Runtime sessions, parity checks.
Predicting images with any of them: evaluation/inference.py."""
import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from models.io import drop_decoders, load_model
from models.model import MultiDecoderModel

TORCHSCRIPT_NAME = "model.pt"
ONNX_NAME = "model.onnx"
ONNX_INT8_NAME = "model_int8.onnx"  # tools/export.py --int8 (models/quantize.py)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# trace/export input; batch 2 because torch.export specialises a dimension of size 1 to a constant
EXAMPLE_SHAPE = (2, 3, 64, 64)
LEGACY_OPSET = 17
PARITY_SEED = 0


class SegLogits(nn.Module):
    """The model as a plain function: image (B, 3, H, W) -> seg logits (B, num_classes, H, W)."""

    def __init__(self, model: MultiDecoderModel):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image, ("seg",))["seg"]


def seg_only(model: MultiDecoderModel) -> MultiDecoderModel:
    """The deployment model: encoder + seg decoder and head, the depth decoder dropped (eval mode)."""
    if "seg" not in model.tasks:
        raise ValueError(f"the model has no seg decoder (tasks {model.tasks}); nothing to deploy")
    return drop_decoders(model, ("seg",)).eval()


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_flops(model: nn.Module, x: Tensor, **kwargs) -> int:
    """FLOPs of one forward (a multiply-add counts 2), counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, **kwargs)
    return counter.get_total_flops()


def count_flops(model: MultiDecoderModel, size: tuple[int, int]) -> int:
    """FLOPs of one forward of every decoder the model has, on one image (see forward_flops)."""
    return forward_flops(model, torch.zeros(1, 3, *size, device=next(model.parameters()).device))


def export_torchscript(module: nn.Module, path: Path) -> None:
    """Trace on CPU; shapes are read with aten::size in the trace, so other sizes and batches work."""
    with warnings.catch_warnings():
        # trace is deprecated in favour of torch.export, but TorchScript is what C++/mobile users load
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*deprecated", category=FutureWarning)
        with torch.no_grad():
            # check_trace re-runs the model twice; check_parity compares the saved file on other sizes instead
            traced = torch.jit.trace(module.cpu().eval(), torch.randn(EXAMPLE_SHAPE), check_trace=False)
    traced.save(str(path))


def load_torchscript(path: Path, device: str = "cpu") -> torch.jit.ScriptModule:
    """torch.jit.load without its deprecation warning (see export_torchscript)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def export_onnx(module: nn.Module, path: Path, exporter: str = "dynamo") -> None:
    """ONNX with dynamic batch, height and width; input "image", output "logits", weights inside the file."""
    module = module.cpu().eval()
    example = (torch.randn(EXAMPLE_SHAPE),)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if exporter == "dynamo":
        dim = torch.export.Dim
        shapes = {"image": {0: dim("batch"), 2: dim("height"), 3: dim("width")}}
        torch.onnx.export(module, example, str(path), dynamo=True, dynamic_shapes=shapes,
                          external_data=False, verbose=False, **names)
    elif exporter == "legacy":
        axes = {0: "batch", 2: "height", 3: "width"}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(module, example, str(path), dynamo=False, opset_version=LEGACY_OPSET,
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, **names)
    else:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; use dynamo or legacy")


def onnx_session(path: Path, device: str = "cpu", threads: int = 0):
    """An ONNX Runtime session on CPU or CUDA (`threads` intra-op threads, 0: one per core), with a clear error when
    onnxruntime is missing. Every session of the repo is made here: prediction, parity checks, int8 latency."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(
            "the ONNX backend needs onnxruntime: `pip install onnxruntime` (or onnxruntime-gpu for CUDA)"
        ) from exc
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no ONNX model here; make one with `python tools/export.py`")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("ONNX Runtime has no CUDA provider here: install onnxruntime-gpu or use --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # no busy-waiting between runs: its spinning threads would take the cores from the PyTorch code around each run
    # (the metric code, the next image's decoding) and from another session timed in turns with this one
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers)


def run_onnx(session, x: Tensor) -> Tensor:
    """Logits from an ONNX Runtime session for a CPU float tensor."""
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def compare(name: str, out: Tensor, ref: Tensor, tol: float) -> dict:
    """Max abs difference and the same relative to the logit scale (max |ref|); ok when relative <= tol."""
    if out.shape != ref.shape:
        raise ValueError(f"{name}: output shape {tuple(out.shape)} differs from PyTorch's {tuple(ref.shape)}")
    diff = (out.float() - ref.float()).abs().max().item()
    rel = diff / max(ref.abs().max().item(), torch.finfo(torch.float32).tiny)
    return {"backend": name, "shape": list(ref.shape), "max_abs_diff": diff, "rel_diff": rel, "tol": tol,
            "ok": rel <= tol}


@torch.no_grad()
def parity_rows(reference: MultiDecoderModel, backends: dict[str, tuple[Callable[[Tensor], Tensor], float]],
                shapes: list[tuple[int, ...]]) -> list[dict]:
    """Each backend (name -> (image batch -> seg logits, tolerance)) against the reference's eager seg output on
    seeded random inputs of each shape: compare's rows, shape by shape."""
    reference = reference.cpu().eval()
    gen = torch.Generator().manual_seed(PARITY_SEED)
    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        ref = reference(x, ("seg",))["seg"]
        rows += [compare(name, run(x), ref, tol) for name, (run, tol) in backends.items()]
    return rows


def check_parity(reference: MultiDecoderModel, folder: Path, shapes: list[tuple[int, ...]],
                 tols: dict[str, float]) -> list[dict]:
    """Exported PyTorch (safetensors), TorchScript and ONNX Runtime files vs the reference's eager seg output."""
    eager = load_model(folder)
    scripted = load_torchscript(Path(folder) / TORCHSCRIPT_NAME)
    session = onnx_session(Path(folder) / ONNX_NAME)
    return parity_rows(reference, {"pytorch": (lambda x: eager(x)["seg"], tols["pytorch"]),
                                   "torchscript": (scripted, tols["torchscript"]),
                                   "onnxruntime": (lambda x: run_onnx(session, x), tols["onnxruntime"])}, shapes)


# command-line types of the deployment tools (tools/export.py, tools/encoder_table.py)
def parse_size(text: str) -> tuple[int, int]:
    """`512` -> (512, 512); `480x640` -> (480, 640) as height x width."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected S or HxW with positive integers")
    return (parts[0], parts[-1])


def positive_int(text: str) -> int:
    """An integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)
