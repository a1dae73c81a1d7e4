"""Train a shared-encoder, two-decoder UNet (segmentation + pseudo depth) with a staged schedule.

    accelerate launch train.py --schedule d_s_b --copy-weights        # synthetic demo set, minutes on a CPU
    accelerate launch train.py --dataset voc --data-root ~/data/VOCdevkit --schedule d_s_b --copy-weights
    accelerate launch --multi_gpu --num_processes 2 train.py ...     # several processes (CPU: gloo)
    python train.py --resume auto --output-dir runs/d_s_b            # continue a killed run
"""
import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data import PRESETS, DataError, TrainPool, collate, get_transform, prepare_root
from data.checks import check_data, skip_bad
from data.pools import StagePlan, describe_images, images_record, plan_stage
from data.sampler import SeededDataset, StreamSampler
from evaluation.inference import predict_batch, torch_predictor
from evaluation.metrics import SegEvaluator
from models import FocalLoss, ModelConfig, build_model, depth_loss
from models.encoder import ENCODERS
from models.weighting import WEIGHTINGS, build_weighting, for_stage, trainable_params
from run_state import (CheckpointError, RunLog, TrainState, WriteError, fault_point, find_resume, load_checkpoint,
                       prepare_resume, read_checkpoint, refuse_overwrite, write_text)
from run_state.loss_watch import LossWatch, NonFiniteLossError
from run_state.prefixes import PrefixStore, keep_prefix, prefix_keys, start_from_prefix
from schedules import SCHEDULES, copy_plan, get_schedule, lr_factor, schedule_tasks


def get_datasets(args, preset, root: Path, need_depth: bool, accelerator=None):
    """The training pool (the labelled split, and the depth-only images of --depth-only when a stage trains depth), the
    val split, and the choice of depth-only images (None without them)."""
    check = not args.skip_bad_samples  # header checks raise on the first bad file; skipping decodes all up front
    train_transform = get_transform(True, args.base_size, args.crop_size)
    labelled = preset.open(root, args.train_split, train_transform, need_depth, check=check)
    val_set = preset.open(root, preset.val_split, get_transform(False, 0, 0), need_depth, check=check)
    depth_only, choice = None, None
    if args.depth_only != "none" and not need_depth:
        print(f"--depth-only {args.depth_only}: schedule {args.schedule} trains no depth decoder; no depth-only images used")
    elif args.depth_only != "none":
        depth_only, choice = preset.open_depth_only(root, args.depth_only, labelled.ids, val_set.ids,
                                                    args.depth_only_val, train_transform, check=check)
    if args.skip_bad_samples:
        skip_bad([ds for ds in (labelled, val_set, depth_only) if ds is not None], args.workers, accelerator)
    return TrainPool(labelled, depth_only), val_set, choice


def get_loader(dataset, args, **kwargs) -> DataLoader:
    """A DataLoader with the run's workers and collate (train: a StreamSampler's deterministic order and augmentation)."""
    return DataLoader(dataset, num_workers=args.workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      persistent_workers=args.workers > 0, **kwargs)


def get_train_loader(pool: TrainPool, plan: StagePlan, args, processes: int) -> DataLoader:
    """The stage's batches: its streams (data/pools.py) in rounds, each sample augmented under its own seed."""
    sampler = StreamSampler(plan.streams, args.seed, plan.rounds, processes)
    return get_loader(SeededDataset(pool, args.seed), args, batch_size=sampler.batch_size, sampler=sampler,
                      drop_last=True)


