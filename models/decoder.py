"""UNet decoder as segmentation_models_pytorch computes it: upsample to the skip's size, concatenate, two conv-BN-ReLU."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv (no bias, BN follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Nearest upsample to the skip's size (2x, or one pixel less at odd sizes), concatenate it, two conv-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = conv_bn_relu(in_ch + skip_ch, out_ch)
        self.conv2 = conv_bn_relu(out_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(x, size=size, mode="nearest")  # (B, in_ch, *size)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, in_ch + skip_ch, *size)
        return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):
    """One decoder block per entry of decoder_channels, from stride 32 back up; channels derived from the encoder.
    Five blocks (smp's Unet) end at full resolution, the last one without a skip; four end at stride 2 (the model
    then upsamples the head's output bilinearly, as LRASPP and DeepLab upsample theirs), and so on."""

    def __init__(self, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...]):
        super().__init__()
        if not 1 <= len(decoder_channels) <= len(encoder_channels):
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} entries, the encoder gives "
                f"{len(encoder_channels)} feature maps; give 1 to {len(encoder_channels)} (one block each)"
            )
        # deepest feature first; a fifth block has no skip (it returns to full resolution)
        skips = (list(reversed(encoder_channels[:-1])) + [0])[:len(decoder_channels)]
        ins = [encoder_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(DecoderBlock(*c) for c in zip(ins, skips, decoder_channels))
        self.out_channels = decoder_channels[-1]

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        x = features[-1]
        skips = list(reversed(features[:-1])) + [None]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip, skip.shape[-2:] if skip is not None else size)
        return x  # (B, decoder_channels[-1], H, W), or the last skip's size with fewer than five blocks
