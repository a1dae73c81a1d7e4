"""Joint transforms that keep image, label, instances and depth pixel-aligned (torchvision v2 + tv_tensors)."""
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from data.voc import IGNORE_INDEX, Depth

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# labels and instances pad with "ignore", depth with NaN (= invalid), images with 0
FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX, Depth: float("nan")}
SCALE_RANGE = (0.5, 2.0)  # random rescale of the base size, as torchvision's reference does
SIZE_DIVISOR = 32  # the encoder's output stride: batches are padded to a multiple of it


def normalize() -> list:
    """uint8 image -> float, ImageNet statistics (masks untouched)."""
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def get_transform(train: bool, base_size: int, crop_size: int) -> v2.Compose:
    """Train: random scale, crop (padding labels 255, depth invalid), flip. Eval: original resolution."""
    if not train:
        return v2.Compose(normalize())
    lo, hi = (int(s * base_size) for s in SCALE_RANGE)
    return v2.Compose(
        [
            v2.RandomResize(lo, hi),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill=FILL),
            v2.RandomHorizontalFlip(),
            *normalize(),
        ]
    )


EVAL_TRANSFORM = get_transform(train=False, base_size=0, crop_size=0)  # sizes are unused at evaluation


def eval_image(image: torch.Tensor) -> torch.Tensor:
    """A decoded uint8 image (3, H, W) as the validation transform gives it to the model: float, ImageNet statistics."""
    return EVAL_TRANSFORM(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def pad_to(t: torch.Tensor, h: int, w: int, value: float) -> torch.Tensor:
    """Pad the last two dims on the bottom/right."""
    return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value)


def collate(batch: list[dict]) -> dict:
    """Stack samples of different sizes by padding to a common multiple of SIZE_DIVISOR (bottom/right); "size" (B, 2)
    holds each sample's own (h, w), where evaluation/inference.py crops it back to."""
    h = max(s["image"].shape[-2] for s in batch)
    w = max(s["image"].shape[-1] for s in batch)
    h, w = (-(-h // SIZE_DIVISOR) * SIZE_DIVISOR, -(-w // SIZE_DIVISOR) * SIZE_DIVISOR)
    out = {"id": [s["id"] for s in batch], "size": torch.tensor([tuple(s["image"].shape[-2:]) for s in batch])}
    out["image"] = torch.stack([pad_to(s["image"].as_subclass(torch.Tensor), h, w, 0.0) for s in batch])
    for key in ("label", "instances"):
        if key in batch[0]:
            out[key] = torch.stack([pad_to(s[key].as_subclass(torch.Tensor).long(), h, w, IGNORE_INDEX) for s in batch])
    if "depth" in batch[0]:
        out["depth"] = torch.stack([pad_to(s["depth"].as_subclass(torch.Tensor), h, w, float("nan")) for s in batch])
    return out
