"""Datasets: VOC 2012 (+ pseudo depth, instances), the synthetic demo set, presets and transforms."""
from dataclasses import dataclass
from pathlib import Path

from data.transforms import collate, get_transform
from data.voc import DataError, Depth, VOCSegmentation, resolve_voc_root


@dataclass(frozen=True)
class Preset:
    """Defaults a dataset brings; every field is overridable from the command line."""

    data_root: str
    base_size: int  # random rescale is relative to this
    crop_size: int
    batch_size: int
    epochs: int  # per stage when --stage-epochs is not given
    encoder_weights: str
    num_classes: int = 21
    train_split: str = "train"
    val_split: str = "val"


PRESETS = {
    # small and fast: trains end to end in minutes on a laptop CPU, no download
    "synthetic": Preset("datasets/synthetic", base_size=128, crop_size=128, batch_size=8, epochs=2, encoder_weights="none"),
    # torchvision reference sizes (base 520, crop 480); the paper gives no epochs, 30 per stage is our choice
    "voc": Preset("datasets/VOCdevkit/VOC2012", base_size=520, crop_size=480, batch_size=8, epochs=30, encoder_weights="imagenet"),
}


def prepare_root(dataset: str, data_root: str | Path) -> Path:
    """The dataset folder; the synthetic set is generated on first use (an existing one is used as it is)."""
    if dataset == "synthetic" and not (Path(data_root) / "SYNTHETIC.json").is_file():
        from data.synthetic import make_synthetic

        return make_synthetic(data_root)
    return resolve_voc_root(data_root)


__all__ = ["PRESETS", "DataError", "Depth", "Preset", "VOCSegmentation", "collate", "get_transform", "prepare_root"]
