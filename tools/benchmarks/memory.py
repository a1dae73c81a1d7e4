"""Peak training memory: a fresh process per case runs two steps (CPU: peak resident set above the footprint after
imports; CUDA: max_memory_allocated)."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tools.benchmarks.timing import fresh_accelerator, no_bar, sync
from tools.benchmarks.training import TrainSpec, build_train_case

MIB = 2**20
BENCH = Path(__file__).resolve().parents[1] / "bench.py"  # runs memory_child with --memory-case


def peak_memory(specs: list[TrainSpec], device: torch.device, parallel: int = 2, bar: tqdm | None = None) -> list[float]:
    """Peak memory (MiB) of fresh processes running two steps of one case each, above their footprint after imports;
    `parallel` at a time (a process's peak does not depend on its neighbours, only its time does)."""
    bar = no_bar() if bar is None else bar
    procs, peaks = [], []
    for i, spec in enumerate(specs):
        cmd = [sys.executable, str(BENCH), "--memory-case", json.dumps(asdict(spec)), "--device", device.type]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        if len(procs) - len(peaks) >= parallel or i == len(specs) - 1:
            for proc in procs[len(peaks):]:
                out, err = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"memory measurement failed:\n{err[-2000:]}")
                peaks.append(json.loads(out.strip().splitlines()[-1])["peak_mib"])
                bar.update(1)
    return peaks


def memory_child(spec: TrainSpec, device: torch.device) -> None:
    """In the child: build the case, run two steps, print the peak (CUDA: allocated; CPU: resident set)."""
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
