"""The bench's harness, the one place where anything is timed: its settings, a timed case, interleaved shuffled
rounds, synthetic batches, the progress bar's no-op stand-in, the hardware references (torch.mm and oneDNN's 3x3
convolution) timed next to the training cases, and the estimate of a run's duration."""
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from tqdm.auto import tqdm

from run_state.machine import emulated_precisions

NUM_CLASSES = 21
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16"}


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one bench run (the defaults: `python tools/bench.py`; FULL: --full)."""

    encoder: str = "resnet50"
    precisions: tuple[str, ...] = tuple(ACCELERATE_PRECISION)
    train_shapes: tuple[tuple[int, int], ...] = ((4, 256),)  # (batch, side)
    ablations: bool = False  # also --no-fused-adam and smp fp32 channels_last
    infer_side: int = 512
    infer_batches: tuple[int, ...] = (1,)
    warmup: int = 2  # untimed steps per case
    steps: int = 6  # timed steps per case ...
    rounds: int = 3  # ... spread over this many interleaved rounds
    infer_reps: int = 5  # rounds at batch 8 (3x at batch 1): the same network twice must time within a few %
    mm_side: int = 4096
    conv_shapes: tuple[tuple[int, int, int], ...] = ((4, 64, 128), (4, 256, 64), (4, 512, 32))  # (batch, ch, side)
    loader_batches: int = 30
    e2e_steps: int = 6


DEFAULT = Settings()
FULL = replace(DEFAULT, train_shapes=((4, 256), (2, 512)), ablations=True, infer_batches=(1, 8))
QUICK = Settings(encoder="resnet18", train_shapes=((2, 64),), infer_side=64, infer_batches=(1, 2), warmup=1, steps=1,
                 rounds=1, infer_reps=1, mm_side=256, conv_shapes=((2, 32, 32),), loader_batches=3, e2e_steps=2)
QUICK_FULL = replace(QUICK, ablations=True)


def choose_settings(quick: bool = False, full: bool = False, **given) -> Settings:
    """The run's sizes: QUICK / FULL / both / DEFAULT, then the fields given (None: keep)."""
    settings = {(False, False): DEFAULT, (False, True): FULL, (True, False): QUICK, (True, True): QUICK_FULL}[(quick, full)]
    return replace(settings, **{k: v for k, v in given.items() if v is not None})


def native_only(settings: Settings, device: torch.device, allow_emulated: bool = False) -> tuple[Settings, dict[str, str]]:
    """The settings without the precisions the device would only emulate (their timings mean nothing), and those
    skipped with the reason; none left is an error that says so."""
    skipped = {} if allow_emulated else emulated_precisions(device, settings.precisions)
    kept = tuple(p for p in settings.precisions if p not in skipped)
    if not kept:
        raise SystemExit(f"nothing to run: {'; '.join(f'{p}: {why}' for p, why in skipped.items())} "
                         "(--allow-emulated runs it anyway, for checking the bench, not for its numbers)")
    return replace(settings, precisions=kept), skipped


def steps_per_case(settings: Settings) -> int:
    """Warm-up and timed steps that one interleaved case runs."""
    return settings.warmup + settings.rounds * max(1, settings.steps // settings.rounds)


@dataclass
class Case:
    """Something timed: a step callable, the images and FLOPs of one step."""

    name: str
    step: Callable[[], object]
    images: int
    flops: float
    meta: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)

    def row(self) -> dict:
        t = statistics.median(self.times)
        return {"name": self.name, **self.meta, "median_s": t, "images_per_s": self.images / t if self.images else None,
                "flops_per_step": self.flops, "flops_per_s": self.flops / t, "steps_timed": len(self.times),
                "times_s": list(self.times)}


def no_bar() -> tqdm:
    """A progress bar that shows nothing (callers that pass none)."""
    return tqdm(disable=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_accelerator(precision: str, device: torch.device, compile: bool = False) -> Accelerator:
    """An Accelerator as train.py makes it; Accelerate's state is process-wide, so reset it first."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision=ACCELERATE_PRECISION[precision],
                       dynamo_backend="inductor" if compile else None)


def make_batch(batch: int, side: int, device: torch.device, seed: int = 0) -> dict:
    """Random images, labels with an ignored (255) border and depth with an invalid (NaN) border, as collate pads."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, NUM_CLASSES, (batch, side, side), generator=g)
    label[:, -side // 8:] = 255
    depth = torch.rand(batch, 1, side, side, generator=g)
    depth[..., -side // 8:, :] = float("nan")
    image = torch.randn(batch, 3, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    return {"image": image.to(device), "label": label.to(device), "depth": depth.to(device)}


def run_interleaved(cases: list[Case], settings: Settings, device: torch.device, bar: tqdm | None = None,
                    what: str = "") -> None:
    """Warm up every case, then time them in rounds so that a change in machine load hits all of them; the bar says
    `what` runs and which round."""
    bar = no_bar() if bar is None else bar
    bar.set_description(f"{what}: warm-up")
    warm_up(cases, settings.warmup, device, bar)
    for r in range(settings.rounds):
        bar.set_description(f"{what}: round {r + 1}/{settings.rounds}")
        run_round(round_order(cases, r), max(1, settings.steps // settings.rounds), device, bar)


def round_order(cases: list[Case], r: int) -> list[Case]:
    """Round r's order: a permutation drawn with seed r, so that no case always runs first or always right after the
    same other case (whose model has just filled the caches: a bias seen at batch 1)."""
    return random.Random(r).sample(cases, len(cases))


def warm_up(cases: list[Case], steps: int, device: torch.device, bar: tqdm | None = None) -> int:
    """`steps` untimed steps of each case; returns how many ran."""
    bar = no_bar() if bar is None else bar
    for case in cases:
        for _ in range(steps):
            case.step()
            bar.update(1)
        sync(device)
    return steps * len(cases)


def run_round(cases: list[Case], steps: int, device: torch.device, bar: tqdm | None = None) -> int:
    """`steps` timed steps of each case in turn; returns how many ran."""
    bar = no_bar() if bar is None else bar
    for case in cases:
        for _ in range(steps):
            tic = time.perf_counter()
            case.step()
            sync(device)
            case.times.append(time.perf_counter() - tic)
            bar.update(1)
    return steps * len(cases)


def peak_cases(settings: Settings, precision: str, device: torch.device) -> list[Case]:
    """torch.mm at mm_side and the fastest of a few 3x3 convolutions (oneDNN on CPU): what the hardware does."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    n = settings.mm_side
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    cases = [Case(f"torch.mm {n}x{n} {precision}", partial(torch.mm, a, b, out=out), 0, 2.0 * n**3,
                  {"kind": "mm", "precision": precision})]
    for bsz, ch, side in settings.conv_shapes:
        x = torch.randn(bsz, ch, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(ch, ch, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flops = 2.0 * bsz * side * side * ch * ch * 9
        cases.append(Case(f"conv3x3 {bsz}x{ch}x{side}x{side} {precision}", torch.no_grad()(partial(F.conv2d, x, w, padding=1)),
                          0, flops, {"kind": "conv", "precision": precision}))
    return cases
