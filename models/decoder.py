"""UNet decoder in the style of segmentation_models_pytorch: upsample, concatenate skip, two conv-BN-ReLU."""
from contextlib import contextmanager

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


def upsampled_kernel(weight: Tensor) -> Tensor:
    """The stride-2 4x4 transposed-convolution kernel equal to a 3x3 convolution (padding 1) of a nearest 2x upsample.

    Along each axis, output row 2m sees input rows (m-1, m) with taps (w0, w1 + w2) and row 2m+1 sees (m, m+1)
    with (w0 + w1, w2); in conv_transpose2d's layout (stride 2, padding 1) that is the kernel
    (w2, w1 + w2, w0 + w1, w0). (out, in, 3, 3) -> (in, out, 4, 4).
    """
    def taps(w0: Tensor, w1: Tensor, w2: Tensor) -> list[Tensor]:  # unbind: its backward is one stack, not 3 copies
        return [w2, w1 + w2, w0 + w1, w0]

    w = torch.stack(taps(*weight.unbind(-2)), dim=-2)
    w = torch.stack(taps(*w.unbind(-1)), dim=-1)
    return w.transpose(0, 1)


class DecoderBlock(nn.Module):
    """Upsample 2x, concatenate the skip, two conv-BN-ReLU (smp's Unet block), for any input size.

    The first convolution is computed by parts, conv3x3(cat(up(x), skip)) = conv3x3(up(x)) + conv3x3(skip): the same
    function and parameters without the concatenated tensor (3-5% faster for the first block on the CPU). At odd
    sizes the skip is one pixel short of the 2x grid: the block is smp's on the 2x grid with the skip zero-extended,
    cropped to the skip's size, so every pixel keeps the encoder's alignment (decoder pixel 2m+a comes from x's m).

    With `fold_upsample` the nearest 2x upsample is folded into that convolution: conv3x3(up(x)) equals a stride-2
    4x4 transposed convolution of x (`upsampled_kernel`), with 16/36 of the multiply-adds and no upsampled tensor.
    On the CPU it makes the blocks at stride 16 and finer 1.2-2x faster (BENCHMARKS.md); the first block's kernel
    (2048 x 256 for ResNet-50) is large for its few pixels, and rebuilding it every step costs more than it saves,
    so UnetDecoder leaves that one unfolded.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, fold_upsample: bool = False):
        super().__init__()
        self.in_ch = in_ch
        self.fold_upsample = fold_upsample
        self.conv1 = conv_bn_relu(in_ch + skip_ch, out_ch)
        self.conv2 = conv_bn_relu(out_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        conv, bn, relu = self.conv1
        w_up, w_skip = conv.weight.split([self.in_ch, conv.in_channels - self.in_ch], dim=1)  # backward: one cat
        if self.fold_upsample:
            y = F.conv_transpose2d(x, upsampled_kernel(w_up), stride=2, padding=1)
        else:
            y = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w_up, padding=1)
        y = crop(y, size)
        if skip is not None:
            y = y + F.conv2d(skip, w_skip, padding=1)
        return self.conv2(relu(bn(y)))


def crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Top-left crop (narrow, not slicing: exported graphs then know that the output is exactly `size`). Eagerly, a
    tensor already of that size is returned as it is: narrow's backward would copy its gradient into a new tensor.
    A traced or exported graph always crops, so that it holds for every input size."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or tuple(x.shape[-2:]) != tuple(size):
        return x.narrow(-2, 0, size[0]).narrow(-1, 0, size[1])
    return x


class UnetDecoder(nn.Module):
    """Five decoder blocks from stride 32 back to stride 1; channels derived from the encoder; all but the
    first fold their upsample into their first convolution (see DecoderBlock)."""

    def __init__(self, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...]):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} entries, the encoder gives "
                f"{len(encoder_channels)} feature maps; they must match"
            )
        # deepest feature first; the last block has no skip (it returns to full resolution)
        skips = list(reversed(encoder_channels[:-1])) + [0]
        ins = [encoder_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, fold_upsample=k > 0) for k, (i, s, o) in enumerate(zip(ins, skips, decoder_channels))
        )
        self.out_channels = decoder_channels[-1]

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        x = features[-1]
        skips = list(reversed(features[:-1])) + [None]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip, skip.shape[-2:] if skip is not None else size)
        return x  # (B, decoder_channels[-1], H, W)


@contextmanager
def unfolded(model: nn.Module):
    """Inside, no DecoderBlock of `model` folds: each upsamples and runs the 3x3 convolution as smp's Unet does (the
    same function and FLOPs). models.deploy.forward_flops counts the network's FLOPs this way."""
    blocks = [m for m in model.modules() if isinstance(m, DecoderBlock)]
    saved = [b.fold_upsample for b in blocks]
    try:
        for b in blocks:
            b.fold_upsample = False
        yield model
    finally:
        for b, fold in zip(blocks, saved):
            b.fold_upsample = fold
