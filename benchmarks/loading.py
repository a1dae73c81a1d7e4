"""Data loading: train.py's training DataLoader alone, and train.train_one_epoch fed by it (data loading and the step
sharing the machine)."""
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import train
from data import PRESETS, prepare_root
from data.pools import plan_stage
from models import FocalLoss, ModelConfig, build_model
from run_state import TrainState
from benchmarks.timing import Settings, fresh_accelerator, no_bar, sync
from benchmarks.training import STAGES, train_defaults

REPO = Path(__file__).resolve().parents[1]
VOC_MINI = Path(os.environ.get("VOC_MINI", REPO.parent / "shared" / "data" / "voc2012-mini"))


def find_data_root(data_root: str | None) -> tuple[str, Path]:
    """--data-root, else the VOC 2012 mini set next to the repo, else the synthetic set (generated if needed)."""
    if data_root:
        return "voc", Path(data_root)
    if (VOC_MINI / "VOCdevkit" / "VOC2012").is_dir():
        return "voc", VOC_MINI / "VOCdevkit" / "VOC2012"
    return "synthetic", prepare_root("synthetic", REPO / PRESETS["synthetic"].data_root)


def stage_loader(targs, dataset: str, root: Path, need_depth: bool, rounds: tuple[int, ...]):
    """train.py's training DataLoader of a seg-only stage (both when need_depth) with the given rounds, and its plan."""
    pool, val_set, _ = train.get_datasets(targs, PRESETS[dataset], root, need_depth)
    stage = STAGES["both" if need_depth else "seg"]
    plan = replace(plan_stage(pool, stage, 0, targs.batch_size, targs.depth_only_fraction), rounds=rounds)
    return train.get_train_loader(pool, plan, targs, 1), train.get_loader(val_set, targs, batch_size=1), plan


def bench_loader(dataset: str, root: Path, batch: int, side: int, n_batches: int, bar: tqdm) -> dict:
    """Images/s of train.py's training DataLoader alone (default workers), after its first batch."""
    targs = train_defaults(["--batch-size", str(batch), "--crop-size", str(side)], dataset)
    need_depth = (root / "PseudoDepth").is_dir()  # the joint stage reads depth too: the heavier case
    loader, _, _ = stage_loader(targs, dataset, root, need_depth, (n_batches + 1,))
    batches = iter(loader)
    next(batches)  # workers started, their first batches made
    tic, images = time.perf_counter(), 0
    for _ in range(n_batches):
        images += next(batches)["image"].shape[0]
        bar.update(1)
    seconds = time.perf_counter() - tic
    return {"name": f"DataLoader {dataset} {batch}x{side} ({targs.workers} workers)", "dataset": dataset, "batch": batch,
            "side": side, "workers": targs.workers, "with_depth": need_depth, "images_per_s": images / seconds}


class NoRunFolder:
    """train_one_epoch's run folder, writing nothing: the bench times the loop, not the logging."""

    def log(self, values: dict, step: int) -> None:
        pass

    def save(self, model, state, best: bool = False) -> None:
        pass


def bench_end_to_end(settings: Settings, dataset: str, root: Path, device: torch.device, precision: str, bar: tqdm) -> dict:
    """train.train_one_epoch fed by the real DataLoader: data loading and the step share the machine."""
    batch, side = settings.train_shapes[0]
    targs = train_defaults(["--batch-size", str(batch), "--crop-size", str(side)], dataset)
    accelerator = fresh_accelerator(precision, device)
    *loaders, plan = stage_loader(targs, dataset, root, False, (settings.warmup, settings.e2e_steps))
    model = build_model(ModelConfig(encoder=settings.encoder, tasks=("seg", "depth"))).to(memory_format=torch.channels_last)
    stage = STAGES["seg"]
    model, optimizer, train_dl, _ = train.setup_stage(accelerator, model, stage, targs, *loaders)
    criterion = train.Criterion(FocalLoss(targs.focal_gamma), stage.weights())
    options = train.LoopOptions(targs.lr, targs.lr_schedule, targs.warmup, targs.log_every, 0, targs.clip_grad_norm)
    for epoch, steps in enumerate((settings.warmup, settings.e2e_steps)):
        train_dl.set_epoch(epoch)
        state = TrainState(steps_per_epoch=steps)
        tic = time.perf_counter()
        train.train_one_epoch(model, criterion, optimizer, train_dl, accelerator, plan, state, NoRunFolder(), options)
        sync(device)
        seconds = time.perf_counter() - tic
        bar.update(steps)
    return {"name": f"ours seg-only {batch}x{side} {precision}, train_one_epoch on {dataset} ({targs.workers} workers)",
            "batch": batch, "side": side, "precision": precision, "steps": settings.e2e_steps,
            "images_per_s": settings.e2e_steps * batch / seconds}


def planned_steps(settings: Settings) -> int:
    """Batches and steps that bench_data runs: the progress bar's share of it."""
    return len(settings.train_shapes) * settings.loader_batches + settings.warmup + settings.e2e_steps


def bench_data(settings: Settings, data_root: str | None, device: torch.device, precision: str,
               bar: tqdm | None = None) -> list[dict]:
    """The loader alone at every training shape, then the end-to-end epoch at the first."""
    bar = no_bar() if bar is None else bar
    dataset, root = find_data_root(data_root)
    root = prepare_root(dataset, root)
    bar.set_description(f"data loading ({dataset})")
    rows = [{"kind": "loader", **bench_loader(dataset, root, b, s, settings.loader_batches, bar)}
            for b, s in settings.train_shapes]
    bar.set_description(f"train_one_epoch on {dataset}")
    return rows + [{"kind": "end-to-end", **bench_end_to_end(settings, dataset, root, device, precision, bar)}]
