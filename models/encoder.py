"""torchvision encoders returning features at strides 2, 4, 8, 16, 32: the ResNets, and the edge encoders (MobileNetV3,
EfficientNet, RegNetY) cut into five stages at the last block of each stride."""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm

RESNET_DECODER = (256, 128, 64, 32, 16)  # smp's Unet default
# an edge encoder costs a tenth of a ResNet's multiply-adds or less, and smp's full-width decoder would be most of the
# model (5.3 of 5.3+1.1 GMACs with mobilenet_v3_large at 512 px): four narrower blocks end at stride 2 and the logits
# are upsampled bilinearly (models/decoder.py), 2.8 GMACs in all (tools/encoder_table.py; BENCHMARKS.md)
EDGE_DECODER = (96, 48, 24, 16)


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one torchvision encoder: its model builder, ImageNet weights and default decoder widths."""

    builder: object  # torchvision.models builder, called with weights=None
    weights: tvm.WeightsEnum
    decoder_channels: tuple[int, ...]
    classifier: str  # the state-dict prefix of the ImageNet classifier, never used here
    # tools/export.py's default ONNX parity tolerance (max abs diff / max |logit|): EfficientNet's 16 SiLU + squeeze-
    # excitation blocks drift further in ONNX Runtime's fp32 kernels (5.2e-4 at 512 px, trained efficientnet_b0)
    onnx_tol: float = 1e-4


ENCODERS = {
    "resnet18": EncoderSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, RESNET_DECODER, "fc."),
    "resnet34": EncoderSpec(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, RESNET_DECODER, "fc."),
    "resnet50": EncoderSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, RESNET_DECODER, "fc."),
    "resnet101": EncoderSpec(tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V2, RESNET_DECODER, "fc."),
    "mobilenet_v3_small": EncoderSpec(tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
                                      EDGE_DECODER, "classifier."),
    "mobilenet_v3_large": EncoderSpec(tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
                                      EDGE_DECODER, "classifier."),
    "efficientnet_b0": EncoderSpec(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, EDGE_DECODER,
                                   "classifier.", onnx_tol=1e-3),
    "efficientnet_b2": EncoderSpec(tvm.efficientnet_b2, tvm.EfficientNet_B2_Weights.IMAGENET1K_V1, EDGE_DECODER,
                                   "classifier.", onnx_tol=1e-3),
    "regnet_y_400mf": EncoderSpec(tvm.regnet_y_400mf, tvm.RegNet_Y_400MF_Weights.IMAGENET1K_V2, EDGE_DECODER, "fc."),
    "regnet_y_800mf": EncoderSpec(tvm.regnet_y_800mf, tvm.RegNet_Y_800MF_Weights.IMAGENET1K_V2, EDGE_DECODER, "fc."),
}


def default_decoder_channels(name: str) -> tuple[int, ...]:
    """The decoder widths an encoder gets when --decoder-channels is not given."""
    return spec_of(name).decoder_channels


def spec_of(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")
    return ENCODERS[name]


def load_encoder_weights(model: nn.Module, name: str, weights: str) -> None:
    """Load `imagenet` (torchvision's weights API), a local file (torch.save of the torchvision model's state_dict),
    or nothing (`none`) into the whole torchvision model; its classifier's tensors are not needed."""
    if weights == "none":
        return
    spec = spec_of(name)
    if weights == "imagenet":
        enum = spec.weights
        try:
            state = enum.get_state_dict(progress=True)
        except Exception as exc:  # network or cache failure: tell the user how to supply the file
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise RuntimeError(
                f"Could not download ImageNet weights for {name} ({enum.url}): {exc}.\n"
                f"Either place the file at {cache} (torchvision's cache) or pass "
                f"--encoder-weights /path/to/{Path(enum.url).name}, or train from scratch "
                f"with --encoder-weights none."
            ) from exc
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--encoder-weights {weights}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith(spec.classifier)}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (needs {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and own[k].shape != v.shape]  # another width of the family: same names, other shapes
    missing = [k for k in own if k not in state and not k.startswith(spec.classifier)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or wrong:
        raise ValueError(
            f"encoder weights {weights!r} do not fit {name}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {wrong[:3]}"
        )
    model.load_state_dict(state, strict=False)  # only the classifier, unused, is left out


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its classifier; forward returns 5 feature maps, high to low resolution."""

    def __init__(self, name: str = "resnet50", weights: str = "none"):
        super().__init__()
        resnet = spec_of(name).builder(weights=None)
        load_encoder_weights(resnet, name, weights)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)
        self.layer1 = nn.Sequential(resnet.maxpool, resnet.layer1)
        self.layer2, self.layer3, self.layer4 = resnet.layer2, resnet.layer3, resnet.layer4
        expansion = resnet.layer1[0].expansion
        self.out_channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = self.stem(x)  # (B, 64, H/2, W/2)
        f2 = self.layer1(f1)  # (B, 64|256, H/4, W/4)
        f3 = self.layer2(f2)  # (B, 128|512, H/8, W/8)
        f4 = self.layer3(f3)  # (B, 256|1024, H/16, W/16)
        f5 = self.layer4(f4)  # (B, 512|2048, H/32, W/32)
        return [f1, f2, f3, f4, f5]


def torchvision_blocks(name: str, model: nn.Module) -> list[nn.Module]:
    """The model's own blocks in order, without its classifier. MobileNetV3 / EfficientNet: `features` less its last
    block, the 1x1 expansion (576..1408 channels) that feeds the classifier (timm's and smp's feature encoders stop
    there too); RegNet: the stem and the four trunk stages."""
    if name.startswith("regnet"):
        return [model.stem, *model.trunk_output.children()]
    return list(model.features)[:-1]


class StagedEncoder(nn.Module):
    """A torchvision classification network cut into five stages, each ending at the last block of stride 2, 4, 8,
    16, 32 (found by running a probe image through the blocks); forward returns the five stages' outputs."""

    def __init__(self, name: str, weights: str = "none"):
        super().__init__()
        model = spec_of(name).builder(weights=None)
        load_encoder_weights(model, name, weights)
        blocks = torchvision_blocks(name, model)
        stages: list[list[nn.Module]] = [[] for _ in range(5)]
        channels = [0] * 5
        size = 64
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            was_training = model.training
            model.eval()
            for block in blocks:
                x = block(x)
                level = (size // x.shape[-1]).bit_length() - 2  # stride 2 -> 0 ... 32 -> 4
                if not 0 <= level < 5 or any(stages[lvl] for lvl in range(level + 1, 5)):
                    raise ValueError(f"{name}: a block at stride {size // x.shape[-1]} out of order")
                stages[level].append(block)
                channels[level] = x.shape[1]
            model.train(was_training)
        if not all(stages):
            raise ValueError(f"{name}: no block at stride {2 ** (1 + [bool(s) for s in stages].index(False))}")
        self.stages = nn.ModuleList(nn.Sequential(*s) for s in stages)
        self.out_channels = tuple(channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features  # (B, out_channels[i], H / 2**(i+1), W / 2**(i+1)), i = 0..4


def build_encoder(name: str, weights: str = "none") -> nn.Module:
    """The encoder `name` (a key of ENCODERS), its weights `imagenet` | `none` | a file path."""
    spec_of(name)
    return ResNetEncoder(name, weights) if name.startswith("resnet") else StagedEncoder(name, weights)
