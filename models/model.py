"""Shared encoder + one UNet decoder and head per task; forward runs only the tasks asked for."""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from data.voc import VOC_CLASSES, voc_colour
from models.decoder import UnetDecoder
from models.encoder import build_encoder, default_decoder_channels

TASK_CHANNELS = {"seg": None, "depth": 1}  # seg channels come from num_classes


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model; saved as config.json next to its weights."""

    encoder: str = "resnet50"
    tasks: tuple[str, ...] = ("seg", "depth")
    num_classes: int = 21
    decoder_channels: tuple[int, ...] | None = None  # None: the encoder's default (models.encoder.ENCODERS)
    # the label set a checkpoint or export carries, one entry per class; None = VOC's (names(), colours())
    class_names: tuple[str, ...] | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None  # RGB 0..255

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASK_CHANNELS)
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {sorted(TASK_CHANNELS)}, got {self.tasks}")
        # json round-trips tuples as lists; keep the dataclass hashable and comparable
        object.__setattr__(self, "tasks", tuple(self.tasks))
        widths = default_decoder_channels(self.encoder) if self.decoder_channels is None else self.decoder_channels
        object.__setattr__(self, "decoder_channels", tuple(widths))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        if self.palette is not None:
            object.__setattr__(self, "palette", tuple(tuple(int(v) for v in c) for c in self.palette))
            if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.palette):
                raise ValueError(f"palette entries must be RGB triples 0..255, got {self.palette}")
        for what in ("class_names", "palette"):
            given = getattr(self, what)
            if given is not None and len(given) != self.num_classes:
                raise ValueError(f"{what} has {len(given)} entries, num_classes is {self.num_classes}")
        # VOC's own label set is stored as None, so a config that spells it out equals one from before these fields
        # (a resume compares configs) and config.json stays as it was
        if self.class_names == self.default_names():
            object.__setattr__(self, "class_names", None)
        if self.palette == self.default_colours():
            object.__setattr__(self, "palette", None)

    def default_names(self) -> tuple[str, ...]:
        """VOC's names for 21 classes, else the label values."""
        return VOC_CLASSES if self.num_classes == len(VOC_CLASSES) else tuple(str(c) for c in range(self.num_classes))

    def default_colours(self) -> tuple[tuple[int, int, int], ...]:
        """VOC's colour of each label value."""
        return tuple(voc_colour(c) for c in range(self.num_classes))

    def names(self) -> tuple[str, ...]:
        """One name per class: the label set's, else default_names()."""
        return self.class_names if self.class_names is not None else self.default_names()

    def colours(self) -> tuple[tuple[int, int, int], ...]:
        """One RGB colour per class: the label set's, else VOC's."""
        return self.palette if self.palette is not None else self.default_colours()

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
        self.encoder = build_encoder(config.encoder, encoder_weights)
        self.decoders = nn.ModuleDict(
            {t: UnetDecoder(self.encoder.out_channels, config.decoder_channels) for t in config.tasks}
        )
        out = {t: TASK_CHANNELS[t] or config.num_classes for t in config.tasks}
        self.heads = nn.ModuleDict(
            {t: nn.Conv2d(config.decoder_channels[-1], out[t], 3, padding=1) for t in config.tasks}
        )
        self.upsample_logits = len(config.decoder_channels) < len(self.encoder.out_channels)
        self.frozen: set[str] = set()  # module names kept in eval mode with no gradient

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.decoders.keys())

    def forward(self, x: Tensor, tasks: tuple[str, ...] | None = None) -> dict[str, Tensor]:
        features = self.encoder(x)
        size = x.shape[-2:]
        out = {t: self.heads[t](self.decoders[t](features, size)) for t in (tasks or self.tasks)}
        if self.upsample_logits:  # fewer than five decoder blocks: the heads ran below full resolution
            out = {t: F.interpolate(y, size=size, mode="bilinear", align_corners=False) for t, y in out.items()}
        return out

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
