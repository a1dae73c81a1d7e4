"""Training-step speed: the project's own step (train.train_step on a stage set up by train.setup_stage, with
Accelerate's mixed precision) against smp's Unet in a user's loop (peer.py), on fixed random batches. The cases of one
precision run interleaved round by round in one process, together with the hardware references, so that their
ratios see the same machine load."""
import gc
import os
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

import train
from data import PRESETS
from models import FocalLoss, ModelConfig, build_model
from models.deploy import forward_flops
from schedules import both, semantic
from benchmarks.peer import smp_model, smp_step
from benchmarks.timing import (Case, Settings, fresh_accelerator, make_batch, no_bar, peak_cases, run_interleaved,
                               steps_per_case)

STAGES = {"seg": semantic(epochs=1), "both": both(epochs=1)}
DEFAULTS = dict(compile=False, fused_adam=True)  # train.py's; other values: ablations


@dataclass(frozen=True)
class TrainSpec:
    """One training case: whose model, which stage, precision, memory layout and batch."""

    peer: str  # "ours" | "smp"
    task: str  # "seg" (seg-only stage) | "both"
    precision: str  # "fp32" | "bf16"
    layout: str  # "CL" (channels_last) | "NCHW"
    batch: int
    side: int
    encoder: str
    compile: bool = False
    fused_adam: bool = True  # ours only: train.py's --fused-adam (the default) or --no-fused-adam

    @property
    def name(self) -> str:
        who = (f"ours {'seg-only' if self.task == 'seg' else 'both'}" if self.peer == "ours"
               else f"smp Unet({self.encoder})" + (" + 2nd decoder" if self.task == "both" else ""))
        extra = (" compiled" if self.compile else "") + ("" if self.fused_adam else " --no-fused-adam")
        return f"{who} {self.batch}x{self.side} {self.precision} {self.layout}{extra}"


def train_defaults(argv: list[str], dataset: str = "voc"):
    """train.py's settings for argv with the dataset preset's defaults (voc: the paper's)."""
    return PRESETS[dataset].fill(train.get_args_parser().parse_args(argv))


def default_precision() -> str:
    """What `python train.py` trains in without flags: --mixed-precision's default, else Accelerate's."""
    chosen = train.get_args_parser().parse_args([]).mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return {"no": "fp32", "bf16": "bf16"}.get(chosen, chosen)


def build_train_case(spec: TrainSpec, device: torch.device, accelerator: Accelerator | None, cache: dict,
                     count: bool = True) -> Case:
    """The project's step (train.train_step after train.setup_stage) or smp's Unet in a plain loop; FLOPs if `count`."""
    batch = make_batch(spec.batch, spec.side, device)
    key = replace(spec, batch=0, side=0)  # one model (and optimizer) per key, shared by the batch sizes
    if spec.peer == "ours":
        targs = train_defaults([] if spec.fused_adam else ["--no-fused-adam"])
        stage = STAGES[spec.task]
        if key not in cache:
            model = build_model(ModelConfig(encoder=spec.encoder, tasks=("seg", "depth"))).to(memory_format=torch.channels_last)
            cache[key] = train.setup_stage(accelerator, model, stage, targs, None, None)[:2]
        model, optimizer = cache[key]
        counted = partial(forward_flops, accelerator.unwrap_model(model), tasks=stage.tasks)
        criterion = train.Criterion(FocalLoss(targs.focal_gamma), stage.weights())
        step = partial(train.train_step, model, criterion, optimizer, batch, accelerator, stage.tasks,
                       targs.clip_grad_norm)
    else:
        if key not in cache:
            cache[key] = smp_model(spec.encoder, spec.task, spec.layout, spec.compile, device)
        model, optimizer = cache[key]
        if spec.layout == "NCHW":
            batch["image"] = batch["image"].contiguous()
        counted = partial(forward_flops, getattr(model, "_orig_mod", model))
        step = partial(smp_step, model, optimizer, batch, device, spec.precision == "bf16")
    flops_key = ("flops", spec.peer, spec.task, spec.side)  # the same for every precision and batch
    if flops_key not in cache:
        cache[flops_key] = counted(batch["image"][:1]) if count else 0
    per_image = cache[flops_key]
    return Case(spec.name, step, spec.batch, 3 * per_image * spec.batch, {**asdict(spec), "forward_flops_per_image": per_image})


