"""What machine a run ran on, in one place: tools/bench.py's JSON and tables, tools/gpu_check.py's results and
tools/run_tables.py's report name it alike; and which precisions this machine computes natively."""
import os
import platform
import time
from pathlib import Path

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # the ones that decide CPU fp32/bf16 speed
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # and int8 speed (ONNX Runtime's quantized kernels)
# ONEDNN_MAX_CPU_ISA values that leave out oneDNN's bf16 instructions: bf16 then runs emulated, however new the CPU
ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_info(wanted: tuple[str, ...] = CPU_FLAGS) -> tuple[str, list[str]]:
    """(model name, the flags of `wanted` it has) from /proc/cpuinfo; (platform.processor(), []) elsewhere."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")  # noqa: E731
    flags = set(field("flags").split())
    return field("model name") or platform.processor() or platform.machine(), [f for f in wanted if f in flags]


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 products in hardware (AVX512-BF16 or AMX) and oneDNN may use them."""
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return hardware and os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in ISAS_WITHOUT_BF16


def emulated_precisions(device: torch.device, precisions) -> dict[str, str]:
    """Of `precisions`, those the device would only emulate (their timings mean nothing), each with the reason."""
    if "bf16" not in precisions:
        return {}
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return {}
        return {"bf16": f"{torch.cuda.get_device_name(device)} has no native bf16"}
    if cpu_bf16_native():
        return {}
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    why = f"ONEDNN_MAX_CPU_ISA={cap} leaves out oneDNN's bf16 instructions" if cap and cap.upper() in ISAS_WITHOUT_BF16 \
        else "this CPU has neither AVX512-BF16 nor AMX"
    return {"bf16": f"{why}: bf16 would run emulated"}


def describe_machine(device: torch.device | str | None = None) -> dict:
    """CPU model and the flags that matter, cores, GPU, torch and Python versions, load average, time."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu, flags = cpu_info()
    info = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": cpu_bf16_native(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "load_average_start": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict | None = None) -> str:
    """describe_machine's answer as one line of text."""
    m = info or describe_machine()
    isa = f", ONEDNN_MAX_CPU_ISA={m['onednn_max_cpu_isa']}" if m["onednn_max_cpu_isa"] else ""
    return (f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads; {' '.join(m['cpu_flags']) or 'no AVX2'}"
            f"{isa}), {m.get('gpu', 'no GPU')}, torch {m['torch']}, Python {m['python']}, {m['time']}")
