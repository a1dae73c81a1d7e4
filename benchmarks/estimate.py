"""How long a bench run will take, said before it starts (tools/bench.py --full): one training step of ours is timed,
and every planned step is costed from it by its pixels. A rough figure, and the output says so."""
import time

import torch

from benchmarks import inference, loading, training
from benchmarks.timing import Settings, steps_per_case

BOTH_COST = 1.4  # a both-stage step against a seg-only one: about their FLOPs' ratio
FORWARD_COST = 1 / 3  # an inference forward against a training step (forward + backward) of the same pixels
CASE_SECONDS = 2.0  # building one case: its model, optimizer and FLOP count
SPAWN_SECONDS = 15.0  # a fresh process of the peak-memory measurement: interpreter, torch and train.py imported
LOADER_IMAGE_SECONDS = 0.02  # one training image decoded and augmented by the DataLoader
UNCERTAINTY = 0.5  # machine load, bf16 counted as fast as fp32, smp counted as fast as ours


def step_seconds(settings: Settings, device: torch.device) -> float:
    """Seconds of one training step of ours (seg-only, fp32) at the first training shape, after one untimed step."""
    batch, side = settings.train_shapes[0]
    spec = training.TrainSpec("ours", "seg", "fp32", "CL", batch, side, settings.encoder)
    case = training.build_train_case(spec, device, training.accelerators("fp32", device, False, {}), {}, count=False)
    case.step()
    tic = time.perf_counter()
    case.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tic


def planned_seconds(settings: Settings, unit: float, with_smp: bool, compile: bool, memory_cases: int,
                    parallel: int) -> float:
    """The run's seconds when a training step of B images of side S costs unit * B * S^2 / (B0 * S0^2)."""
    b0, s0 = settings.train_shapes[0]
    per_pixel = unit / (b0 * s0 * s0)
    seconds = 0.0
    for precision in settings.precisions:
        specs = training.train_specs(settings, precision, with_smp, compile)
        for spec in specs:
            cost = per_pixel * spec.batch * spec.side**2 * (BOTH_COST if spec.task == "both" else 1.0)
            seconds += CASE_SECONDS + steps_per_case(settings) * cost
        seconds += steps_per_case(settings) * unit  # torch.mm and the convolutions: about one step's FLOPs together
        models = 2 + with_smp
        for b in settings.infer_batches:
            forwards = 1 + inference.repetitions(settings, b)
            seconds += models * forwards * FORWARD_COST * per_pixel * b * settings.infer_side**2
    seconds += memory_cases * (SPAWN_SECONDS + 3 * unit) / parallel
    loader_images = sum(b for b, _ in settings.train_shapes) * settings.loader_batches
    seconds += loader_images * LOADER_IMAGE_SECONDS + (loading.planned_steps(settings) - settings.loader_batches
                                                       * len(settings.train_shapes)) * unit
    return seconds


def describe(seconds: float, unit: float, settings: Settings) -> str:
    """The estimate in words, with its uncertainty."""
    b, s = settings.train_shapes[0]
    low, high = seconds * (1 - UNCERTAINTY), seconds * (1 + UNCERTAINTY)
    return (f"estimated duration: about {seconds / 60:.0f} min (likely {low / 60:.0f} to {high / 60:.0f} min), from "
            f"one timed training step of ours at {b}x{s} fp32 ({unit:.2f} s) scaled to every planned step by its "
            f"pixels; machine load, bf16 and smp's speed are not in it")