def train_specs(settings: Settings, precision: str, with_smp: bool, compile: bool) -> list[TrainSpec]:
    """Ours (seg-only and both stages, with train.py's defaults) and, when installed, smp: fp32 NCHW (its default)
    and bf16 channels_last (its fastest). settings.ablations adds what fused Adam and, for smp, channels_last at fp32
    buy."""
    specs, enc = [], settings.encoder
    for i, (b, s) in enumerate(settings.train_shapes):
        specs += [TrainSpec("ours", t, precision, "CL", b, s, enc) for t in STAGES]
        if settings.ablations and i == 0:
            specs.append(TrainSpec("ours", "seg", precision, "CL", b, s, enc, fused_adam=False))
        if with_smp:
            layouts = ("NCHW", "CL")[: 1 + (settings.ablations and i == 0)] if precision == "fp32" else ("CL",)
            specs += [TrainSpec("smp", "seg", precision, layout, b, s, enc) for layout in layouts]
            specs.append(TrainSpec("smp", "both", precision, "NCHW" if precision == "fp32" else "CL", b, s, enc))
    if compile:
        b, s = settings.train_shapes[0]
        specs.append(TrainSpec("ours", "seg", precision, "CL", b, s, enc, compile=True))
        if with_smp:
            specs.append(TrainSpec("smp", "seg", precision, "CL", b, s, enc, compile=True))
    return specs


def planned_steps(settings: Settings, with_smp: bool, compile: bool) -> int:
    """Steps (warm-up included) that bench_training runs: the progress bar's share of it."""
    cases = sum(len(train_specs(settings, p, with_smp, compile)) + 1 + len(settings.conv_shapes)
                for p in settings.precisions)
    return cases * steps_per_case(settings)


def build_cases(settings: Settings, precision: str, device: torch.device, with_smp: bool, compile: bool) -> list[Case]:
    """Every training case of one precision, then the hardware references of that precision."""
    cache = {}
    cases = [build_train_case(s, device, accelerators(precision, device, s.compile, cache) if s.peer == "ours" else None,
                              cache) for s in train_specs(settings, precision, with_smp, compile)]
    return cases + peak_cases(settings, precision, device)


def accelerators(precision: str, device: torch.device, compile: bool, cache: dict) -> Accelerator:
    """One Accelerator per (precision, compile), made when first needed: prepared models keep their autocast."""
    key = ("accelerator", precision, compile)
    if key not in cache:
        cache[key] = fresh_accelerator(precision, device, compile)
    return cache[key]


def bench_training(settings: Settings, device: torch.device, with_smp: bool, compile: bool,
                   bar: tqdm | None = None) -> tuple[list, list]:
    """Per precision, ours, the peer and the hardware references in this process, timed in interleaved rounds so that
    all see the same machine load: the training rows and the hardware rows."""
    train_rows, peak_rows = [], []
    bar = no_bar() if bar is None else bar
    for precision in settings.precisions:
        bar.set_description(f"training {precision}: building the cases")
        cases = build_cases(settings, precision, device, with_smp, compile)
        run_interleaved(cases, settings, device, bar, what=f"training {precision}")
        rows = [c.row() for c in cases]
        train_rows += [r for r in rows if "peer" in r]
        peak_rows += [r for r in rows if "kind" in r]
        del cases
        gc.collect()  # this precision's models and optimizer states go before the next one's are built
    return train_rows, peak_rows
