"""Shared encoder + one UNet decoder and head per task; forward runs only the tasks asked for."""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor, nn

from models.decoder import UnetDecoder
from models.encoder import ResNetEncoder

TASK_CHANNELS = {"seg": None, "depth": 1}  # seg channels come from num_classes


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model; saved as config.json next to its weights."""

    encoder: str = "resnet50"
    tasks: tuple[str, ...] = ("seg", "depth")
    num_classes: int = 21
    decoder_channels: tuple[int, ...] = field(default=(256, 128, 64, 32, 16))

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASK_CHANNELS)
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {sorted(TASK_CHANNELS)}, got {self.tasks}")
        # json round-trips tuples as lists; keep the dataclass hashable and comparable
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))

    def save(self, path: Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        """Read from JSON, naming the file on failure."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid model config ({exc})") from exc


class MultiDecoderModel(nn.Module):
    """Encoder -> {task: decoder -> head}. With tasks=("seg",) it is the single-decoder model."""

    def __init__(self, config: ModelConfig, encoder_weights: str = "none"):
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config.encoder, encoder_weights)
        self.decoders = nn.ModuleDict(
            {t: UnetDecoder(self.encoder.out_channels, config.decoder_channels) for t in config.tasks}
        )
        out = {t: TASK_CHANNELS[t] or config.num_classes for t in config.tasks}
        self.heads = nn.ModuleDict(
            {t: nn.Conv2d(config.decoder_channels[-1], out[t], 3, padding=1) for t in config.tasks}
        )
        self.frozen: set[str] = set()  # module names kept in eval mode with no gradient

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.decoders.keys())

    def forward(self, x: Tensor, tasks: tuple[str, ...] | None = None) -> dict[str, Tensor]:
        features = self.encoder(x)
        size = x.shape[-2:]
        return {t: self.heads[t](self.decoders[t](features, size)) for t in (tasks or self.tasks)}

    def set_trainable(self, tasks: tuple[str, ...], encoder: bool = True) -> None:
        """Train only the given tasks' decoders and heads (and the encoder if asked); freeze the rest."""
        unknown = set(tasks) - set(self.tasks)
        if unknown:
            raise ValueError(f"model has no decoder for {sorted(unknown)} (it has {self.tasks})")
        self.frozen = {f"decoders.{t}" for t in self.tasks if t not in tasks}
        self.frozen |= {f"heads.{t}" for t in self.tasks if t not in tasks}
        if not encoder:
            self.frozen.add("encoder")
        for name, p in self.named_parameters():
            p.requires_grad_(not self._is_frozen(name))
        self.train(self.training)

    def _is_frozen(self, name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in self.frozen)

    def train(self, mode: bool = True) -> "MultiDecoderModel":
        """Like nn.Module.train, but frozen parts keep BatchNorm in eval mode (running stats untouched)."""
        super().train(mode)
        for name, module in self.named_modules():
            if name and self._is_frozen(name):
                module.eval()
        return self

    def copy_decoder(self, src: str, dst: str) -> list[str]:
        """Copy every decoder tensor (weights and BN buffers) from src to dst; heads differ in shape."""
        source = self.decoders[src].state_dict()
        self.decoders[dst].load_state_dict(source)
        return [f"decoders.{src}.{k} -> decoders.{dst}.{k}" for k in source]


def build_model(config: ModelConfig, encoder_weights: str = "none") -> MultiDecoderModel:
    """Build the model of `config`; `encoder_weights` is imagenet | none | a file path."""
    return MultiDecoderModel(config, encoder_weights)
