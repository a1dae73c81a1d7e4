"""Speed of training, inference and data loading, against segmentation_models_pytorch's Unet(resnet50), in one run.

    python tools/bench.py                          # the full table (about 16 minutes on 2 CPU cores)
    python tools/bench.py --json bench.json        # also every number as JSON
    python tools/bench.py --quick                  # tiny sizes, few steps: checks the bench itself in seconds
    python tools/bench.py --compile                # adds torch.compile rows (minutes of compilation)

Training rows time the project's own step (train.train_step on a stage set up by train.setup_stage, with
Accelerate's mixed precision) on fixed random batches; smp's Unet runs in the loop a user writes (autocast,
focal loss from cross entropy, PyTorch's default Adam), also with a second smp decoder. The cases of one precision run
interleaved, round by round (each round in a seeded random order), together with torch.mm, so that their ratios see
the same machine load; every number is the median of the timed steps after warm-up.
"""
import argparse
import copy
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import train  # noqa: E402
from data import PRESETS, prepare_root  # noqa: E402
from models import FocalLoss, ModelConfig, build_model, depth_loss, load_model, save_model  # noqa: E402
from models.checkpoint import TrainState  # noqa: E402
from models.decoder import DecoderBlock  # noqa: E402
from models.deploy import forward_flops, seg_only  # noqa: E402
from schedules import both, semantic  # noqa: E402

