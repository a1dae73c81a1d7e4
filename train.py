"""Train a shared-encoder, two-decoder UNet (segmentation + pseudo depth) with a staged schedule.

    accelerate launch train.py --schedule d_s_b --copy-weights        # synthetic demo set, minutes on a CPU
    accelerate launch train.py --dataset voc --data-root ~/data/VOCdevkit --schedule d_s_b --copy-weights
    accelerate launch --multi_gpu --num_processes 2 train.py ...     # several processes (CPU: gloo)
    python train.py --resume auto --output-dir runs/d_s_b            # continue a killed run
"""
import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data import PRESETS, VOCSegmentation, collate, get_transform, prepare_root
from data.sampler import EpochSampler, SeededDataset
from data.visualize import log_images
from models import FocalLoss, ModelConfig, build_model, depth_loss
from models.checkpoint import TrainState, find_resume, save_checkpoint
from schedules import SCHEDULES, copy_plan, get_schedule, lr_factor, schedule_tasks
from tools.metrics import ConfusionMatrix, DepthMetrics, InstanceIoU


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last checkpoint on disk is the last good state."""


def get_dataloaders(args, preset, root: Path, need_depth: bool, batch_size: int, crop: int):
    """Train loader (deterministic order and augmentation) and val loader (original resolution)."""
    train_set = VOCSegmentation(
        root, preset.train_split, get_transform(True, args.base_size or preset.base_size, crop), need_depth, preset.num_classes
    )
    val_set = VOCSegmentation(root, preset.val_split, get_transform(False, 0, 0), need_depth, preset.num_classes)
    common = dict(num_workers=args.workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                  persistent_workers=args.workers > 0)
    train_loader = DataLoader(SeededDataset(train_set, args.seed), batch_size=batch_size,
                              sampler=EpochSampler(len(train_set), args.seed), drop_last=True, **common)
    val_loader = DataLoader(val_set, batch_size=args.val_batch_size, shuffle=False, **common)
    return train_loader, val_loader


def criterion(outputs: dict, batch: dict, weights: dict, focal: FocalLoss) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the stage's losses, and each term (still tensors: no host sync)."""
    terms = {}
    if "seg" in weights:
        terms["seg"] = focal(outputs["seg"], batch["label"])
    if "depth" in weights:
        terms["depth"] = depth_loss(outputs["depth"], batch["depth"])
    return sum(weights[t] * terms[t] for t in terms), terms


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int, tasks: tuple[str, ...], log_step: int | None = None) -> dict:
    """Validation over the whole split; every sample counted exactly once across processes."""
    model.eval()
    confmat = ConfusionMatrix(num_classes)
    iiou = InstanceIoU(num_classes)
    depth = DepthMetrics()
    has_instances = has_depth = False
    for i, batch in enumerate(loader):
        outputs = model(batch["image"].contiguous(memory_format=torch.channels_last), tasks=tasks)
        pred = outputs["seg"].argmax(1)
        confmat.update(counts=accelerator.gather_for_metrics(ConfusionMatrix.batch_counts(pred, batch["label"], num_classes)))
        if "instances" in batch:
            has_instances = True
            stats = InstanceIoU.sample_stats(pred, batch["label"], batch["instances"], num_classes)
            iiou.update(stats=accelerator.gather_for_metrics(stats))
        if "depth" in outputs and "depth" in batch:
            has_depth = True
            depth.update(stats=accelerator.gather_for_metrics(DepthMetrics.sample_stats(outputs["depth"].float(), batch["depth"])))
        if i == 0 and log_step is not None and accelerator.is_main_process:
            log_images(accelerator, batch, outputs, log_step)
    metrics = {**confmat.compute(), "confusion_matrix": confmat.mat.cpu().tolist()}
    if has_instances:
        metrics.update(iiou.compute())
    if has_depth:
        metrics.update(depth.compute())
    return metrics


