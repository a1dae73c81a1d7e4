"""The INT8 export of a run (tools/export.py --int8): models/quantize.py's quantization of model.onnx, calibrated on
training images of the run's dataset, then what it costs and gains against model.onnx, measured in one process: file
size, batch-1 latency on this CPU, mIoU on the val split (evaluation/scoring.py) and how close the logits are."""
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from data import PRESETS, get_transform
from evaluation.inference import onnx_predictor
from evaluation.scoring import get_dataset, score
from models.deploy import INPUT_NAME, ONNX_INT8_NAME, ONNX_NAME, PARITY_SEED, onnx_session
from models.model import MultiDecoderModel
from models.quantize import calibration_reader, quantize

LATENCY_WARMUP = 5


def find_dataset(source: Path, dataset: str | None, data_root: str | None) -> tuple[str, Path]:
    """(preset name, data root) of the run the checkpoint comes from (its run_config.json, up to two folders above
    the checkpoint), each overridden by the flag when given. A relative data root is read from the folder the run
    was started in (the run folder minus its --output-dir), else from the current folder."""
    found = [p / "run_config.json" for p in (source, *source.parents[:2]) if (p / "run_config.json").is_file()]
    run = json.loads(found[0].read_text()) if found else {}
    dataset = dataset or run.get("dataset")
    if dataset not in PRESETS:
        why = f"its dataset {dataset!r} is not a preset" if found else f"no run_config.json above {source}"
        raise ValueError(f"--int8 calibrates on the run's dataset, but {why}: pass --dataset "
                         f"{'|'.join(sorted(PRESETS))} (and --data-root)")
    if data_root is not None:
        return dataset, Path(data_root)
    root = run.get("data_root") or PRESETS[dataset].data_root
    if root is None:
        raise ValueError(f"--dataset {dataset} has no default folder; pass --data-root")
    candidates = [Path(root)]
    out_dir = Path(run.get("output_dir") or "")
    if found and not Path(root).is_absolute() and out_dir.parts and not out_dir.is_absolute():
        run_dir = found[0].parent.resolve().parts
        if run_dir[-len(out_dir.parts):] == out_dir.parts:
            candidates.insert(0, Path(*run_dir[:-len(out_dir.parts)]) / root)
    for path in candidates:
        if path.exists():
            return dataset, path
    raise FileNotFoundError(f"the run's data root {root!r} is not at {' or '.join(map(str, candidates))}; "
                            "pass --data-root")


def calibrate(folder: Path, settings: dict) -> dict:
    """Quantize folder/model.onnx (checked against the model by export) into folder/model_int8.onnx, calibrated on
    the preset's training split read with the validation transform (each image at its own size); returns the
    settings, for the report."""
    preset = PRESETS[settings["dataset"]]
    root = settings["data_root"]
    train = preset.for_root(root).open(root, preset.train_split, get_transform(False, 0, 0), check=False)
    n = min(settings["calibration_images"], len(train))
    start = time.perf_counter()
    quant = quantize(folder / ONNX_NAME, folder / ONNX_INT8_NAME, calibration_reader(train, n),
                     settings["calibration_method"])
    return {**quant, "calibration_split": preset.train_split, "calibration_images": n, "data_root": str(root),
            "seconds": time.perf_counter() - start}


def latency(paths: dict[str, Path], size: tuple[int, int], runs: int, threads: int) -> dict:
    """Batch-1 latency of each ONNX file on the CPU, in one process: sessions built alike, warmed up, then timed
    in turns (one forward of each per round) so that load from elsewhere hits all alike; median and min in ms."""
    sessions = {k: onnx_session(p, "cpu", threads) for k, p in paths.items()}
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(PARITY_SEED)).numpy()
    times = {k: [] for k in sessions}
    for i in range(LATENCY_WARMUP + runs):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {INPUT_NAME: x})
            if i >= LATENCY_WARMUP:
                times[k].append(1e3 * (time.perf_counter() - start))
    report = {"size": list(size), "batch": 1, "runs": runs, "warmup": LATENCY_WARMUP,
              "intra_op_threads": threads or "onnxruntime default (one per core)"}
    report.update({k: {"median_ms": statistics.median(t), "min_ms": min(t)} for k, t in times.items()})
    return report