NUM_CLASSES = 21
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16"}
STAGES = {"seg": semantic(epochs=1), "both": both(epochs=1)}
VOC_MINI = Path(os.environ.get("VOC_MINI", REPO.parent / "shared" / "data" / "voc2012-mini"))
MIB = 2**20
DEFAULTS = dict(compile=False, fused_adam=True, keep_memory=True, fold=True)  # train.py's; other values: ablations


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one bench run."""

    encoder: str = "resnet50"
    train_shapes: tuple[tuple[int, int], ...] = ((4, 256), (2, 512))  # (batch, side)
    infer_side: int = 512
    infer_batches: tuple[int, ...] = (1, 8)
    warmup: int = 2  # untimed steps per case
    steps: int = 6  # timed steps per case ...
    rounds: int = 3  # ... spread over this many interleaved rounds
    infer_reps: int = 5  # rounds at batch 8 (3x at batch 1): the same network twice must time within a few %
    mm_side: int = 4096
    conv_shapes: tuple[tuple[int, int, int], ...] = ((4, 64, 128), (4, 256, 64), (4, 512, 32))  # (batch, ch, side)
    loader_batches: int = 30
    e2e_steps: int = 6


QUICK = Settings(encoder="resnet18", train_shapes=((2, 64),), infer_side=64, infer_batches=(1, 2), warmup=1, steps=1,
                 rounds=1, infer_reps=1, mm_side=256, conv_shapes=((2, 32, 32),), loader_batches=3, e2e_steps=2)


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
    keep_memory: bool = True  # ours only: train.py's --keep-freed-memory (the default) or --no-keep-freed-memory
    fold: bool = True  # ours only: the decoder folds its upsamples (always in train.py) or computes the plain way

    @property
    def process(self) -> str:
        """Which bench process runs it: the allocator setting of train.py is process-wide."""
        return "peer" if self.peer == "smp" else "ours" if self.keep_memory else "ours, default allocator"

    @property
    def name(self) -> str:
        who = (f"ours {'seg-only' if self.task == 'seg' else 'both'}" if self.peer == "ours"
               else f"smp Unet({self.encoder})" + (" + 2nd decoder" if self.task == "both" else ""))
        extra = (" compiled" if self.compile else "") + ("" if self.fused_adam else " --no-fused-adam")
        extra += ("" if self.keep_memory else " --no-keep-freed-memory") + ("" if self.fold else " unfolded decoder")
        return f"{who} {self.batch}x{self.side} {self.precision} {self.layout}{extra}"


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


def train_defaults(argv: list[str], dataset: str = "voc"):
    """train.py's settings for argv with the dataset preset's defaults (voc: the paper's)."""
    return PRESETS[dataset].fill(train.get_args_parser().parse_args(argv))


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
            for block in model.modules() if not spec.fold else ():
                if isinstance(block, DecoderBlock):
                    block.fold = None  # what the fold buys: the same network computed the plain way
            cache[key] = train.setup_stage(accelerator, model, stage, targs, None, None)[:2]
        model, optimizer = cache[key]
        counted = partial(forward_flops, accelerator.unwrap_model(model), tasks=stage.tasks)
        step = partial(train.train_step, model, optimizer, batch, accelerator, stage.tasks, stage.weights(),
                       FocalLoss(targs.focal_gamma), targs.clip_grad_norm)
    else:
        if key not in cache:
            cache[key] = smp_model(spec, device)
        model, optimizer = cache[key]
        if spec.layout == "NCHW":
            batch["image"] = batch["image"].contiguous()
        counted = partial(forward_flops, getattr(model, "_orig_mod", model))
        step = partial(smp_step, model, optimizer, batch, device, spec.precision == "bf16")
    flops_key = ("flops", spec.peer, spec.task, spec.side)  # the same for every precision and batch: count once
    if flops_key not in cache:
        cache[flops_key] = (counted(batch["image"][:1]), counted(batch["image"][:1], executed=True)) if count else (0, 0)
    per_image, executed = cache[flops_key]
    return Case(spec.name, step, spec.batch, 3 * per_image * spec.batch,
                {**asdict(spec), "forward_flops_per_image": per_image, "executed_forward_flops_per_image": executed})


class SmpWithDepth(torch.nn.Module):
    """The both stage built from smp: its Unet plus a second smp decoder and a one-channel head on the same encoder."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.depth_decoder = copy.deepcopy(unet.decoder)
        self.depth_head = torch.nn.Conv2d(unet.segmentation_head[0].in_channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.unet.encoder(x)
        return self.unet.segmentation_head(self.unet.decoder(features)), self.depth_head(self.depth_decoder(features))


def smp_model(spec: TrainSpec, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """smp.Unet with smp's default decoder (256..16, nearest upsampling), as a user would build it (task "both": with
    a second decoder for depth)."""
    import segmentation_models_pytorch as smp

    model = smp.Unet(spec.encoder, encoder_weights=None, classes=NUM_CLASSES)
    model = (SmpWithDepth(model) if spec.task == "both" else model).to(device).train()
    if spec.layout == "CL":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # as a user writes it: PyTorch's default Adam
    return (torch.compile(model) if spec.compile else model), optimizer


def peer_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Softmax focal loss as it is usually written, from cross entropy (equal to models.FocalLoss)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=255, reduction="none")
    valid = target != 255
    return ((1 - torch.exp(-ce)) ** gamma * ce).sum() / valid.sum().clamp(min=1)


def smp_step(model, optimizer, batch: dict, device: torch.device, bf16: bool) -> torch.Tensor:
    """A user's own loop: autocast forward, focal loss (+ masked depth MSE, models.depth_loss), backward, Adam."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["image"])
    if isinstance(out, tuple):
        logits, depth = out
        loss = 0.85 * peer_focal_loss(logits, batch["label"]) + 0.15 * depth_loss(depth, batch["depth"])
    else:
        loss = peer_focal_loss(out, batch["label"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


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


def run_interleaved(cases: list[Case], settings: Settings, device: torch.device) -> None:
    """Warm up every case, then time them in rounds so that a change in machine load hits all of them."""
    warm_up(cases, settings.warmup, device)
    for r in range(settings.rounds):
        run_round(round_order(cases, r), max(1, settings.steps // settings.rounds), device)


def round_order(cases: list[Case], r: int) -> list[Case]:
    """Round r's order: a permutation drawn with seed r, so that no case always runs first or always right after the
    same other case (whose model has just filled the caches: a bias of up to 6% seen at batch 1)."""
    return random.Random(r).sample(cases, len(cases))


def warm_up(cases: list[Case], steps: int, device: torch.device) -> None:
    for case in cases:
        for _ in range(steps):
            case.step()
        sync(device)


def run_round(cases: list[Case], steps: int, device: torch.device) -> None:
    """`steps` timed steps of each case in turn."""
    for case in cases:
        for _ in range(steps):
            tic = time.perf_counter()
            case.step()
            sync(device)
            case.times.append(time.perf_counter() - tic)


def train_specs(settings: Settings, precision: str, with_smp: bool, compile: bool) -> list[TrainSpec]:
    """Ours (seg-only and both stages, and what fused Adam, the allocator setting and the folded decoder buy) and,
    when installed, smp:
    fp32 NCHW (its default; channels_last too at the first shape) and bf16 channels_last (its fastest)."""
    specs, enc = [], settings.encoder
    for i, (b, s) in enumerate(settings.train_shapes):
        specs += [TrainSpec("ours", t, precision, "CL", b, s, enc) for t in STAGES]
        specs.append(TrainSpec("ours", "seg", precision, "CL", b, s, enc, keep_memory=False))
        specs += [TrainSpec("ours", t, precision, "CL", b, s, enc, fold=False) for t in STAGES]
        if i == 0:
            specs.append(TrainSpec("ours", "seg", precision, "CL", b, s, enc, fused_adam=False))
        if with_smp:
            layouts = ("NCHW", "CL") if i == 0 and precision == "fp32" else ("NCHW",) if precision == "fp32" else ("CL",)
            specs += [TrainSpec("smp", "seg", precision, layout, b, s, enc) for layout in layouts]
            specs.append(TrainSpec("smp", "both", precision, "NCHW" if precision == "fp32" else "CL", b, s, enc))
    if compile:
        b, s = settings.train_shapes[0]
        specs.append(TrainSpec("ours", "seg", precision, "CL", b, s, enc, compile=True))
        if with_smp:
            specs.append(TrainSpec("smp", "seg", precision, "CL", b, s, enc, compile=True))
    return specs


def bench_training(settings: Settings, device: torch.device, with_smp: bool, compile: bool) -> tuple[list, list]:
    """Per precision, ours and the peer in two processes (train.py's allocator setting is process-wide), timed in
    alternating rounds so that both see the same machine load; the hardware references run in the peer's."""
    train_rows, peak_rows = [], []
    context = multiprocessing.get_context("spawn")
    for precision in ACCELERATE_PRECISION:
        workers = []
        for side in dict.fromkeys([spec.process for spec in train_specs(settings, precision, with_smp, compile)] + ["peer"]):
            conn, child = context.Pipe()
            process = context.Process(target=phase_worker, args=(child, side, settings, precision, device.type, with_smp, compile))
            process.start()
            workers.append((process, conn))
        ask = partial(ask_worker, workers)
        ask("build", together=True)  # untimed: the processes build their models at the same time
        ask("warmup")
        for _ in range(settings.rounds):
            ask("round")
        for rows in ask("rows"):
            train_rows += [r for r in rows if "peer" in r]
            peak_rows += [r for r in rows if "kind" in r]
        for process, _ in workers:
            process.join()
    return train_rows, peak_rows


def ask_worker(workers: list, command: str, together: bool = False) -> list:
    """Send a command to each worker in turn, waiting for its answer before the next one starts (or not: together)."""
    replies = []
    for _, conn in workers:
        conn.send(command)
        if not together:
            replies.append(conn.recv())
    replies += [conn.recv() for _, conn in workers] if together else []
    for status, answer in replies:
        if status == "error":
            raise RuntimeError(f"bench worker failed on {command!r}:\n{answer}")
    return [answer for _, answer in replies]


def phase_worker(conn, side: str, settings: Settings, precision: str, device_type: str, with_smp: bool, compile: bool):
    """One side's training cases (ours: with train.py's allocator setting), timed on the parent's commands."""
    device, cases, rounds = torch.device(device_type), [], 0
    try:
        while (command := conn.recv()) != "rows":
            if command == "build":
                cases = build_side(side, settings, precision, device, with_smp, compile)
            elif command == "warmup":
                warm_up(cases, settings.warmup, device)
            else:
                run_round(round_order(cases, rounds), max(1, settings.steps // settings.rounds), device)
                rounds += 1
            conn.send(("ok", None))
        conn.send(("ok", [c.row() for c in cases]))
    except Exception:  # the parent raises it with the traceback
        conn.send(("error", traceback.format_exc()))


def build_side(side: str, settings: Settings, precision: str, device: torch.device, with_smp: bool, compile: bool) -> list[Case]:
    """The cases of one bench process (ours after train.py's allocator setting); the peer's also times the hardware."""
    if side == "ours" and device.type == "cpu":
        train.keep_freed_memory()
    cache = {}
    specs = [s for s in train_specs(settings, precision, with_smp, compile) if s.process == side]
    cases = [build_train_case(s, device, accelerators(precision, device, s.compile, cache) if s.peer == "ours" else None, cache)
             for s in specs]
    return cases + (peak_cases(settings, precision, device) if side == "peer" else [])


def accelerators(precision: str, device: torch.device, compile: bool, cache: dict) -> Accelerator:
    """One Accelerator per (precision, compile), made when first needed: prepared models keep their autocast."""
    key = ("accelerator", precision, compile)
    if key not in cache:
        cache[key] = fresh_accelerator(precision, device, compile)
    return cache[key]


def peak_memory(specs: list[TrainSpec], device: torch.device, parallel: int = 2) -> list[float]:
    """Peak memory (MiB) of fresh processes running two steps of one case each, above their footprint after imports;
    `parallel` at a time (a process's peak does not depend on its neighbours, only its time does)."""
    procs, peaks = [], []
    for i, spec in enumerate(specs):
        cmd = [sys.executable, __file__, "--memory-case", json.dumps(asdict(spec)), "--device", device.type]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        if len(procs) - len(peaks) >= parallel or i == len(specs) - 1:
            for proc in procs[len(peaks):]:
                out, err = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"memory measurement failed:\n{err[-2000:]}")
                peaks.append(json.loads(out.strip().splitlines()[-1])["peak_mib"])
    return peaks


def memory_child(spec: TrainSpec, device: torch.device) -> None:
    """In the child: build the case, run two steps, print the peak (CUDA: allocated; CPU: resident set)."""
    if spec.process == "ours" and device.type == "cpu":
        train.keep_freed_memory()  # as train.py does
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from here, imports excluded
    accelerator = fresh_accelerator(spec.precision, device, spec.compile) if spec.peer == "ours" else None
    case = build_train_case(spec, device, accelerator, {}, count=False)
    for _ in range(2):
        case.step()
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / MIB
    else:
        peak = (rss_kib("VmHWM") - before) / 1024
    print(json.dumps({"peak_mib": peak}))


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status, in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def inference_cases(settings: Settings, device: torch.device, with_smp: bool, tmp: Path) -> list[Case]:
    """The exported seg-only model (export's weights file read back), the single-decoder model and smp's Unet."""
    full = build_model(ModelConfig(encoder=settings.encoder, tasks=("seg", "depth")))
    save_model(seg_only(full), tmp / "exported")
    models = {"exported seg-only": load_model(tmp / "exported"),
              "single-decoder": build_model(ModelConfig(encoder=settings.encoder, tasks=("seg",)))}
    if with_smp:
        import segmentation_models_pytorch as smp

        models[f"smp Unet({settings.encoder})"] = smp.Unet(settings.encoder, encoder_weights=None, classes=NUM_CLASSES)
    models = {name: model.to(device).eval().to(memory_format=torch.channels_last) for name, model in models.items()}
    per_image = {name: forward_flops(model, make_batch(1, settings.infer_side, device)["image"]) for name, model in models.items()}
    cases = []
    for precision in ACCELERATE_PRECISION:
        for b in settings.infer_batches:
            x = make_batch(b, settings.infer_side, device)["image"]
            for name, model in models.items():  # the models one after the other: compared under the same load
                step = partial(infer_step, model, x, device, precision == "bf16")
                meta = {"model": name, "precision": precision, "batch": b, "side": settings.infer_side}
                cases.append(Case(f"{name} {b}x{settings.infer_side} {precision}", step, b, per_image[name] * b, meta))
    return cases


@torch.inference_mode()
def infer_step(model, x: torch.Tensor, device: torch.device, bf16: bool):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x)


def find_data_root(data_root: str | None) -> tuple[str, Path]:
    """--data-root, else the VOC 2012 mini set next to the repo, else the synthetic set (generated if needed)."""
    if data_root:
        return "voc", Path(data_root)
    if (VOC_MINI / "VOCdevkit" / "VOC2012").is_dir():
        return "voc", VOC_MINI / "VOCdevkit" / "VOC2012"
    return "synthetic", prepare_root("synthetic", REPO / PRESETS["synthetic"].data_root)


def loader_batches(loader):
    """Batches forever, epoch after epoch (the sampler reshuffles per epoch)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_loader(dataset: str, root: Path, batch: int, side: int, n_batches: int) -> dict:
    """Images/s of train.py's training DataLoader alone (default workers), after its first batch."""
    targs = train_defaults([], dataset)
    need_depth = (root / "PseudoDepth").is_dir()  # the joint stage reads depth too: the heavier case
    loader, _ = train.get_dataloaders(targs, PRESETS[dataset], root, need_depth, batch, side)
    batches = loader_batches(loader)
    next(batches)  # workers started, their first batches made
    tic, images = time.perf_counter(), 0
    for _ in range(n_batches):
        images += next(batches)["image"].shape[0]
    seconds = time.perf_counter() - tic
    return {"name": f"DataLoader {dataset} {batch}x{side} ({targs.workers} workers)", "dataset": dataset, "batch": batch,
            "side": side, "workers": targs.workers, "with_depth": need_depth, "images_per_s": images / seconds}


def bench_end_to_end(settings: Settings, dataset: str, root: Path, device: torch.device, precision: str) -> dict:
    """train.train_one_epoch fed by the real DataLoader: data loading and the step share the machine."""
    batch, side = settings.train_shapes[0]
    targs = train_defaults([], dataset)
    if device.type == "cpu":
        train.keep_freed_memory()  # as train.py's main does
    accelerator = fresh_accelerator(precision, device)
    loaders = train.get_dataloaders(targs, PRESETS[dataset], root, False, batch, side)
    model = build_model(ModelConfig(encoder=settings.encoder, tasks=("seg", "depth"))).to(memory_format=torch.channels_last)
    stage = STAGES["seg"]
    model, optimizer, train_dl, _ = train.setup_stage(accelerator, model, stage, targs, *loaders)
    focal = FocalLoss(targs.focal_gamma)
    for epoch, steps in enumerate((settings.warmup, settings.e2e_steps)):
        train_dl.set_epoch(epoch)
        state = TrainState(steps_per_epoch=steps)
        tic = time.perf_counter()
        train.train_one_epoch(model, optimizer, train_dl, accelerator, stage, focal, state, targs, lambda: None)
        sync(device)
        seconds = time.perf_counter() - tic
    return {"name": f"ours seg-only {batch}x{side} {precision}, train_one_epoch on {dataset} ({targs.workers} workers)",
            "batch": batch, "side": side, "precision": precision, "steps": settings.e2e_steps,
            "images_per_s": settings.e2e_steps * batch / seconds}


def default_precision() -> str:
    """What `python train.py` trains in without flags: --mixed-precision's default, else Accelerate's."""
    chosen = train.get_args_parser().parse_args([]).mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return {"no": "fp32", "bf16": "bf16"}.get(chosen, chosen)


def pick(rows: list[dict], **want) -> dict | None:
    """The first row whose fields match `want`."""
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def second_decoder(rows: list[dict]) -> list[dict]:
    """Both-stage step time / seg-only step time at train.py's defaults, for ours and (same layout) smp's."""
    out = []
    for b, s in dict.fromkeys((r["batch"], r["side"]) for r in rows):
        for p in ACCELERATE_PRECISION:
            common = dict(batch=b, side=s, precision=p, **DEFAULTS)
            ratio = {}
            for peer, layout in (("ours", "CL"), ("smp", "NCHW" if p == "fp32" else "CL")):
                seg, both = (pick(rows, peer=peer, task=t, layout=layout, **common) for t in ("seg", "both"))
                ratio[peer] = seg and both and seg["images_per_s"] / both["images_per_s"]
            out.append({"shape": f"{b}x{s}", "precision": p, **ratio})
    return out


def targets(report: dict) -> list[dict]:
    """The issue's targets as ratios of numbers from this run."""
    rows, peaks, infer, data = report["train"], report["peaks"], report["inference"], report["data"]
    dp, out = report["default_precision"], []

    def add(what: str, value: float | None, goal: str, ok: Callable[[float], bool]) -> None:
        if value is not None:
            out.append({"target": what, "value": value, "goal": goal, "met": bool(ok(value))})

    def ips(**want) -> float | None:
        row = pick(rows, **want)
        return row and row["images_per_s"]

    for b, s in {(r["batch"], r["side"]) for r in rows}:
        shape = dict(batch=b, side=s, **DEFAULTS)
        ours = {p: ips(peer="ours", task="seg", precision=p, **shape) for p in ACCELERATE_PRECISION}
        smp_default = ips(peer="smp", task="seg", precision="fp32", layout="NCHW", **shape)
        smp_best = ips(peer="smp", task="seg", precision="bf16", layout="CL", **shape)
        if smp_default:
            add(f"{b}x{s} seg-only step, default ({dp}) / smp fp32 NCHW", ours[dp] / smp_default, ">= 1", lambda v: v >= 1)
        if smp_best:
            add(f"{b}x{s} seg-only step, bf16 / smp channels_last + bf16", ours["bf16"] / smp_best, ">= 1", lambda v: v >= 1)
        for p in ACCELERATE_PRECISION:
            both_ips = ips(peer="ours", task="both", precision=p, **shape)
            add(f"{b}x{s} both-stage step time / seg-only, {p}", ours[p] / both_ips, "<= 1.4", lambda v: v <= 1.4)
        mm = pick(peaks, kind="mm", precision="bf16")
        seg = pick(rows, peer="ours", task="seg", precision="bf16", **shape)
        add(f"{b}x{s} training FLOP/s bf16 / torch.mm bf16", seg["flops_per_s"] / mm["flops_per_s"], ">= 0.75", lambda v: v >= 0.75)
        loader = pick(data, batch=b, side=s, kind="loader")
        if loader:
            add(f"{b}x{s} data loading / training step ({dp}) images/s", loader["images_per_s"] / ours[dp], ">= 3", lambda v: v >= 3)
    for p in ACCELERATE_PRECISION:
        for b in sorted({r["batch"] for r in infer}):
            exp, single = (pick(infer, model=m, precision=p, batch=b) for m in ("exported seg-only", "single-decoder"))
            add(f"exported / single-decoder latency, batch {b} {p}", exp["median_s"] / single["median_s"], "<= 1.03",
                lambda v: v <= 1.03)
    return sorted(out, key=lambda t: t["target"])


def machine_info(device: torch.device) -> dict:
    """What the numbers came from."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device.type, "cpu_bf16": torch.cpu._is_avx512_bf16_supported(),
            "cpu_amx": torch.cpu._is_amx_tile_supported(), "load_average_start": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import segmentation_models_pytorch as smp

        info["segmentation_models_pytorch"] = smp.__version__
    except ImportError:
        pass
    return info


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (pastes into BENCHMARKS.md as it is)."""
    cells = [[f"{c:,.1f}" if isinstance(c, float) and abs(c) >= 100 else f"{c:.3g}" if isinstance(c, float) else str(c)
              for c in row] for row in rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *cells])


def ratio(value: float | None) -> str:
    """Three decimals, so that a ratio just over its goal does not print as the goal."""
    return "-" if value is None else f"{value:,.1f}" if value >= 100 else f"{value:.3f}"


def render(report: dict) -> str:
    """The run as Markdown tables."""
    mm = {r["precision"]: r["flops_per_s"] for r in report["peaks"] if r["kind"] == "mm"}
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), device {m['device']}"
             f"{', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}; load average {m['load_average_start'][0]:.2f} "
             f"at start, {m['load_average_end'][0]:.2f} at end; default precision of train.py here: {report['default_precision']}; "
             f"seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()),
             "", "Training step (fixed batches; FLOP/s = 3x the network's forward FLOPs per second; executed: what our folded "
             "decoder computes):", "",
             table(["case", "img/s", "ms/step", "GFLOP/img fwd", "executed", "GFLOP/s", "% of mm peak", "peak MiB"],
                   [[r["name"], r["images_per_s"], 1e3 * r["median_s"], r["forward_flops_per_image"] / 1e9,
                     r["executed_forward_flops_per_image"] / 1e9, r["flops_per_s"] / 1e9,
                     100 * r["flops_per_s"] / mm[r["precision"]], r.get("peak_mib", "-")] for r in report["train"]]),
             "", "Hardware references, same run:", "",
             table(["operation", "GFLOP/s", "ms"], [[r["name"], r["flops_per_s"] / 1e9, 1e3 * r["median_s"]] for r in report["peaks"]]),
             "", "Inference (eval, channels_last, inference_mode; median latency):", "",
             table(["model", "batch x side", "precision", "ms", "img/s", "GFLOP/s"],
                   [[r["model"], f"{r['batch']}x{r['side']}", r["precision"], 1e3 * r["median_s"], r["images_per_s"],
                     r["flops_per_s"] / 1e9] for r in report["inference"]]),
             "", "Data loading (train.py's loader):", "",
             table(["what", "img/s"], [[r["name"], r["images_per_s"]] for r in report["data"]]),
             "", "Targets:", "",
             table(["target", "measured", "goal", "met"],
                   [[t["target"], ratio(t["value"]), t["goal"], "yes" if t["met"] else "NO"] for t in report["targets"]])]
    if report.get("second_decoder"):
        lines += ["", "What a second decoder costs (both-stage step time / seg-only step time), ours and smp's:", "",
                  table(["shape", "precision", "ours", "smp"],
                        [[r["shape"], r["precision"], ratio(r["ours"]), ratio(r["smp"])] for r in report["second_decoder"]])]
    if m["device"] == "cpu":
        lines += ["", "No GPU in this run: the GPU rows are missing, not zero."]
    return "\n".join(lines)


def lap_seconds(clock: list[float]) -> float:
    """Seconds since the previous lap."""
    clock.append(time.perf_counter())
    return round(clock[-1] - clock[-2], 1)


def main(args: argparse.Namespace) -> dict:
    settings = QUICK if args.quick else Settings()
    settings = replace(settings, encoder=args.encoder or settings.encoder)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.memory_case:
        return memory_child(TrainSpec(**json.loads(args.memory_case)), device)
    try:
        import segmentation_models_pytorch  # noqa: F401  (bench-only dependency)
        with_smp = not args.no_smp
    except ImportError:
        with_smp = False
        print("segmentation_models_pytorch is not installed: no peer rows (pip install -r requirements-dev.txt)")
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine_info(device),
              "settings": asdict(settings), "default_precision": default_precision()}
    seconds, clock = report.setdefault("seconds", {}), [time.perf_counter()]
    lap = partial(lap_seconds, clock)
    report["train"], report["peaks"] = bench_training(settings, device, with_smp, args.compile)
    seconds["training"] = lap()
    if args.memory:
        rows = [r for r in report["train"] if all(r[k] == v for k, v in DEFAULTS.items())]  # not the ablations
        specs = [TrainSpec(**{k: r[k] for k in TrainSpec.__dataclass_fields__}) for r in rows]
        for row, peak in zip(rows, peak_memory(specs, device, parallel=1 if device.type == "cuda" else 2)):
            row["peak_mib"] = peak
        seconds["memory"] = lap()
    with tempfile.TemporaryDirectory() as tmp:
        cases = inference_cases(settings, device, with_smp, Path(tmp))
        small = [c for c in cases if c.images == 1]  # short and noisy: three times the repetitions
        for group, reps in ((small, 3 * settings.infer_reps), ([c for c in cases if c.images > 1], settings.infer_reps)):
            run_interleaved(group, replace(settings, warmup=1, steps=reps, rounds=reps), device)
        report["inference"] = [c.row() for c in cases]
    seconds["inference"] = lap()
    dataset, root = find_data_root(args.data_root)
    root = prepare_root(dataset, root)
    report["data"] = [{"kind": "loader", **bench_loader(dataset, root, b, s, settings.loader_batches)} for b, s in settings.train_shapes]
    report["data"].append({"kind": "end-to-end", **bench_end_to_end(settings, dataset, root, device, report["default_precision"])})
    seconds["data"] = lap()
    report["machine"]["load_average_end"] = os.getloadavg()
    report["targets"] = targets(report)
    report["second_decoder"] = second_decoder(report["train"])
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training, inference and data loading speed against smp's Unet, in one run")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes (resnet18, 64 px) and few steps: checks the bench")
    p.add_argument("--encoder", default=None, help="ResNet of both models (default resnet50; --quick: resnet18)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--data-root", default=None, help="VOC folder for the data rows (default: ../shared VOC mini, else synthetic)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for the first training shape")
    p.add_argument("--no-smp", action="store_true", help="skip the segmentation_models_pytorch rows")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory, one fresh process per training case")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: the child of peak_memory
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
