"""Device-aware speed choices, in one place: what train.py, tools/evaluate.py, tools/predict.py and tools/bench.py
turn on for the device they run on. Each choice is on only where a measurement shows it is faster (BENCHMARKS.md);
elsewhere the plain PyTorch way runs until someone measures (tools/gpu_check.py on a GPU).

- The decoder's upsample folds (models/decoder.py, section "Folds"): `use_folds`, `apply_folds`.
- glibc's allocator kept from returning freed memory to the OS (CPU): `use_keep_freed_memory`, `keep_freed_memory`.
- Thread counts: none set anywhere; PyTorch's default (one intra-op thread per core) is what was measured.
  tools/run_tables.py splits the cores between parallel runs (OMP_NUM_THREADS), a choice of that tool, not of a run.
"""
import ctypes
import sys

from torch import nn

from models.decoder import DecoderBlock

FOLD_CHOICES = ("auto", "on", "off")
FOLDS_MEASURED_FASTER = ("cpu",)  # device types where BENCHMARKS.md shows the folds are faster


def use_folds(device_type: str, choice: str = "auto") -> bool:
    """Whether the decoder folds its upsamples on `device_type` ("cpu", "cuda", ...): "on" and "off" force it;
    "auto" folds only where a measurement shows the folds are faster, i.e. on the CPU (BENCHMARKS.md, "The folded
    decoder": the seg-only training step 1.09-1.14x, the both step 1.13-1.22x as fast on 2 cores). CUDA and
    anything else: the plain upsample + 3x3 convolution (smp's block) until measured (tools/gpu_check.py runs the
    bench's rows with the folds on and off)."""
    if choice not in FOLD_CHOICES:
        raise ValueError(f"folds must be one of {FOLD_CHOICES}, got {choice!r}")
    return choice == "on" or (choice == "auto" and device_type in FOLDS_MEASURED_FASTER)


def apply_folds(model: nn.Module, on: bool) -> None:
    """Every DecoderBlock of `model` folds by its preferred fold (the first block "products", the others
    "transposed") if `on`, else computes the plain way (fold None). Reversible: the preferred fold stays on the block.
    Parameters and outputs do not change (to float rounding): a speed choice only."""
    for block in model.modules():
        if isinstance(block, DecoderBlock):
            block.fold = block.preferred_fold if on else None


def use_keep_freed_memory(device_type: str, on: bool = True) -> bool:
    """Whether `keep_freed_memory` applies: a CPU run with --keep-freed-memory (the default). On CUDA the tensors live
    in PyTorch's caching allocator, which already reuses freed blocks; glibc's settings would change nothing."""
    return on and device_type == "cpu"


def keep_freed_memory() -> bool:
    """glibc: serve big tensors from the heap and keep what a step frees for the next one, instead of returning it to
    the OS and faulting in (and zeroing) fresh pages every step (CPU steps 10-20% faster: BENCHMARKS.md). Else a no-op.
    Only meaningful on the CPU (see use_keep_freed_memory); process-wide, and the process keeps its peak memory."""
    try:
        libc = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
    except OSError:  # not glibc (musl)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc and libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))
