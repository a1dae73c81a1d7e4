"""Colour images of labels and depth for TensorBoard, predict.py and evaluate.py.

`palette` arguments are one RGB colour per class (a Preset's or ModelConfig.colours()); None = VOC's. Label values
past the palette keep VOC's colours, 255 (ignore) its boundary colour.
"""
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

from data.synthetic import VOC_PALETTE
from data.transforms import IMAGENET_MEAN, IMAGENET_STD

PALETTE = torch.tensor(VOC_PALETTE, dtype=torch.uint8).view(-1, 3)  # (256, 3), 255 = boundary colour
IMAGES_LOGGED = 4  # samples of the first validation batch shown in TensorBoard
OVERLAY_ALPHA = 0.5  # class colour over the photo (predict.py --alpha's default, evaluate.py's worst images)
TITLE_HEIGHT = 14  # pixels of the white strip above a panel that names it (fits the default 10 px font)
PREVIEW_HEIGHT = 160  # pixels of a pseudo depth preview panel (tools/make_depth.py --preview)

Palette = Sequence[Sequence[int]]  # (K, 3) RGB 0..255, one per class


def palette_table(palette: Palette | None = None) -> Tensor:
    """(256, 3) uint8 colour of every label value: the palette's for 0..K-1, VOC's elsewhere (255 = boundary)."""
    if palette is None or len(palette) == 0:
        return PALETTE
    if len(palette) > 255:
        raise ValueError(f"a palette has at most 255 colours (255 is ignore), got {len(palette)}")
    table = PALETTE.clone()
    table[: len(palette)] = torch.tensor([tuple(c) for c in palette], dtype=torch.uint8).view(-1, 3)
    return table


def colorize_label(label: Tensor, palette: Palette | None = None) -> Tensor:
    """(H, W) class ids -> (3, H, W) uint8 in the palette's colours (None: VOC's)."""
    return palette_table(palette)[label.long().clamp(0, 255).cpu()].permute(2, 0, 1)


def overlay(image: Tensor, label: Tensor, palette: Palette | None = None, alpha: float = OVERLAY_ALPHA) -> Tensor:
    """(3, H, W) uint8 photo with the class colours of `label` (H, W) blended over its non-background pixels; class 0
    (background) keeps the photo."""
    mixed = (1 - alpha) * image.float() + alpha * colorize_label(label, palette).float()
    return torch.where((label.cpu() != 0)[None], mixed, image.float()).round().to(torch.uint8)


def colorize_depth(depth: Tensor) -> Tensor:
    """(1, H, W) inverse depth (near = high) -> (3, H, W) uint8; NaN (invalid) is black."""
    d = depth.float().cpu()[0]
    valid = torch.isfinite(d)
    lo, hi = (d[valid].min(), d[valid].max()) if valid.any() else (0.0, 1.0)
    t = torch.where(valid, (d - lo) / max(float(hi - lo), 1e-8), 0.0)
    # a warm ramp (black -> red -> yellow -> white) without a plotting dependency
    rgb = torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)])
    return (rgb * 255 * valid).to(torch.uint8)


def titled(panel: Tensor, title: str) -> Tensor:
    """(3, H, W) uint8 -> (3, TITLE_HEIGHT + H, W): the panel under a white strip with its title."""
    strip = Image.new("RGB", (panel.shape[2], TITLE_HEIGHT), "white")
    ImageDraw.Draw(strip).text((2, TITLE_HEIGHT // 2), title, fill="black", font=ImageFont.load_default(), anchor="lm")
    return torch.cat([pil_to_tensor(strip), panel.cpu()], dim=1)


def denormalize(image: Tensor) -> Tensor:
    """Normalised (3, H, W) float -> uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.float().cpu() * std + mean).clamp(0, 1) * 255).to(torch.uint8)


def to_palette_png(label: Tensor | np.ndarray, palette: Palette | None = None):
    """(H, W) class ids -> a PIL palette ('P') image in the palette's colours (None: VOC's), as VOC stores labels."""
    arr = label.cpu().numpy() if isinstance(label, Tensor) else label
    img = Image.fromarray(arr.astype(np.uint8))
    img.putpalette(palette_table(palette).flatten().tolist())  # grey -> palette image, indices kept
    return img


def log_images(accelerator, batch: dict, outputs: dict, step: int, palette: Palette | None = None) -> None:
    """TensorBoard rows of titled panels: input | label | prediction | pseudo depth | predicted depth (labels in the
    palette's colours, None: VOC's)."""
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    n = min(IMAGES_LOGGED, batch["image"].shape[0])
    for i in range(n):
        row = {"input": denormalize(batch["image"][i]), "label": colorize_label(batch["label"][i], palette),
               "prediction": colorize_label(outputs["seg"][i].argmax(0), palette)}
        if "depth" in batch:
            row["pseudo depth"] = colorize_depth(batch["depth"][i])
        if "depth" in outputs:
            row["predicted depth"] = colorize_depth(outputs["depth"][i])
        panels = [titled(panel, title) for title, panel in row.items()]  # (3, TITLE_HEIGHT + H, W) each
        writer.add_image(f"val/{i}_input|label|pred|depth|pred_depth", torch.cat(panels, dim=2), step)
