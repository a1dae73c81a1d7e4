"""UNet decoder in the style of segmentation_models_pytorch: upsample, concatenate skip, two conv-BN-ReLU.

Read top to bottom: the block and the decoder as smp computes them, then (section "Folds", below) an optional
optimisation that computes the block's upsample + first convolution without the upsampled tensor: the same function
and the same parameters. Whether a device uses it is decided in models/speed.py.
"""
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


class DecoderBlock(nn.Module):
    """Upsample 2x, concatenate the skip, two conv-BN-ReLU (smp's Unet block), for any input size.

    The first convolution is computed by parts, conv3x3(cat(up(x), skip)) = conv3x3(up(x)) + conv3x3(skip): the same
    function and parameters (`conv1`'s weight split by input channels) without the concatenated tensor (3-5% faster
    for the first block on the CPU). At odd sizes the skip is one pixel short of the 2x grid: the block is smp's on
    the 2x grid with the skip zero-extended, cropped to the skip's size, so every pixel keeps the encoder's alignment
    (decoder pixel 2m+a comes from x's m).

    `fold` says how conv3x3(up(x)) is computed: None, upsample then convolve, as smp does; "transposed" or "products",
    folded into one operation on x itself (section "Folds" below; `upsample_conv`). `preferred_fold` is the fold this
    block uses when folds are on: models.speed.apply_folds switches between it and None.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, fold: str | None = None):
        super().__init__()
        if fold not in FOLDS:
            raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")
        self.in_ch = in_ch
        self.fold = self.preferred_fold = fold
        self.conv1 = conv_bn_relu(in_ch + skip_ch, out_ch)
        self.conv2 = conv_bn_relu(out_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        conv, bn, relu = self.conv1
        w_up, w_skip = conv.weight.split([self.in_ch, conv.in_channels - self.in_ch], dim=1)  # backward: one cat
        y = crop(upsample_conv(x, w_up, self.fold), size)  # conv3x3(up(x)): (B, out_ch, 2h, 2w) cropped to `size`
        if skip is not None:
            y = y + F.conv2d(skip, w_skip, padding=1)  # + conv3x3(skip) = conv3x3(cat(up(x), skip))
        return self.conv2(relu(bn(y)))


def crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Top-left crop (narrow, not slicing: exported graphs then know that the output is exactly `size`). Eagerly, a
    tensor already of that size is returned as it is: narrow's backward would copy its gradient into a new tensor.
    A traced or exported graph always crops, so that it holds for every input size."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or tuple(x.shape[-2:]) != tuple(size):
        return x.narrow(-2, 0, size[0]).narrow(-1, 0, size[1])
    return x


class UnetDecoder(nn.Module):
    """Five decoder blocks from stride 32 back to stride 1; channels derived from the encoder. Each block's preferred
    fold (see DecoderBlock; on where models.speed.use_folds says so): the first by tap products, the others
    transposed; built with the folds on."""

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
        folds = ["products"] + ["transposed"] * (len(ins) - 1)
        self.blocks = nn.ModuleList(DecoderBlock(*c, fold=f) for *c, f in zip(ins, skips, decoder_channels, folds))
        self.out_channels = decoder_channels[-1]

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        x = features[-1]
        skips = list(reversed(features[:-1])) + [None]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip, skip.shape[-2:] if skip is not None else size)
        return x  # (B, decoder_channels[-1], H, W)


# ------------------------------------------------------------------------------------------------------------ Folds
# An optimisation, not a different model. conv3x3(up(x)) (nearest 2x upsample, padding 1) is computed from x itself,
# with no upsampled tensor and fewer multiply-adds; same function, same parameters (checkpoints, copy_decoder and
# exports are the plain block's), outputs and gradients equal to float rounding (tests/test_models.py):
# - "transposed": a stride-2 4x4 transposed convolution (`upsampled_kernel`), 16/36 of the multiply-adds, fastest on
#   the CPU with few channels on a large grid (blocks 2-5);
# - "products": one matmul giving the 9 tap products of every input pixel, summed per output phase (`product_conv`),
#   9/36 of the multiply-adds, fastest on the CPU for many channels on a small grid (the first block: 2048 -> 256
#   channels at stride 32), where the plain and transposed forms are slower.
# Measured on a CPU only (BENCHMARKS.md, "The folded decoder"); models/speed.py turns them on per device.

FOLDS = (None, "transposed", "products")


def upsample_conv(x: Tensor, weight: Tensor, fold: str | None = None) -> Tensor:
    """conv3x3(nearest 2x upsample of x), padding 1, no bias: the plain way (fold None) or by a fold, same result.
    (B, in, h, w) -> (B, out, 2h, 2w)."""
    if fold == "transposed":
        return F.conv_transpose2d(x, upsampled_kernel(weight), stride=2, padding=1)
    if fold == "products":
        return product_conv(x, weight)
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, padding=1)


def phase_taps(w0: Tensor, w1: Tensor, w2: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Along one axis, output row 2m + a of a 3x3 convolution (padding 1) of a nearest 2x upsample sees input rows
    m - 1 + a and m + a only: with taps (w0, w1 + w2) for a = 0 and (w0 + w1, w2) for a = 1. The transposed fold
    builds its kernel from this rule; the product fold sums its tap products by it (`tap_offset`)."""
    return (w0, w1 + w2), (w0 + w1, w2)


