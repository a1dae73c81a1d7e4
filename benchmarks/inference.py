"""Inference latency: the exported seg-only model (export's weights file read back), the single-decoder model (with
and smp's Unet; eval, channels_last, inference_mode, timed in
shuffled interleaved rounds."""
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models import ModelConfig, build_model, load_model, save_model
from models.deploy import forward_flops, seg_only
from benchmarks.timing import NUM_CLASSES, Case, Settings, make_batch, no_bar, run_interleaved


def inference_models(settings: Settings, device: torch.device, with_smp: bool, tmp: Path) -> dict:
    """name -> model in eval mode, channels_last, on the device."""
    full = build_model(ModelConfig(encoder=settings.encoder, tasks=("seg", "depth")))
    save_model(seg_only(full), tmp / "exported")
    single = build_model(ModelConfig(encoder=settings.encoder, tasks=("seg",)))
    models = {"exported seg-only": load_model(tmp / "exported"), "single-decoder": single}
    if with_smp:
        import segmentation_models_pytorch as smp

        models[f"smp Unet({settings.encoder})"] = smp.Unet(settings.encoder, encoder_weights=None, classes=NUM_CLASSES)
    return {name: model.to(device).eval().to(memory_format=torch.channels_last) for name, model in models.items()}


def inference_cases(settings: Settings, device: torch.device, with_smp: bool, tmp: Path) -> list[Case]:
    """One case per model, precision and batch size."""
    models = inference_models(settings, device, with_smp, tmp)
    per_image = {name: forward_flops(model, make_batch(1, settings.infer_side, device)["image"]) for name, model in models.items()}
    cases = []
    for precision in settings.precisions:
        for b in settings.infer_batches:
            x = make_batch(b, settings.infer_side, device)["image"]
            for name, model in models.items():  # the models one after the other: compared under the same load
                step = partial(infer_step, model, x, device, precision == "bf16")
                meta = {"model": name, "precision": precision, "batch": b, "side": settings.infer_side}
                cases.append(Case(f"{name} {b}x{settings.infer_side} {precision}", step, b, per_image[name] * b, meta))
    return cases


def repetitions(settings: Settings, batch: int) -> int:
    """Timed rounds of a case: batch 1 is short and noisy, so three times as many."""
    return (3 if batch == 1 else 1) * settings.infer_reps


def planned_steps(settings: Settings, with_smp: bool) -> int:
    """Forwards (warm-up included) that bench_inference runs: the progress bar's share of it."""
    models = 2 + with_smp
    return models * len(settings.precisions) * sum(1 + repetitions(settings, b) for b in settings.infer_batches)


def bench_inference(settings: Settings, device: torch.device, with_smp: bool, bar: tqdm | None = None) -> list[dict]:
    """Every case's row: the cases of one batch size interleaved, one warm-up forward each."""
    bar = no_bar() if bar is None else bar
    with tempfile.TemporaryDirectory() as tmp:
        bar.set_description("inference: building the models")
        cases = inference_cases(settings, device, with_smp, Path(tmp))
        for b in settings.infer_batches:
            bar.set_description(f"inference batch {b}x{settings.infer_side}")
            reps = repetitions(settings, b)
            run_interleaved([c for c in cases if c.images == b], replace(settings, warmup=1, steps=reps, rounds=reps),
                            device, bar)
        return [c.row() for c in cases]


@torch.inference_mode()
def infer_step(model, x: torch.Tensor, device: torch.device, bf16: bool):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x)
