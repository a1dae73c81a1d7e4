"""Scoring a Predictor on a dataset split: the split read at original resolution (get_dataset), every sample counted
once across processes (evaluate), and the same in one process without a launcher (score). tools/evaluate.py reports
with it, tools/export.py --int8 scores the exported ONNX files with it (evaluation/int8.py)."""
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data import PRESETS, Preset, collate, get_transform, guess_dataset, prepare_root
from data.voc import depth_fix_command
from evaluation.inference import Predictor, predict_batch
from evaluation.metrics import ConfusionMatrix, SegEvaluator


class EvalSet(Dataset):
    """The first `count` samples of a dataset, each tagged with its index (gathered to name per-image scores), and
    the preset it was opened with (class names, how iIoU weighs instances)."""

    def __init__(self, dataset: Dataset, preset: Preset, count: int | None = None):
        self.dataset = dataset
        self.preset = preset
        self.ids = dataset.ids[: count or len(dataset)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> dict:
        return {**self.dataset[idx], "index": idx}


def collate_eval(samples: list[dict]) -> dict:
    """data.collate (each sample's own size included) plus each sample's index."""
    out = collate(samples)
    out["index"] = torch.tensor([s["index"] for s in samples])
    return out


@torch.no_grad()
def evaluate(run: Predictor, loader, accelerator, num_classes: int, scales=(1.0,), flip: bool = False
             ) -> tuple[dict, dict[int, float]]:
    """Split metrics and per-image mIoU by dataset index; every sample counted exactly once across processes."""
    evaluator = SegEvaluator(num_classes, **loader.dataset.preset.metric_options())
    rows, indices = [], []
    for batch in tqdm(loader, desc="evaluate", disable=not accelerator.is_local_main_process):
        with accelerator.autocast():
            outputs = predict_batch(run, batch, scales, flip)
        rows.append(evaluator.update(outputs, batch, accelerator).cpu())
        indices.append(accelerator.gather_for_metrics(batch["index"]).cpu())
    index = torch.cat(indices)
    expected = len(loader.dataset)
    if sorted(index.tolist()) != list(range(expected)):
        raise RuntimeError(f"evaluation saw {index.numel()} samples ({index.unique().numel()} distinct), "
                           f"expected {expected} once each")
    per_image = ConfusionMatrix.sample_miou(torch.cat(rows), num_classes)
    return evaluator.compute(), dict(zip(index.tolist(), per_image.tolist()))


def score(run: Predictor, dataset: EvalSet, num_classes: int, scales=(1.0,), flip: bool = False,
          batch_size: int = 4, workers: int = 0) -> tuple[dict, dict[int, float]]:
    """`evaluate` in this process alone (no launcher): a Predictor's metrics on a dataset from get_dataset, exactly
    as tools/evaluate.py reports them."""
    accelerator = Accelerator(cpu=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_eval)
    return evaluate(run, loader, accelerator, num_classes, scales, flip)


def get_dataset(data_root: str | Path, split: str, config, max_images: int | None, dataset: str | None = None
                ) -> tuple[EvalSet, tuple[str, ...], list[str]]:
    """The split at original resolution, the tasks to evaluate and notes on what cannot be measured. `dataset`: a
    PRESETS name; default: what the folder looks like (data.guess_dataset: VOC, your own folder or Cityscapes)."""
    name = dataset or guess_dataset(data_root)
    root = prepare_root(name, data_root)
    preset = PRESETS[name].for_root(root)
    if preset.num_classes != config.num_classes:
        raise ValueError(f"the model predicts {config.num_classes} classes, {root} ({name}) has {preset.num_classes}; "
                         "evaluate it on the dataset it was trained for")
    tasks, notes = ("seg",), []
    if "depth" in config.tasks:
        if (root / "PseudoDepth").is_dir():
            tasks = ("seg", "depth")
        else:
            notes.append(f"depth metrics not available: no PseudoDepth/ in {root} "
                         f"(make it with: {depth_fix_command(root, split)})")
    base = preset.open(root, split, get_transform(False, 0, 0), "depth" in tasks)
    if not base.with_instances:
        notes.append(f"iIoU not available: no instance masks in {root}")
    dataset = EvalSet(base, preset, max_images)
    if len(dataset) < len(base):
        notes.append(f"subset: the first {len(dataset)} of {len(base)} images of {split!r} (--max-images)")
    return dataset, tasks, notes
