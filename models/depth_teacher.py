"""The depth model that makes pseudo depth (tools/make_depth.py): a DINOv2 depth model from transformers
(AutoModelForDepthEstimation, never with remote code), what it predicts natively, and its prediction converted to the
stored convention: per-image min-max normalised inverse depth, 0..65535, 65535 = nearest."""
import numpy as np
import torch

MAX_VALUE = 65535  # 16-bit PNG
METRIC_EPS = 1e-3  # metres; guards 1/d against zeros and bicubic undershoot
FLAT_RTOL = 1e-6  # a prediction whose range is below this (relative) is constant
# Native output of model families whose config does not say it (DPT is checked apart).
NATIVE_BY_MODEL_TYPE = {"zoedepth": "metric", "depth_pro": "metric", "glpn": "metric"}


def load_model(name: str, revision: str | None):
    """Depth model and its image processor (hub id or save_pretrained folder; no remote code)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        model = AutoModelForDepthEstimation.from_pretrained(name, revision=revision)
        processor = AutoImageProcessor.from_pretrained(name, revision=revision)
    except OSError as e:
        raise OSError(
            f"cannot load depth model '{name}': {e}\nWithout network, download it once elsewhere "
            f"(`hf download {name}`) and copy the cache, or pass --model a save_pretrained folder"
        ) from e
    return model.eval(), processor


def native_kind(config, override: str = "auto") -> str:
    """'metric' or 'disparity': what the model predicts, from its config unless overridden."""
    if override != "auto":
        return override
    if config.model_type in ("depth_anything", "prompt_depth_anything"):
        return "metric" if getattr(config, "depth_estimation_type", "relative") == "metric" else "disparity"
    if config.model_type == "dpt":
        # DINOv2 DPT heads (NYU, KITTI) regress metres; ViT/BEiT DPT (MiDaS) predict relative disparity.
        backbone = getattr(config, "backbone_config", None)
        return "metric" if getattr(backbone, "model_type", None) == "dinov2" else "disparity"
    if config.model_type in NATIVE_BY_MODEL_TYPE:
        return NATIVE_BY_MODEL_TYPE[config.model_type]
    raise ValueError(f"unknown native output of model type '{config.model_type}': pass --native metric|disparity")


def to_stored(pred: torch.Tensor, native: str) -> np.ndarray:
    """(H, W) raw prediction -> uint16 inverse depth, per-image min-max, 65535 = nearest."""
    pred = pred.float()
    if not torch.isfinite(pred).all():
        raise FloatingPointError("non-finite depth prediction (try without --fp16)")
    inv = 1.0 / pred.clamp_min(METRIC_EPS) if native == "metric" else pred
    lo, hi = inv.min(), inv.max()
    if hi - lo <= FLAT_RTOL * max(hi.abs().item(), lo.abs().item(), 1.0):
        return np.zeros(pred.shape, dtype=np.uint16)
    inv = (inv - lo) / (hi - lo)
    return (inv * MAX_VALUE).round().to(torch.int32).cpu().numpy().astype(np.uint16)