class Criterion:
    """The stage's loss: the weighted sum of its terms (or the joint weighting's combination), and each term."""

    def __init__(self, focal: FocalLoss, weights: dict[str, float], joint=None):
        self.focal, self.weights, self.joint = focal, weights, joint

    def __call__(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        terms = {}  # tensors: no host sync
        if "seg" in self.weights:
            terms["seg"] = self.focal(outputs["seg"], batch["label"])
        if "depth" in self.weights:
            terms["depth"] = depth_loss(outputs["depth"], batch["depth"])
        if self.joint is not None:  # models/weighting.py: uncertainty or DWA in place of the fixed weights
            return self.joint(terms), terms
        return sum(self.weights[t] * terms[t] for t in terms), terms

    def logged_weights(self, accelerator) -> dict[str, torch.Tensor]:
        """The joint weighting's effective weight of each term ({} with the fixed weights)."""
        if self.joint is None:
            return {}
        return {f"w_{t}": w for t, w in accelerator.unwrap_model(self.joint).weights().items()}


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int, tasks: tuple[str, ...],
             metric_options: dict | None = None) -> tuple[dict, tuple | None]:
    """Validation over the whole split, every sample counted exactly once across processes: the metrics, and the
    first (batch, outputs) on the main process for TensorBoard's images (None elsewhere). metric_options: the
    dataset's (Preset.metric_options: class names, iIoU's instance classes and sizes)."""
    model.eval()
    evaluator = SegEvaluator(num_classes, **(metric_options or {}))  # the same metric code as tools/evaluate.py
    run = torch_predictor(model, tasks)
    shown = None
    for i, batch in enumerate(loader):
        outputs = predict_batch(run, batch)  # each image alone at its size, as tools/evaluate.py and predict.py
        evaluator.update(outputs, batch, accelerator)
        if i == 0 and accelerator.is_main_process:
            shown = (batch, outputs)
    return evaluator.compute(), shown


def train_step(model, criterion, optimizer, batch, accelerator, tasks, clip_grad_norm: float) -> tuple[torch.Tensor, dict]:
    """Forward the stage's decoders, loss, backward, optimizer step; no host sync (tools/bench.py times this)."""
    outputs = model(batch["image"].contiguous(memory_format=torch.channels_last), tasks=tasks)
    loss, terms = criterion(outputs, batch)
    accelerator.backward(loss)
    if clip_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, terms


@dataclass(frozen=True)
class LoopOptions:
    """What train_one_epoch reads besides the stage: the learning rate's shape and how often to log and checkpoint."""

    lr: float
    lr_schedule: str
    warmup: float
    log_every: int
    checkpoint_every: int
    clip_grad_norm: float


