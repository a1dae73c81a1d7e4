"""Datasets: VOC 2012 (+ pseudo depth, instances), the synthetic demo set, presets and transforms."""
import argparse
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
    encoder: str = "resnet50"  # the paper's
    lr: float = 1e-4  # the paper's Adam learning rate
    lr_schedule: str = "constant"  # the paper's: no decay mentioned
    warmup: float = 0.0
    num_classes: int = 21
    train_split: str = "train"
    val_split: str = "val"

    def fill(self, args: argparse.Namespace) -> argparse.Namespace:
        """A copy of train.py's args with every flag left at None set to this preset's value (args is unchanged)."""
        filled = {k: getattr(self, k) for k in FROM_PRESET if getattr(args, k, None) is None}
        return argparse.Namespace(**{**vars(args), **filled})


# train.py flags whose default (None) means "the dataset preset's"
FROM_PRESET = ("data_root", "encoder", "encoder_weights", "batch_size", "crop_size", "base_size", "lr", "lr_schedule",
               "warmup")


PRESETS = {
    # from scratch in minutes on a 2-core CPU (README: the default run's metrics): a small encoder, 96 px, and the
    # higher lr with warmup and cosine decay that from-scratch training wants (docs/results.md: what 1e-4 gives)
    "synthetic": Preset("datasets/synthetic", base_size=96, crop_size=96, batch_size=16, epochs=3, encoder_weights="none",
                        encoder="resnet18", lr=1e-3, lr_schedule="cosine", warmup=0.05),
    # torchvision reference sizes (base 520, crop 480); the paper gives no epochs, 30 per stage is our choice
    "voc": Preset("datasets/VOCdevkit/VOC2012", base_size=520, crop_size=480, batch_size=8, epochs=30, encoder_weights="imagenet"),
}


def prepare_root(dataset: str, data_root: str | Path) -> Path:
    """The dataset folder; the synthetic set is generated on first use (one of an older generator: again)."""
    if dataset == "synthetic":
        from data.synthetic import make_synthetic, regenerate_if_old

        if not (Path(data_root) / "SYNTHETIC.json").is_file():
            return make_synthetic(data_root)
        if regenerate_if_old(data_root):
            print(f"{data_root}: made by an older synthetic generator; regenerated with the same parameters")
    return resolve_voc_root(data_root)


__all__ = ["PRESETS", "DataError", "Depth", "Preset", "VOCSegmentation", "collate", "get_transform", "prepare_root"]
