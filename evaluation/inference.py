"""How an image is predicted, in one place: train.py's validation, tools/evaluate.py, tools/predict.py and
tools/export.py's scoring of the exported files all call `predict_image` (through `predict_batch` for a padded
batch), so the numbers a run reports are the numbers its shipped files give.

The rule, as torchvision's segmentation reference evaluates: each image alone (batch 1), at its own size, with
nothing padded reaching the model (the model takes any size: models/decoder.py). A loader may batch images for
I/O; `predict_batch` crops each back to its size first. Batch 1 is what makes the answers exact: a convolution's
result can differ in the last bits with the batch it is computed in, and a pixel whose two best classes are that
close would flip.

Test-time augmentation (tools/evaluate.py --flip/--scales) averages softmax over the views; with one view the
scores are the logits, whose argmax is the same class.
"""
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.transforms import eval_image
from models.files import check
from models.io import CONFIG_NAME, load_model, resolve_checkpoint
from models.deploy import ONNX_INT8_NAME, ONNX_NAME, onnx_session, run_onnx
from models.model import ModelConfig

# normalised images (1, 3, H, W) -> {task: (1, C, H, W)}: a model, an exported file, anything that maps one to the other
Predictor = Callable[[Tensor], dict[str, Tensor]]


def torch_predictor(model: nn.Module, tasks: tuple[str, ...] | None = None) -> Predictor:
    """A PyTorch model (already on its device, in eval mode) as a Predictor of `tasks` (default: all it has)."""
    def run(x: Tensor) -> dict[str, Tensor]:
        return model(x.contiguous(memory_format=torch.channels_last), tasks=tasks)

    return run


def for_inference(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The model on `device`, channels_last (as it trains), in eval mode."""
    return model.to(device, memory_format=torch.channels_last).eval()


def onnx_predictor(path: Path, device: str = "cpu") -> Predictor:
    """An exported ONNX file (fp32 or int8) through ONNX Runtime as a Predictor: {"seg": logits} on x's device."""
    session = onnx_session(path, device)
    return lambda x: {"seg": run_onnx(session, x.float().cpu().contiguous()).to(x.device)}


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of (N, C, h, w) to `size` (no copy when it is already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=list(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_image(run: Predictor, image: Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> dict[str, Tensor]:
    """One normalised image (3, H, W) -> {"seg": scores (K, H, W), "depth": (1, H, W) if predicted}, float32, at the
    image's size. The prediction is scores.argmax(0). One view: the logits; with scales/flip: softmax averaged over
    every scale, mirrored and not, each resized back to (H, W) (depth averaged likewise)."""
    size = image.shape[-2:]
    x = image[None]
    if tuple(scales) == (1.0,) and not flip:
        return {k: v[0].float() for k, v in run(x).items()}
    sums, n = {}, 0
    for s in scales:
        xs = resize(x, [max(1, round(d * s)) for d in size])
        for mirrored in (False, True) if flip else (False,):
            out = run(xs.flip(-1) if mirrored else xs)
            for key, v in out.items():
                v = v.float().softmax(1) if key == "seg" else v.float()
                v = resize(v.flip(-1) if mirrored else v, size)
                sums[key] = sums.get(key, 0) + v
            n += 1
    return {k: v[0] / n for k, v in sums.items()}


def predict_batch(run: Predictor, batch: dict, scales: Sequence[float] = (1.0,), flip: bool = False) -> dict[str, Tensor]:
    """`predict_image` for every image of a collated batch (data.collate: batch["image"] (B, 3, H, W) padded, each
    image's own size in batch["size"] (B, 2)), laid back on the batch canvas for the metric code: (B, K, H, W)
    scores and (B, 1, H, W) depth; the padding (labels 255, ignored) scores 0 and has depth NaN."""
    image = batch["image"]
    out: dict[str, Tensor] = {}
    for i, (h, w) in enumerate(batch["size"].tolist()):
        for key, v in predict_image(run, image[i, :, :h, :w], scales, flip).items():
            if key not in out:
                out[key] = v.new_full((image.shape[0], v.shape[0], *image.shape[-2:]), 0.0 if key == "seg" else torch.nan)
            out[key][i, :, :h, :w] = v
    return out


def predict_rgb(run: Predictor, image: Tensor, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A uint8 RGB image (3, H, W) as read from a file, normalised like validation images and predicted by
    `predict_image` -> {"seg": (H, W) uint8 class ids, "depth": (1, H, W) float if the model has it}, on the CPU."""
    out = predict_image(run, eval_image(image).to(device))
    result = {"seg": out["seg"].argmax(0).to(torch.uint8).cpu()}
    if "depth" in out:
        result["depth"] = out["depth"].cpu()
    return result


BACKENDS = ("torch", "onnx", "onnx-int8")  # for a folder: model.safetensors, model.onnx, model_int8.onnx


def onnx_file(model: str | Path, backend: str = "torch") -> Path | None:
    """The ONNX file a model argument names: itself when it is a .onnx file, else the backend's file in the folder;
    None for the torch backend."""
    path = Path(model)
    if path.suffix == ".onnx":
        return path
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return None if backend == "torch" else path / (ONNX_INT8_NAME if backend == "onnx-int8" else ONNX_NAME)


def load_config(model: str | Path, backend: str = "torch") -> ModelConfig:
    """The config of what `load_predictor` would load, verified against the folder's manifest: a checkpoint's, or
    for an ONNX file (seg only) the config.json tools/export.py writes beside it."""
    if (path := onnx_file(model, backend)) is None:
        folder = resolve_checkpoint(model)
        check(folder, [CONFIG_NAME])
        return ModelConfig.load(folder / CONFIG_NAME)
    if not (path.parent / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path.parent / CONFIG_NAME}: missing; an ONNX model is read from the folder "
                                "tools/export.py wrote (its config.json names the classes)")
    check(path.parent, [CONFIG_NAME])
    return replace(ModelConfig.load(path.parent / CONFIG_NAME), tasks=("seg",))


def load_predictor(model: str | Path, backend: str = "torch", device: str | torch.device = "cpu",
                   tasks: tuple[str, ...] | None = None) -> tuple[Predictor, ModelConfig]:
    """A checkpoint, run or exported folder (torch) or an exported ONNX file as a Predictor of `tasks` (default:
    every decoder it has), with its config (see load_config); every file verified against the folder's manifest."""
    if (path := onnx_file(model, backend)) is not None:
        if path.is_file():  # else onnx_session says how to make one
            check(path.parent, [path.name])  # before ONNX Runtime reads it
        return onnx_predictor(path, torch.device(device).type), load_config(model, backend)
    net = load_model(model)
    return torch_predictor(for_inference(net, device), tasks), net.config
