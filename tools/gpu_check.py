"""The GPU check, one script of at most 8 minutes: tools/bench.py on CUDA (bf16, 16x256 and 8x512 training, ours
against smp's Unet if installed) and a real bf16 training of the default run (synthetic set,
schedule d_s_b with --copy-weights, stopped at --train-timeout). Writes everything to one Markdown file to
paste into BENCHMARKS.md ("On a GPU").

    python tools/gpu_check.py                          # on a GPU machine: bench-out/gpu_check/results.md
    python tools/gpu_check.py --out DIR --memory       # elsewhere; + peak memory rows (a process per case, ~2 min)
    python tools/gpu_check.py --device cpu --quick     # checks the script itself on a CPU in a minute or two
    python tools/gpu_check.py --dry-run                # prints the two commands it runs

smp is a bench-only dependency (pip install segmentation-models-pytorch): without it the peer rows are missing.
"""
import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from data.synthetic import make_synthetic  # noqa: E402
from run_state.machine import describe_machine, machine_line  # noqa: E402

TRAIN_SHAPES = "16x256,8x512"
EPOCH_LINE = re.compile(r"stage \d+ \(\w+\) epoch \d+: [a-z_]+=[^%]*$")  # after validation (not the epoch's bar)


def kill_group(pid: int) -> None:
    """SIGKILL a process group (the time limit), if it has not ended meanwhile."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_logged(cmd: list[str], log: Path, timeout: float, stdout: Path | None = None) -> dict:
    """Run cmd (its own process group: a timeout ends its children too), stderr (and stdout unless `stdout`) to
    `log`; the seconds since start of every epoch line train.py prints. Returns rc, seconds, timed_out, epoch_s."""
    tic, epochs = time.perf_counter(), []
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err if stdout else subprocess.STDOUT,
                                text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        timer = threading.Timer(timeout, kill_group, (proc.pid,))
        timer.start()
        for line in proc.stdout:
            (out if stdout else err).write(line)
            if EPOCH_LINE.search(line):
                epochs.append(round(time.perf_counter() - tic, 1))
        proc.wait()
        timer.cancel()
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - tic, 1),
            "timed_out": proc.returncode == -signal.SIGKILL, "epoch_s": epochs}


def bench_command(args: argparse.Namespace, out: Path) -> list[str]:
    # --quick checks the script: on a CPU without native bf16 its bf16 runs emulated, which is all that check needs
    sizes = ["--quick", "--allow-emulated"] if args.quick else ["--train-shapes", TRAIN_SHAPES, "--infer-batches", "1,8"]
    return [sys.executable, "tools/bench.py", "--device", args.device, "--precision", "bf16", *sizes,
            "--memory" if args.memory else "--no-memory", "--no-progress", "--json", str(out / "bench.json")]


def train_command(args: argparse.Namespace, run: Path, data_root: Path | None) -> list[str]:
    """accelerate launch train.py --schedule d_s_b --copy-weights --mixed-precision bf16, one process."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    cmd = [*launch, "train.py", "--schedule", "d_s_b", "--copy-weights", "--mixed-precision", "bf16",
           "--output-dir", str(run)]
    epochs = args.train_epochs or (1 if args.quick else None)  # None: the preset's
    max_steps = args.max_steps_per_epoch or (1 if args.quick else None)
    cmd += ["--stage-epochs", str(epochs)] if epochs else []
    cmd += ["--max-steps-per-epoch", str(max_steps)] if max_steps else []
    cmd += ["--cpu"] if args.device == "cpu" else []
    if data_root is not None:  # --quick: a tiny set and model
        cmd += ["--data-root", str(data_root), "--encoder", "resnet18", "--crop-size", "64", "--base-size", "64",
                "--batch-size", "4", "--val-batch-size", "4", "--workers", "0"]
    return cmd


