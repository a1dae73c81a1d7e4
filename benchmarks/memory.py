"""Peak training memory: a fresh process per case runs two steps (CPU: peak resident set above the footprint after
imports; CUDA: max_memory_allocated). The processes are spawned by multiprocessing and run `memory_child`."""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.timing import fresh_accelerator, no_bar, sync
from benchmarks.training import TrainSpec, build_train_case

MIB = 2**20


def peak_memory(specs: list[TrainSpec], device: torch.device, parallel: int = 2, bar: tqdm | None = None) -> list[float]:
    """Peak memory (MiB) of fresh processes running two steps of one case each, above their footprint after imports;
    `parallel` at a time (a process's peak does not depend on its neighbours, only its time does)."""
    bar = no_bar() if bar is None else bar
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing allocated before the case
    with ProcessPoolExecutor(parallel, mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(memory_child, spec, device.type) for spec in specs]
        peaks = []
        for future in futures:
            peaks.append(future.result())
            bar.update(1)
    return peaks


def memory_child(spec: TrainSpec, device_type: str) -> float:
    """In the child: build the case, run two steps, return the peak in MiB (CUDA: allocated; CPU: resident set)."""
    device = torch.device(device_type)
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from here, imports excluded
    accelerator = fresh_accelerator(spec.precision, device, spec.compile) if spec.peer == "ours" else None
    case = build_train_case(spec, device, accelerator, {}, count=False)
    for _ in range(2):
        case.step()
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return (rss_kib("VmHWM") - before) / 1024


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status, in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])
