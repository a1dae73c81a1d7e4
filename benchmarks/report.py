"""The run's report: the issue's targets and a second decoder's cost as ratios of numbers from the same run, what
machine they came from, and the Markdown tables that paste into BENCHMARKS.md."""
from typing import Callable

import torch

from benchmarks.training import DEFAULTS
from run_state.machine import describe_machine, machine_line


def pick(rows: list[dict], **want) -> dict | None:
    """The first row whose fields match `want`."""
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def div(a: float | None, b: float | None) -> float | None:
    """a / b, None where either is missing (a precision or peer not run)."""
    return a / b if a is not None and b else None


def precisions(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["precision"] for r in rows))


def second_decoder(rows: list[dict]) -> list[dict]:
    """Both-stage step time / seg-only step time at train.py's defaults, for ours and (same layout) smp's."""
    out = []
    for b, s in dict.fromkeys((r["batch"], r["side"]) for r in rows):
        for p in precisions(rows):
            common = dict(batch=b, side=s, precision=p, **DEFAULTS)
            ratio = {}
            for peer, layout in (("ours", "CL"), ("smp", "NCHW" if p == "fp32" else "CL")):
                seg, both = (pick(rows, peer=peer, task=t, layout=layout, **common) for t in ("seg", "both"))
                ratio[peer] = seg and both and seg["images_per_s"] / both["images_per_s"]
            out.append({"shape": f"{b}x{s}", "precision": p, **ratio})
    return out


def targets(report: dict) -> list[dict]:
    """The issue's targets as ratios of numbers from this run (those whose rows ran)."""
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
        ours = {p: ips(peer="ours", task="seg", precision=p, **shape) for p in precisions(rows)}
        smp_default = ips(peer="smp", task="seg", precision="fp32", layout="NCHW", **shape)
        smp_best = ips(peer="smp", task="seg", precision="bf16", layout="CL", **shape)
        add(f"{b}x{s} seg-only step, default ({dp}) / smp fp32 NCHW", div(ours.get(dp), smp_default), ">= 1", lambda v: v >= 1)
        add(f"{b}x{s} seg-only step, bf16 / smp channels_last + bf16", div(ours.get("bf16"), smp_best), ">= 1", lambda v: v >= 1)
        for p in ours:
            both_ips = ips(peer="ours", task="both", precision=p, **shape)
            add(f"{b}x{s} both-stage step time / seg-only, {p}", div(ours[p], both_ips), "<= 1.4", lambda v: v <= 1.4)
        mm = pick(peaks, kind="mm", precision="bf16")
        seg = pick(rows, peer="ours", task="seg", precision="bf16", **shape)
        add(f"{b}x{s} training FLOP/s bf16 / torch.mm bf16", div(seg and seg["flops_per_s"], mm and mm["flops_per_s"]),
            ">= 0.75", lambda v: v >= 0.75)
        loader = pick(data, batch=b, side=s, kind="loader")
        add(f"{b}x{s} data loading / training step ({dp}) images/s", div(loader and loader["images_per_s"], ours.get(dp)),
            ">= 3", lambda v: v >= 3)
    for p in precisions(infer):
        for b in sorted({r["batch"] for r in infer}):
            exp, single = (pick(infer, model=m, precision=p, batch=b) for m in ("exported seg-only", "single-decoder"))
            add(f"exported / single-decoder latency, batch {b} {p}", exp["median_s"] / single["median_s"], "<= 1.03",
                lambda v: v <= 1.03)
    return sorted(out, key=lambda t: t["target"])


def machine_info(device: torch.device) -> dict:
    """What the numbers came from (run_state.machine.describe_machine) and the peer's version."""
    info = describe_machine(device)
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
    skipped = "".join(f"; {p} skipped: {why}" for p, why in report.get("skipped_precisions", {}).items())
    lines = [f"machine: {machine_line(m)}, device {m['device']}; load average {m['load_average_start'][0]:.2f} "
             f"at start, {m['load_average_end'][0]:.2f} at end; default precision of train.py here: "
             f"{report['default_precision']}{skipped}; command: {report['command']}; "
             f"seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()),
             "", "Training step (fixed batches; FLOP/s = 3x the network's forward FLOPs per second):", "",
             table(["case", "img/s", "ms/step", "GFLOP/img fwd", "GFLOP/s", "% of mm peak", "peak MiB"],
                   [[r["name"], r["images_per_s"], 1e3 * r["median_s"], r["forward_flops_per_image"] / 1e9,
                     r["flops_per_s"] / 1e9,
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
