"""Shared fixtures: offline Hugging Face, the repo on sys.path, a tiny synthetic VOC set, the real VOC mini set."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# CI points this at ../shared/data/voc2012-mini; tests that need it skip when it is absent
VOC_MINI = Path(os.environ.get("VOC_MINI", REPO.parent / "shared" / "data" / "voc2012-mini"))


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """A small synthetic VOC-format folder (instances and pseudo depth included), made once per session."""
    from data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("syn") / "voc", num_train=16, num_val=7, size=64, seed=0)


@pytest.fixture()
def voc_mini() -> Path:
    """The real VOC 2012 mini set from ../shared; skip when it is not there."""
    root = VOC_MINI / "VOCdevkit" / "VOC2012"
    if not root.is_dir():
        pytest.skip(f"VOC mini set not found at {VOC_MINI} (set VOC_MINI)")
    return root


@pytest.fixture()
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it so each in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def free_port() -> int:
    """A port nobody listens on now (other test sessions may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def launch_two_ranks():
    """launch(script, *args, cwd=..., env=..., timeout=...): the script under `accelerate launch --multi_gpu
    --num_processes 2` on the CPU (two gloo ranks, one thread each) on a free port. Another process may take that
    port between the check and the bind: such a launch (EADDRINUSE) is tried once more, on another port."""

    def launch(script, *args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
        for attempt in range(2):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), str(script), *map(str, args)]
            proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                  capture_output=True, text=True, timeout=timeout)
            if attempt or "address already in use" not in proc.stderr.lower():
                return proc

    return launch