def train_one_epoch(model, criterion: Criterion, optimizer, loader, accelerator, plan: StagePlan, state: TrainState,
                    run: RunLog, options: LoopOptions) -> dict:
    """The (remaining) batches of a round (an epoch, or --val-every steps), logging every options.log_every steps and
    checkpointing every options.checkpoint_every; returns the round's average losses (and joint weights)."""
    model.train()
    stage = plan.stage
    logged = (*criterion.weights, "loss", *criterion.logged_weights(accelerator))
    # loss sums so far this epoch: restored from a mid-epoch checkpoint, so the epoch's averages come out the same
    running = {t: torch.tensor(state.sums.get(t, 0.0), device=accelerator.device) for t in logged}
    watch = LossWatch(tuple(criterion.weights), accelerator.device)
    seen, tic = 0, time.perf_counter()
    bar = tqdm(total=state.steps_per_epoch, initial=state.step, disable=not accelerator.is_local_main_process,
               desc=f"stage {state.stage} ({stage.name}) epoch {state.epoch}", leave=False)
    for batch in loader:
        if state.step >= state.steps_per_epoch:
            break
        lr = options.lr * lr_factor(plan.progress(state.epoch, state.step), options.lr_schedule, options.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        effective = criterion.logged_weights(accelerator)  # the weights this step uses
        loss, terms = train_step(model, criterion, optimizer, batch, accelerator, stage.tasks, options.clip_grad_norm)
        watch.update(terms, loss, state.global_step + 1)
        for t, v in {**terms, "loss": loss, **effective}.items():
            running[t] += v.detach()
        state.step += 1
        state.global_step += 1
        fault_point("step")
        seen += batch["image"].shape[0]
        if state.step % options.log_every == 0 or state.step == state.steps_per_epoch:
            watch.check(accelerator, state, stage)
            logs = {f"train/{t}": v.item() for t, v in {**terms, **effective}.items()}
            img_s = seen * accelerator.num_processes / (time.perf_counter() - tic)
            run.log({**logs, "train/loss": loss.item(), "train/lr": lr, "train/img_per_s": img_s}, state.global_step)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
        bar.update(1)
        if options.checkpoint_every and state.global_step % options.checkpoint_every == 0 \
                and state.step < state.steps_per_epoch:  # the epoch's last step is saved after validation instead
            watch.check(accelerator, state, stage)  # a state a NaN reached is never checkpointed
            state.sums = {t: accelerator.reduce(v, "mean").item() for t, v in running.items()}
            run.save(model, state)
    bar.close()
    watch.check(accelerator, state, stage)
    averages = {t: accelerator.reduce(v, "mean").item() / max(state.step, 1) for t, v in running.items()}
    if criterion.joint is not None:
        accelerator.unwrap_model(criterion.joint).epoch_end(averages)  # DWA: the next epoch's weights
    return averages


def setup_stage(accelerator, model, stage, args, train_loader, val_loader, weighting=None):
    """Unwrap, set what trains, fresh Adam over it, prepare again (DDP registers hooks when built)."""
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    model.set_trainable(stage.tasks, encoder=stage.train_encoder)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if extra := trainable_params(weighting, stage.tasks):  # uncertainty log-variances: at lr 1e-4 they barely move
        groups.append({"params": extra, "lr_scale": args.weighting_lr / args.lr})
    optimizer = torch.optim.Adam(groups, lr=args.lr, fused=args.fused_adam and accelerator.device.type in ("cuda", "cpu"))
    return accelerator.prepare(model, optimizer, train_loader, val_loader)


def copy_weights(accelerator, model, src: str, dst: str, where: str, out: Path) -> None:
    """--copy-weights: the first-trained decoder into the next one, listed in the run folder."""
    copied = accelerator.unwrap_model(model).copy_decoder(src, dst)
    accelerator.print(f"copy-weights before {where}: {len(copied)} tensors decoders.{src}.* -> decoders.{dst}.* "
                      f"(heads not copied); list in {out / 'copied_tensors.txt'}")
    if accelerator.is_main_process:  # write_text makes the folder: a resume into a new one may not have it yet
        write_text(out / "copied_tensors.txt", "\n".join(copied) + "\n")


def run_data_checks(args, preset) -> dict:
    """--check-data: decode every sample of both splits, print a report, train nothing."""
    root = prepare_root(args.dataset, args.data_root)
    tasks = schedule_tasks(get_schedule(args.schedule, args.stage_epochs, preset.epochs))
    print(f"checking for schedule {args.schedule} " + ("(needs pseudo depth: pass --schedule s to check a seg-only run)"
                                                       if "depth" in tasks else "(needs no pseudo depth)"))
    report, errors = check_data(root, [args.train_split, preset.val_split], "depth" in tasks, preset.for_root(root),
                                args.workers)
    print(report)
    return {"errors": errors}


def cpu_threads(requested: int | None) -> int:
    """Threads per process on the CPU: --threads, else this machine's cores split among its processes.
    (`accelerate launch` without --cpu sets OMP_NUM_THREADS=1 on a machine with no GPU: one core of many.)"""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    return requested or max(1, cores // local)


def main(args):
    preset = PRESETS[args.dataset]
    args = preset.fill(args)
    if args.check_data:
        return run_data_checks(args, preset)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
        log_with="tensorboard", project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False, non_blocking=True),  # pinned batches: async copy
        dynamo_backend="inductor" if args.compile else None,  # None: accelerate launch's --dynamo_backend
        # a process stuck in a collective because another one died gives up after this long
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))],
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))
    set_seed(args.seed, device_specific=True)
    out = Path(args.output_dir)
    stages = get_schedule(args.schedule, args.stage_epochs, preset.epochs, args.loss_weights, args.stage_steps,
                          dict(preset.stage_steps or {}))
    tasks = schedule_tasks(stages)
    copies = copy_plan(stages) if args.copy_weights else {}
    if args.copy_weights and not copies:
        accelerator.print(f"--copy-weights: schedule {args.schedule} has no decoder to copy from; nothing copied")
    with accelerator.main_process_first():
        root = prepare_root(args.dataset, args.data_root)
    preset = preset.for_root(root)  # a folder's classes.txt: its number of classes, names and colours
    pool, val_set, depth_only = get_datasets(args, preset, root, "depth" in tasks, accelerator)
    plans = [plan_stage(pool, stage, i, args.batch_size, args.depth_only_fraction, accelerator.num_processes,
                        args.val_every, args.max_steps_per_epoch) for i, stage in enumerate(stages)]
    val_loader = get_loader(val_set, args, batch_size=args.val_batch_size, shuffle=False)
    datasets = [d for d in (pool.labelled, val_set, pool.depth_only) if d is not None]
    skipped = {ds.split: len(ds.skipped) for ds in datasets}
    config = ModelConfig(encoder=args.encoder, tasks=tasks, num_classes=preset.num_classes,
                         decoder_channels=args.decoder_channels, class_names=preset.class_names, palette=preset.palette)
    model = build_model(config, args.encoder_weights).to(memory_format=torch.channels_last)
    focal = FocalLoss(args.focal_gamma)
    options = LoopOptions(args.lr, args.lr_schedule, args.warmup, args.log_every, args.checkpoint_every,
                          args.clip_grad_norm)
    images = images_record(args.train_split, args.depth_only, args.depth_only_val, pool, val_set, depth_only, plans)
    accelerator.print(describe_images(images) + "\n" + "\n".join(p.describe(i, pool) for i, p in enumerate(plans)))
    run_config = {**vars(args), "data_root": str(root), "stages": [asdict(s) for s in stages], "model": asdict(config),
                  "world_size": accelerator.num_processes, "images": images,
                  "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None}
    store = PrefixStore(args.reuse_prefixes) if args.reuse_prefixes else None
    keys = prefix_keys(vars(args), plans, pool.ids(), asdict(config), copies, accelerator.num_processes)

    state = TrainState(schedule=args.schedule)
    weighting = build_weighting(args.joint_weighting, tasks, args.dwa_temperature)  # None: the paper's fixed weights
    # saved with torch.save and loaded weights_only=True (Accelerate unpickles registered objects unrestricted)
    extra = {"weighting": weighting.to(accelerator.device)} if weighting is not None else {}
    resume = prepare_resume(accelerator, args.resume, out)  # verified; a torn last log line dropped
    if resume is not None:  # where it stands first: rebuild that stage, then load_state into it
        state = read_checkpoint(resume, model, args.schedule)
    else:
        refuse_overwrite(out, args.resume)
        if store is not None and (reused := start_from_prefix(accelerator, store, keys, out, args.schedule)):
            run_config["reused_prefix"] = reused
            resume = find_resume("auto", out)
            state = read_checkpoint(resume, model, args.schedule)
        elif args.resume == "auto":
            accelerator.print(f"--resume auto: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    run = RunLog(accelerator, out, run_config, state, resumed=resume is not None, extra=extra)  # writes nothing yet
    metrics = {}
    while state.stage < len(stages):
        stage, plan = stages[state.stage], plans[state.stage]
        if state.epoch == 0 and state.step == 0 and state.stage in copies:  # once: at a stage's very start
            copy_weights(accelerator, model, *copies[state.stage], f"stage {state.stage} ({stage.name})", out)
        loader = get_train_loader(pool, plan, args, accelerator.num_processes)
        model, optimizer, train_dl, val_dl = setup_stage(accelerator, model, stage, args, loader, val_loader, weighting)
        joint = for_stage(weighting, stage.tasks, accelerator)  # before load_state: a prepared one is in the checkpoint
        criterion = Criterion(focal, stage.weights(), joint)
        if resume is not None:
            load_checkpoint(accelerator, resume, extra)
            accelerator.print(f"resumed from {resume} at stage {state.stage}, epoch {state.epoch}, step {state.step}")
            resume = None
        while state.epoch < len(plan.rounds):
            state.set_steps_per_epoch(plan.rounds[state.epoch])
            train_dl.set_epoch(state.epoch)  # the round's window of the stage's batches
            loader = accelerator.skip_first_batches(train_dl, state.step) if state.step else train_dl
            if state.step:
                loader.set_epoch(state.epoch)
            losses = train_one_epoch(model, criterion, optimizer, loader, accelerator, plan, state, run, options)
            metrics, shown = evaluate(model, val_dl, accelerator, preset.num_classes, tasks, preset.metric_options())
            run.open()  # an epoch trained and validated: the run starts writing into its folder
            if shown is not None:  # the first validation batch, for TensorBoard
                run.images(*shown, state.global_step, palette=preset.palette)
            run.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=state.global_step)
            accelerator.print(f"stage {state.stage} ({stage.name}) epoch {state.epoch}: "
                              + " ".join(f"{k}={v:.4f}" for k, v in {**losses, **metrics}.items() if isinstance(v, float)))
            if "depth_nan_reason" in metrics:
                accelerator.print(f"  depth metrics are NaN: {metrics['depth_nan_reason']}")
            is_best = metrics["mIoU"] > state.best_miou
            state.best_miou = max(state.best_miou, metrics["mIoU"])
            run.epoch_line({
                "stage": state.stage, "stage_name": stage.name, "epoch": state.epoch, "global_step": state.global_step,
                "steps": state.steps_per_epoch, "world_size": accelerator.num_processes, "skipped_samples": skipped,
                "train": losses, "val": {k: v for k, v in metrics.items() if k != "confusion_matrix"}})
            if state.stage == len(stages) - 1 and state.epoch == len(plan.rounds) - 1:
                # before the checkpoint that marks the run finished, so a finished run always has it
                run.final_metrics({**metrics, "best_mIoU": state.best_miou})
            state.epoch_done()
            run.save(model, state, best=is_best)
        if store is not None and state.stage < len(stages) - 1:
            keep_prefix(accelerator, store, keys[state.stage], out, state.stage)
        state.stage_done()
        fault_point("stage")
    if sum(skipped.values()):
        accelerator.print(f"--skip-bad-samples: skipped {sum(skipped.values())} bad samples ("
                          + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + f"); list in {out / 'skipped_samples.txt'}")
        if accelerator.is_main_process:
            write_text(out / "skipped_samples.txt", "".join(f"{m}\n" for ds in datasets for m in ds.skipped))
    if not metrics:
        accelerator.print(f"{out}: the run had already finished; nothing trained, metrics.json kept")
    run.finish()
    return metrics


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def get_args_parser():
    p = argparse.ArgumentParser(description="Staged multi-decoder segmentation training", add_help=True)
    p.add_argument("--schedule", default="d_s_b", choices=sorted(SCHEDULES), help="stage sequence: s = segmentation decoder, "
                   "d = depth decoder, b = both (README, 'Schedules')")
    p.add_argument("--copy-weights", action="store_true", help="copy the first-trained decoder into the next one (not the head)")
    p.add_argument("--stage-epochs", type=parse_int_list, default=None, help="E or E1,E2,... (default: the dataset preset's)")
    p.add_argument("--stage-steps", type=parse_int_list, default=None,
                   help="S or S1,S2,...: stage lengths in optimizer steps instead of epochs (a depth pool many times "
                        "the labelled set); each stage validates every --val-every steps")
    p.add_argument("--val-every", type=int, default=None,
                   help="stages in steps: steps between validations (and checkpoints); 0: once, at the stage's end "
                        "(default: the preset's, else a tenth of the stage)")
    p.add_argument("--dataset", default="synthetic", choices=sorted(PRESETS), help="dataset preset")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the preset's; synthetic is generated there)")
    p.add_argument("--train-split", default=None,
                   help="the labelled training split: a name in ImageSets/Segmentation/ (VOC: train_aug reads SBD's "
                        "SegmentationClassAug/; tools/make_subsets.py writes train_n25 ...) or a .txt file of ids "
                        "(default: the preset's, train)")
    p.add_argument("--depth-only", default="none",
                   help="images that train depth without a label: none; rest (every image outside the labelled and "
                        "val splits: VOC's JPEGImages/, Cityscapes' train + train_extra); or a split name / .txt of ids")
    p.add_argument("--depth-only-val", action="store_true",
                   help="let val images be depth-only images too (default: they are left out)")
    p.add_argument("--depth-only-fraction", type=float, default=0.5,
                   help="share of each b-stage batch drawn from the depth-only images (at least one image of each kind)")
    p.add_argument("--encoder", default=None, choices=list(ENCODERS),
                   help="torchvision encoder (default: the preset's; voc: resnet50 as in the paper, synthetic: "
                        "resnet18); README 'Choosing an encoder for your device' compares them")
    p.add_argument("--encoder-weights", default=None, help="imagenet | none | PATH (default: the preset's)")
    p.add_argument("--decoder-channels", type=lambda t: tuple(parse_int_list(t)), default=None,
                   help="the UNet decoders' widths, deepest block first, one block each (default: the encoder's: smp's "
                        "256,128,64,32,16 for the ResNets; 96,48,24,16 for the edge encoders: four blocks end at "
                        "stride 2 and the logits are upsampled bilinearly)")
    p.add_argument("--batch-size", type=int, default=None, help="images per process per step (default: the preset's)")
    p.add_argument("--val-batch-size", type=int, default=4, help="validation images per process per step")
    p.add_argument("--crop-size", type=int, default=None, help="training crop (default: the preset's)")
    p.add_argument("--base-size", type=int, default=None, help="random-rescale base size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: the preset's; voc: 1e-4 as in the paper, synthetic: 1e-3)")
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                   help="per-stage lr shape (default: the preset's; voc: constant as in the paper, synthetic: cosine)")
    p.add_argument("--warmup", type=float, default=None,
                   help="fraction of each stage spent in linear warmup (default: the preset's; voc: 0, synthetic: 0.05)")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (paper: 2)")
    p.add_argument("--loss-weights", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.85, 0.15),
                   help="seg,depth weights of the joint stage (paper: 0.85,0.15)")
    p.add_argument("--joint-weighting", default="paper", choices=WEIGHTINGS,
                   help="joint-stage loss weighting: paper (fixed --loss-weights), uncertainty (Kendall 2018), dwa (Liu 2019)")
    p.add_argument("--dwa-temperature", type=float, default=2.0, help="DWA softmax temperature (Liu et al.: 2)")
    p.add_argument("--weighting-lr", type=float, default=1e-2, help="Adam lr of the uncertainty weighting's log-variances")
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip gradients to this norm (0: off)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True, help="fused Adam kernel")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate launch's setting")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU training: threads per process (default: the cores split among this machine's processes; "
                        "OMP_NUM_THREADS is not read: accelerate launch sets it to 1 on a machine with no GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model when prepared (slower on CPU: BENCHMARKS.md)")
    p.add_argument("--workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on steps per epoch of a stage given in epochs (quick runs)")
    p.add_argument("--log-every", type=int, default=10, help="log (and check the loss is finite) every N steps")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends only)")
    p.add_argument("--output-dir", default="runs/latest", help="run folder: TensorBoard, log.jsonl, metrics.json, checkpoints")
    p.add_argument("--resume", default=None, help="auto (the run folder's last checkpoint, if any) or a checkpoint PATH")
    p.add_argument("--reuse-prefixes", default=None, metavar="DIR",
                   help="a store of finished stage prefixes: start from one that matches this run up to its end, "
                        "store the ones this run finishes (run_state/prefixes.py; tools/run_tables.py uses it)")
    p.add_argument("--check-data", action="store_true", help="decode and check every sample, print a report, train nothing")
    p.add_argument("--skip-bad-samples", action="store_true", help="drop samples that fail the checks (logged, counted) "
                   "instead of stopping; decodes the whole dataset up front")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-identical resumes on GPU)")
    p.add_argument("--dist-timeout", type=float, default=1800, help="seconds a process waits in a collective for the "
                   "others before failing (bounds the hang when another process died)")
    return p


if __name__ == "__main__":
    cli_args = get_args_parser().parse_args()
    try:
        result = main(cli_args)
    except (DataError, CheckpointError, NonFiniteLossError, WriteError) as exc:  # the message says it all: no traceback
        sys.exit(f"train.py: error: {exc}")
    sys.exit(1 if cli_args.check_data and result["errors"] else 0)