def upsampled_kernel(weight: Tensor) -> Tensor:
    """The stride-2 4x4 transposed-convolution kernel equal to a 3x3 convolution (padding 1) of a nearest 2x upsample:
    per axis, the phase taps (`phase_taps`) in conv_transpose2d's order (stride 2, padding 1), (w2, w1 + w2, w0 + w1,
    w0). (out, in, 3, 3) -> (in, out, 4, 4).
    """
    def taps(*w: Tensor) -> list[Tensor]:  # from unbind: its backward is one stack, not 3 copies
        (a0, b0), (a1, b1) = phase_taps(*w)
        return [b1, b0, a1, a0]

    w = torch.stack(taps(*weight.unbind(-2)), dim=-2)
    w = torch.stack(taps(*w.unbind(-1)), dim=-1)
    return w.transpose(0, 1)


def tap_offset(a: int, s: int) -> int:
    """Along one axis, tap s of a 3x3 convolution (padding 1) of a nearest 2x upsample, at output row 2m + a, reads
    input row m + tap_offset(a, s) - 1: (0, 1, 1) for a = 0 and (1, 1, 2) for a = 1, the rows of `phase_taps`."""
    return (a + s + 1) // 2


def product_conv(x: Tensor, weight: Tensor) -> Tensor:
    """conv3x3(nearest 2x upsample of x) from the tap products W[:, :, s, t] @ x(i, j), each computed once per input
    pixel by one matmul with 9 x out rows (9/36 of the plain multiply-adds: each product serves 4 output pixels),
    then summed per output phase (a, b) from the products shifted by `tap_offset`. Fastest for many channels on a
    small grid (the first block: 2048 -> 256 channels at stride 32), where the sums are cheap next to the products
    (made by a 1x1 convolution instead of the matmul, the whole fold is 1.07-1.43x slower).

    A bf16 matmul's products are summed in float32 (as a convolution sums its own), the result cast back. The
    products and sums are contiguous whatever x's layout (flatten and slices only: an exported graph holds for every
    input size); a channels_last weight (training) gives a channels_last result.
    """
    B, cin, h, w = x.shape
    out = weight.shape[0]
    taps = weight.permute(0, 2, 3, 1).reshape(out * 9, cin)  # rows (o, s, t): a view of a channels_last weight
    p = torch.matmul(taps, x.flatten(2)).unflatten(2, (h, w))  # (B, (o, s, t), h, w)
    dtype = p.dtype
    p = F.pad(p.to(torch.promote_types(dtype, torch.float32)), (1, 1, 1, 1))  # the padded upsample's zero border
    p = p.unflatten(1, (out, 3, 3))  # (B, out, s, t, h + 2, w + 2)
    phases = []
    for a in (0, 1):
        rows = sum(p[:, :, s].narrow(-2, tap_offset(a, s), h) for s in range(3))  # (B, out, t, h, w + 2)
        cols = [sum(rows[:, :, t].narrow(-1, tap_offset(b, t), w) for t in range(3)) for b in (0, 1)]
        phases.append(torch.stack(cols, -1))  # (B, out, h, w, b)
    z = torch.stack(phases, 3).reshape(B, out, 2 * h, 2 * w).to(dtype)  # pixel (2m + a, 2n + b) of phase (a, b)
    return z.contiguous(memory_format=torch.channels_last) if weight.stride(1) == 1 else z


@contextmanager
def unfolded(model: nn.Module):
    """Inside, no DecoderBlock of `model` folds: each upsamples and runs the 3x3 convolution as smp's Unet does (the
    same function and FLOPs); on leaving, each block's fold is what it was. models.deploy.forward_flops counts the
    network's FLOPs this way."""
    blocks = [m for m in model.modules() if isinstance(m, DecoderBlock)]
    saved = [b.fold for b in blocks]
    try:
        for b in blocks:
            b.fold = None
        yield model
    finally:
        for b, fold in zip(blocks, saved):
            b.fold = fold
