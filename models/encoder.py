"""ResNet encoder from torchvision returning features at strides 2, 4, 8, 16, 32."""
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm

ENCODERS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V2),
}


def load_encoder_weights(resnet: nn.Module, name: str, weights: str) -> None:
    """Load `imagenet` (torchvision's weights API), a local file, or nothing (`none`)."""
    if weights == "none":
        return
    if weights == "imagenet":
        enum = ENCODERS[name][1]
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
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"encoder weights {weights!r} do not fit {name}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its classifier; forward returns 5 feature maps, high to low resolution."""

    def __init__(self, name: str = "resnet50", weights: str = "none"):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
        resnet = ENCODERS[name][0](weights=None)
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