@torch.no_grad()
def agreement(fp32, int8, dataset) -> dict:
    """How close the int8 logits are to the fp32 ones on the dataset's images: max and mean |diff| relative to the
    fp32 logit scale (max |logit| of each image), and the fraction of pixels whose argmax agrees."""
    rel_max, rel_mean, same, pixels = 0.0, 0.0, 0, 0
    for i in range(len(dataset)):
        x = dataset[i]["image"].as_subclass(Tensor)[None]
        a, b = fp32(x)["seg"], int8(x)["seg"]
        scale = a.abs().max().item()
        rel_max = max(rel_max, (b - a).abs().max().item() / scale)
        rel_mean += (b - a).abs().mean().item() / scale
        same += (a.argmax(1) == b.argmax(1)).sum().item()
        pixels += a[:, 0].numel()
    return {"images": len(dataset), "max_abs_diff_rel": rel_max, "mean_abs_diff_rel": rel_mean / len(dataset),
            "argmax_agreement": same / pixels}


def scores(runs: dict, dataset, num_classes: int) -> dict:
    """mIoU, fg_mIoU and pixel accuracy of each Predictor on the dataset, scored as tools/evaluate.py scores
    (evaluation/scoring.py), and the drops from fp32 to int8."""
    metrics = {}
    for k, run in runs.items():
        m, _ = score(run, dataset, num_classes)
        metrics[k] = {key: m[key] for key in ("mIoU", "fg_mIoU", "pixel_acc")}
    metrics.update(mIoU_drop=metrics["fp32"]["mIoU"] - metrics["int8"]["mIoU"],
                   fg_mIoU_drop=metrics["fp32"]["fg_mIoU"] - metrics["int8"]["fg_mIoU"])
    return metrics


def export_int8(model: MultiDecoderModel, folder: Path, settings: dict) -> dict:
    """Write folder/model_int8.onnx beside folder/model.onnx and return the export.json section on both. settings:
    dataset, data_root, calibration_images, calibration_method, eval_images,
    latency_size (None: the first eval image's), latency_runs, threads."""
    quant = calibrate(folder, settings)
    paths = {"fp32": folder / ONNX_NAME, "int8": folder / ONNX_INT8_NAME}
    split = PRESETS[settings["dataset"]].val_split
    dataset, _, notes = get_dataset(settings["data_root"], split, model.config, settings["eval_images"],
                                    dataset=settings["dataset"])
    runs = {k: onnx_predictor(p) for k, p in paths.items()}
    metrics = {"split": split, "images": len(dataset), **scores(runs, dataset, model.config.num_classes),
               "notes": notes}
    size = settings["latency_size"] or tuple(dataset[0]["image"].shape[-2:])
    speed = latency(paths, size, settings["latency_runs"], settings["threads"])
    speed["speedup"] = speed["fp32"]["median_ms"] / speed["int8"]["median_ms"]
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    agree = agreement(runs["fp32"], runs["int8"], dataset)
    return {"file": ONNX_INT8_NAME, "quantization": quant,
            "size_bytes": {**sizes, "ratio": sizes["fp32"] / sizes["int8"]},
            "latency": speed, "metrics": metrics, "agreement": agree}


def print_int8(report: dict) -> None:
    """The fp32 vs int8 table on screen."""
    q, lat, m, a = report["quantization"], report["latency"], report["metrics"], report["agreement"]
    print(f"int8: {q['format']}, {q['weights']} weights, {q['activations']} activations, {q['calibration_method']} "
          f"calibration on {q['calibration_images']} {q['calibration_split']} images ({q['seconds']:.0f} s)")
    size = "x".join(map(str, lat["size"]))
    print(f"{'':6s}{'size MB':>10s}{'latency ms':>12s}{'mIoU':>9s}{'fg_mIoU':>9s}   "
          f"(batch 1 at {size}, median of {lat['runs']}, threads: {lat['intra_op_threads']}; "
          f"{m['split']}: {m['images']} images)")
    for k in ("fp32", "int8"):
        print(f"{k:6s}{report['size_bytes'][k] / 1e6:>10.1f}{lat[k]['median_ms']:>12.2f}"
              f"{m[k]['mIoU']:>9.4f}{m[k]['fg_mIoU']:>9.4f}")
    print(f"int8 vs fp32: {report['size_bytes']['ratio']:.2f}x smaller, {lat['speedup']:.2f}x faster, mIoU drop "
          f"{m['mIoU_drop']:+.4f}, fg_mIoU drop {m['fg_mIoU_drop']:+.4f}; argmax agrees on "
          f"{100 * a['argmax_agreement']:.2f}% of pixels, max |diff| {a['max_abs_diff_rel']:.3f} of the logit scale")
    if q.get("kept_in_float"):
        print(f"kept in float (ONNX Runtime's quantizer has no int8 form for them): {describe_float(q['kept_in_float'])}")


def describe_float(kept: dict[str, int]) -> str:
    """'HardSigmoid x8, HardSwish x19' from models.quantize.kept_in_float's counts; 'none' when empty."""
    return ", ".join(f"{op} x{n}" for op, n in kept.items()) or "none"
