"""Speed of training, inference and data loading, against segmentation_models_pytorch's Unet(resnet50), in one run.

    python tools/bench.py                          # the default run: 4x256 training, batch-1 inference
    python tools/bench.py --full                   # the full sweep: + 2x512, the ablations, batch 8, peak memory
    python tools/bench.py --json bench.json        # also every number as JSON
    python tools/bench.py --quick                  # tiny sizes, few steps: checks the bench itself in seconds
    python tools/bench.py --compile                # adds torch.compile rows (minutes of compilation)
    python tools/bench.py --device cuda --precision bf16 --train-shapes 16x256,8x512   # what tools/gpu_check.py runs

Training rows time the project's own step (train.train_step on a stage set up by train.setup_stage, with
Accelerate's mixed precision) on fixed random batches, with train.py's defaults; smp's Unet runs in the loop a user
writes (autocast, focal loss from cross entropy, PyTorch's default Adam), also with a second smp decoder. The cases of
one precision run interleaved, round by round (each round in a seeded random order), together with torch.mm, so that
their ratios see the same machine load; every number is the median of the timed steps after warm-up. A precision the
device would only emulate (bf16 on a CPU without AVX512-BF16 or AMX) is skipped, and the output says so; --full first
says about how long it will take. A progress bar (stderr) says what runs. The parts live in benchmarks/.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks import estimate, inference, loading, memory, report, training  # noqa: E402
from benchmarks.timing import ACCELERATE_PRECISION, choose_settings, native_only  # noqa: E402
from benchmarks.training import DEFAULTS, TrainSpec  # noqa: E402


def default_rows(rows: list[dict]) -> list[dict]:
    """The training rows at train.py's defaults (not the ablations): the ones whose peak memory is measured."""
    return [r for r in rows if all(r[k] == v for k, v in DEFAULTS.items())]


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = choose_settings(args.quick, args.full, encoder=args.encoder, precisions=args.precision,
                             train_shapes=args.train_shapes, infer_batches=args.infer_batches)
    settings, skipped = native_only(chosen, device, args.allow_emulated)
    for precision, why in skipped.items():
        print(f"skipping {precision}: {why}")
    try:
        import segmentation_models_pytorch  # noqa: F401  (bench-only dependency)
        with_smp = not args.no_smp
    except ImportError:
        with_smp = False
        print("segmentation_models_pytorch is not installed: no peer rows (pip install -r requirements-dev.txt)")
    with_memory = args.full if args.memory is None else args.memory
    parallel = 1 if device.type == "cuda" else 2
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": report.machine_info(device),
           "settings": asdict(settings), "skipped_precisions": skipped, "default_precision": training.default_precision()}
    n_memory = sum(len([s for s in training.train_specs(settings, p, with_smp, args.compile)
                        if all(getattr(s, k) == v for k, v in DEFAULTS.items())]) for p in settings.precisions)
    if args.full:
        unit = estimate.step_seconds(settings, device)
        seconds = estimate.planned_seconds(settings, unit, with_smp, args.compile, with_memory * n_memory, parallel)
        out["estimated_seconds"] = round(seconds)
        print(estimate.describe(seconds, unit, settings), flush=True)
    total = (training.planned_steps(settings, with_smp, args.compile) + with_memory * n_memory
             + inference.planned_steps(settings, with_smp) + loading.planned_steps(settings))
    seconds, tic = out.setdefault("seconds", {}), time.perf_counter()

    def lap(what: str) -> None:
        nonlocal tic
        seconds[what] = round(time.perf_counter() - tic, 1)
        tic = time.perf_counter()

    with tqdm(total=total, unit="step", desc="bench", dynamic_ncols=True, disable=args.no_progress) as bar:
        out["train"], out["peaks"] = training.bench_training(settings, device, with_smp, args.compile, bar)
        lap("training")
        if with_memory:
            bar.set_description("peak memory: one process per case")
            rows = default_rows(out["train"])
            specs = [TrainSpec(**{k: r[k] for k in TrainSpec.__dataclass_fields__}) for r in rows]
            for row, peak in zip(rows, memory.peak_memory(specs, device, parallel, bar)):
                row["peak_mib"] = peak
            lap("memory")
        out["inference"] = inference.bench_inference(settings, device, with_smp, bar)
        lap("inference")
        out["data"] = loading.bench_data(settings, args.data_root, device, out["default_precision"], bar)
        lap("data")
    out["machine"]["load_average_end"] = os.getloadavg()
    out["targets"] = report.targets(out)
    out["second_decoder"] = report.second_decoder(out["train"])
    print(report.render(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'4x256,2x512' -> ((4, 256), (2, 512))."""
    return tuple(tuple(int(v) for v in shape.split("x")) for shape in text.split(","))


def precisions(text: str) -> tuple[str, ...]:
    """'bf16' or 'fp32,bf16' -> a tuple of precisions the bench knows."""
    chosen = tuple(text.split(","))
    if not set(chosen) <= set(ACCELERATE_PRECISION):
        raise argparse.ArgumentTypeError(f"precisions are {', '.join(ACCELERATE_PRECISION)}, got {text!r}")
    return chosen


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training, inference and data loading speed against smp's Unet, in one run")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number to this JSON file")
    p.add_argument("--full", action="store_true",
                   help="the full sweep: training at 4x256 and 2x512, the ablations, inference at batch 1 and 8, peak "
                        "memory; says how long it will take before it starts")
    p.add_argument("--quick", action="store_true", help="tiny sizes (resnet18, 64 px) and few steps: checks the bench")
    p.add_argument("--encoder", default=None, help="ResNet of both models (default resnet50; --quick: resnet18)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--precision", default=None, type=precisions, metavar="fp32,bf16",
                   help="precisions to run (default: both, less those the device would only emulate)")
    p.add_argument("--allow-emulated", action="store_true",
                   help="also run precisions the device only emulates (bf16 on a CPU without AVX512-BF16 or AMX): "
                        "slow and meaningless as speed, for checking the bench itself")
    p.add_argument("--train-shapes", default=None, type=shapes, metavar="BxS,...",
                   help="training batch x side (default 4x256; --full: 4x256,2x512)")
    p.add_argument("--infer-batches", default=None, type=lambda s: tuple(int(b) for b in s.split(",")), metavar="B,...",
                   help="inference batch sizes (default 1; --full: 1,8)")
    p.add_argument("--data-root", default=None, help="VOC folder for the data rows (default: ../shared VOC mini, else synthetic)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for the first training shape")
    p.add_argument("--no-smp", action="store_true", help="skip the segmentation_models_pytorch rows")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory, one fresh process per training case (default: with --full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