def training_section(cmd: list[str], result: dict, run: Path) -> list[str]:
    """The training run as Markdown: command, wall time, one row per epoch from log.jsonl, the final metrics."""
    lines = ["## Training: the default run in bf16", "", f"`{' '.join(cmd[cmd.index('train.py'):])}` "
             f"(`accelerate launch`, one process): exit code {result['rc']}"
             + (" (stopped at the time limit)" if result["timed_out"] else "") + f", {result['seconds']:.0f} s wall"
             " (start-up, data set generation if needed, training, validation and checkpoints)."]
    log = run / "log.jsonl"
    epochs = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    if epochs:
        lines += ["", "| stage | epoch | steps | done at s | train loss | val mIoU | val fg_mIoU | pixel acc |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e, at in zip(epochs, result["epoch_s"] + ["-"] * len(epochs)):
            v = e["val"]
            lines.append(f"| {e['stage']} ({e['stage_name']}) | {e['epoch']} | {e['steps']} | {at} | "
                         f"{e['train']['loss']:.4f} | {v['mIoU']:.4f} | {v['fg_mIoU']:.4f} | {v['pixel_acc']:.4f} |")
    metrics = run / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        lines += ["", "Final: " + ", ".join(f"{k} {m[k]:.4f}" for k in ("mIoU", "fg_mIoU", "pixel_acc", "iIoU") if k in m)]
    return lines


def main(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if args.dry_run:
        for cmd in (bench_command(args, out), train_command(args, out / "run", None)):
            print(shlex.join(cmd))
        return {"ok": True}
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    cmd = bench_command(args, out)
    print(f"[1/2] {' '.join(cmd[1:])} (at most {args.bench_timeout:.0f} s; log {out / 'bench.log'})", flush=True)
    bench = run_logged(cmd, out / "bench.log", args.bench_timeout, stdout=out / "bench.md")
    tables = (out / "bench.md").read_text().strip()
    device = args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu"
    lines = ["# GPU check (tools/gpu_check.py)", "", f"machine: {machine_line(describe_machine(device))}", "",
             f"## tools/bench.py on {args.device}, bf16", "", f"`{' '.join(cmd[1:])}`: exit code {bench['rc']}"
             + (" (stopped at the time limit)" if bench["timed_out"] else "") + f", {bench['seconds']:.0f} s", "",
             tables or "(no tables: see bench.log)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        data_root = None
        if args.quick:
            data_root = make_synthetic(Path(tmp) / "voc", num_train=8, num_val=4, size=64, seed=0)
        run = Path(tmp) / "run"
        cmd = train_command(args, run, data_root)
        print(f"[2/2] {' '.join(cmd[cmd.index('train.py'):])} (at most {args.train_timeout:.0f} s; log {out / 'train.log'})",
              flush=True)
        result = run_logged(cmd, out / "train.log", args.train_timeout)
        lines += training_section(cmd, result, run)
    lines += ["", f"Total: {time.perf_counter() - tic:.0f} s."]
    results = out / "results.md"
    results.write_text("\n".join(lines) + "\n")
    print(results.read_text(), end="")
    for log, part in ((out / "bench.log", bench), (out / "train.log", result)):
        if part["rc"]:
            print(f"exit code {part['rc']}; the end of {log}:\n{log.read_text()[-3000:]}", file=sys.stderr)
    return {"results": results, "ok": not bench["rc"] and not result["rc"], "bench": bench, "training": result}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The GPU check: bench on CUDA and a bf16 training, results in one file")
    p.add_argument("--out", default=str(REPO / "bench-out" / "gpu_check"), help="folder for results.md and the logs")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only to check the script (--quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the bench's --quick and a tiny training")
    p.add_argument("--memory", action="store_true", help="also the bench's peak memory rows (one process per case)")
    p.add_argument("--train-epochs", type=int, default=None,
                   help="--stage-epochs of the training (default: the preset's, 3; --quick: 1)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None,
                   help="cap on training steps per epoch (default: none; --quick: 1)")
    p.add_argument("--bench-timeout", type=float, default=300, help="seconds the bench may run before it is stopped")
    p.add_argument("--train-timeout", type=float, default=150, help="seconds the training may run before it is stopped")
    p.add_argument("--dry-run", action="store_true", help="print the two commands it would run, and run nothing")
    return p


if __name__ == "__main__":
    sys.exit(0 if main(get_args_parser().parse_args())["ok"] else 1)  # a failed part: non-zero, results.md written
