"""The peer: segmentation_models_pytorch's Unet trained in the loop a user writes (autocast, focal loss from cross
entropy, PyTorch's default Adam), and the both stage built from smp (a second smp decoder and a one-channel head)."""
import copy

import torch
import torch.nn.functional as F

from models import depth_loss
from benchmarks.timing import NUM_CLASSES


class SmpWithDepth(torch.nn.Module):
    """The both stage built from smp: its Unet plus a second smp decoder and a one-channel head on the same encoder."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.depth_decoder = copy.deepcopy(unet.decoder)
        self.depth_head = torch.nn.Conv2d(unet.segmentation_head[0].in_channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.unet.encoder(x)
        return self.unet.segmentation_head(self.unet.decoder(features)), self.depth_head(self.depth_decoder(features))


def smp_model(encoder: str, task: str, layout: str, compile: bool, device: torch.device):
    """smp.Unet with smp's default decoder (256..16, nearest upsampling), as a user would build it (task "both": with
    a second decoder for depth), and PyTorch's default Adam over it."""
    import segmentation_models_pytorch as smp

    model = smp.Unet(encoder, encoder_weights=None, classes=NUM_CLASSES)
    model = (SmpWithDepth(model) if task == "both" else model).to(device).train()
    if layout == "CL":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # as a user writes it: PyTorch's default Adam
    return (torch.compile(model) if compile else model), optimizer


def peer_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Softmax focal loss as it is usually written, from cross entropy (equal to models.FocalLoss)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=255, reduction="none")
    valid = target != 255
    return ((1 - torch.exp(-ce)) ** gamma * ce).sum() / valid.sum().clamp(min=1)


def smp_step(model, optimizer, batch: dict, device: torch.device, bf16: bool) -> torch.Tensor:
    """A user's own loop: autocast forward, focal loss (+ masked depth MSE, models.depth_loss), backward, Adam."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["image"])
    if isinstance(out, tuple):
        logits, depth = out
        loss = 0.85 * peer_focal_loss(logits, batch["label"]) + 0.15 * depth_loss(depth, batch["depth"])
    else:
        loss = peer_focal_loss(out, batch["label"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