def train_one_epoch(model, optimizer, loader, accelerator, stage, focal, state: TrainState, args, on_step) -> dict:
    """One pass over the (remaining) batches of an epoch; returns the epoch's average losses."""
    model.train()
    weights = stage.weights()
    total_steps = state.steps_per_epoch * stage.epochs
    running = {t: torch.zeros((), device=accelerator.device) for t in (*weights, "loss")}
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    seen, steps, tic = 0, 0, time.perf_counter()
    bar = tqdm(total=state.steps_per_epoch, initial=state.step, disable=not accelerator.is_local_main_process,
               desc=f"stage {state.stage} ({stage.name}) epoch {state.epoch}", leave=False)
    for batch in loader:
        if state.step >= state.steps_per_epoch:
            break
        lr = args.lr * lr_factor((state.epoch * state.steps_per_epoch + state.step) / total_steps, args.lr_schedule, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        outputs = model(batch["image"].contiguous(memory_format=torch.channels_last), tasks=stage.tasks)
        loss, terms = criterion(outputs, batch, weights, focal)
        nonfinite |= ~torch.isfinite(loss.detach())
        accelerator.backward(loss)
        if args.clip_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for t, v in {**terms, "loss": loss}.items():
            running[t] += v.detach()
        state.step += 1
        state.global_step += 1
        seen += batch["image"].shape[0]
        steps += 1
        if state.step % args.log_every == 0 or state.step == state.steps_per_epoch:
            check_finite(nonfinite, terms, loss, state, stage)
            logs = {f"train/{t}": v.item() for t, v in terms.items()}
            img_s = seen * accelerator.num_processes / (time.perf_counter() - tic)
            accelerator.log({**logs, "train/loss": loss.item(), "train/lr": lr, "train/img_per_s": img_s}, step=state.global_step)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
        bar.update(1)
        on_step()
    bar.close()
    check_finite(nonfinite, terms, loss, state, stage)
    return {t: accelerator.reduce(v, "mean").item() / max(steps, 1) for t, v in running.items()}


def check_finite(nonfinite: torch.Tensor, terms: dict, loss: torch.Tensor, state, stage) -> None:
    """Stop on a NaN/inf loss, naming where it happened and each term; checked at log steps (one sync)."""
    if nonfinite.item():
        detail = ", ".join(f"{t}={v.item():.4g}" for t, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite loss at stage {state.stage} ({stage.name}), epoch {state.epoch}, step {state.step} "
            f"(global step {state.global_step}): loss={loss.item():.4g} ({detail}). The last checkpoint on disk "
            f"is the last good state; lower --lr or set --clip-grad-norm and resume from it."
        )


def setup_stage(accelerator, model, stage, args, train_loader, val_loader):
    """Unwrap, set what trains, fresh Adam over it, prepare again (DDP registers hooks when built)."""
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    model.set_trainable(stage.tasks, encoder=stage.train_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, fused=args.fused_adam and accelerator.device.type in ("cuda", "cpu"))
    return accelerator.prepare(model, optimizer, train_loader, val_loader)


def write_json_line(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(args):
    preset = PRESETS[args.dataset]
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
        log_with="tensorboard", project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
    )
    set_seed(args.seed, device_specific=True)
    out = Path(args.output_dir)
    stages = get_schedule(args.schedule, args.stage_epochs, preset.epochs, joint_weights=args.loss_weights)
    tasks = schedule_tasks(stages)
    copies = copy_plan(stages) if args.copy_weights else {}
    if args.copy_weights and not copies:
        accelerator.print(f"--copy-weights: schedule {args.schedule} has no decoder to copy from; nothing copied")
    with accelerator.main_process_first():
        root = prepare_root(args.dataset, args.data_root or preset.data_root)
    batch_size, crop = args.batch_size or preset.batch_size, args.crop_size or preset.crop_size
    train_loader, val_loader = get_dataloaders(args, preset, root, "depth" in tasks, batch_size, crop)
    config = ModelConfig(encoder=args.encoder, tasks=tasks, num_classes=preset.num_classes)
    model = build_model(config, args.encoder_weights or preset.encoder_weights).to(memory_format=torch.channels_last)
    focal = FocalLoss(args.focal_gamma)
    run_config = {**vars(args), "data_root": str(root), "batch_size": batch_size, "crop_size": crop,
                  "stages": [asdict(s) for s in stages], "model": asdict(config), "world_size": accelerator.num_processes}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
    accelerator.init_trackers("tensorboard")  # the run's settings are in run_config.json

    state = TrainState()
    accelerator.register_for_checkpointing(state)
    resume = find_resume(args.resume, out)
    if resume is not None:
        state.load_state_dict(json.loads((resume / "train_state.json").read_text()))
    metrics = {}
    while state.stage < len(stages):
        stage = stages[state.stage]
        fresh = state.epoch == 0 and state.step == 0
        if fresh and state.stage in copies:
            src, dst = copies[state.stage]
            copied = accelerator.unwrap_model(model).copy_decoder(src, dst)
            accelerator.print(f"copy-weights before stage {state.stage} ({stage.name}): {len(copied)} tensors "
                              f"decoders.{src}.* -> decoders.{dst}.* (heads not copied); list in {out / 'copied_tensors.txt'}")
            if accelerator.is_main_process:
                (out / "copied_tensors.txt").write_text("\n".join(copied) + "\n")
        model, optimizer, train_dl, val_dl = setup_stage(accelerator, model, stage, args, train_loader, val_loader)
        if resume is not None:
            accelerator.load_state(str(resume))
            accelerator.print(f"resumed from {resume} at stage {state.stage}, epoch {state.epoch}, step {state.step}")
            resume = None
        state.steps_per_epoch = min(len(train_dl), args.max_steps_per_epoch or len(train_dl))
        while state.epoch < stage.epochs:
            epoch_key = sum(s.epochs for s in stages[: state.stage]) + state.epoch
            train_dl.set_epoch(epoch_key)
            loader = accelerator.skip_first_batches(train_dl, state.step) if state.step else train_dl
            if state.step:
                loader.set_epoch(epoch_key)

            def on_step():
                if args.checkpoint_every and state.global_step % args.checkpoint_every == 0 and state.step < state.steps_per_epoch:
                    save_checkpoint(accelerator, model, out, state)

            losses = train_one_epoch(model, optimizer, loader, accelerator, stage, focal, state, args, on_step)
            metrics = evaluate(model, val_dl, accelerator, preset.num_classes, tasks, log_step=state.global_step)
            accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=state.global_step)
            accelerator.print(f"stage {state.stage} ({stage.name}) epoch {state.epoch}: "
                              + " ".join(f"{k}={v:.4f}" for k, v in {**losses, **metrics}.items() if isinstance(v, float)))
            is_best = metrics["mIoU"] > state.best_miou
            state.best_miou = max(state.best_miou, metrics["mIoU"])
            if accelerator.is_main_process:
                write_json_line(out / "log.jsonl", {
                    "stage": state.stage, "stage_name": stage.name, "epoch": state.epoch, "global_step": state.global_step,
                    "steps": state.steps_per_epoch, "world_size": accelerator.num_processes, "train": losses,
                    "val": {k: v for k, v in metrics.items() if k != "confusion_matrix"}})
            state.epoch_done()
            save_checkpoint(accelerator, model, out, state, best=is_best)
        state.stage_done()
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps({**metrics, "best_mIoU": state.best_miou}, indent=2))
    accelerator.end_training()
    return metrics


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def get_args_parser():
    p = argparse.ArgumentParser(description="Staged multi-decoder segmentation training", add_help=True)
    p.add_argument("--schedule", default="d_s_b", choices=sorted(SCHEDULES), help="stage sequence (SPEC 'Schedules')")
    p.add_argument("--copy-weights", action="store_true", help="copy the first-trained decoder into the next one (not the head)")
    p.add_argument("--stage-epochs", type=parse_int_list, default=None, help="E or E1,E2,... (default: the dataset preset's)")
    p.add_argument("--dataset", default="synthetic", choices=sorted(PRESETS), help="dataset preset")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the preset's; synthetic is generated there)")
    p.add_argument("--encoder", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"], help="ResNet encoder")
    p.add_argument("--encoder-weights", default=None, help="imagenet | none | PATH (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per process per step (default: the preset's)")
    p.add_argument("--val-batch-size", type=int, default=4, help="validation images per process per step")
    p.add_argument("--crop-size", type=int, default=None, help="training crop (default: the preset's)")
    p.add_argument("--base-size", type=int, default=None, help="random-rescale base size (default: the preset's)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="per-stage lr shape (paper: constant)")
    p.add_argument("--warmup", type=float, default=0.0, help="fraction of each stage spent in linear warmup")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (paper: 2)")
    p.add_argument("--loss-weights", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.85, 0.15),
                   help="seg,depth weights of the joint stage (paper: 0.85,0.15)")
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip gradients to this norm (0: off)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True, help="fused Adam kernel")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate launch's setting")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on steps per epoch (quick runs)")
    p.add_argument("--log-every", type=int, default=10, help="log (and check the loss is finite) every N steps")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends only)")
    p.add_argument("--output-dir", default="runs/latest", help="run folder: TensorBoard, log.jsonl, metrics.json, checkpoints")
    p.add_argument("--resume", default=None, help="auto (the run folder's last checkpoint, if any) or a checkpoint PATH")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
