"""What checkpoint checksums cost: a real checkpoint of the paper's model (ResNet50, both decoders, Adam state after
a step) written by run_state.save_checkpoint, then its manifest's hashing and a full verification timed.

    python -m benchmarks.checkpoint                      # ResNet50, 3 repeats; about a minute on 2 CPU cores
    python -m benchmarks.checkpoint --encoder resnet18 --repeats 1 --out /tmp/ckpt

The files are read from the page cache, as they are right after a save and, at a resume, after the first read: the
load that follows verification reads the same bytes, so what verification adds to a resume is the hashing.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import fresh_accelerator
from models import ModelConfig, build_model
from models.files import verify, write_manifest
from run_state import TrainState, save_checkpoint


def checkpoint_of(encoder: str, out: Path) -> Path:
    """save_checkpoint of the model and an Adam that has taken one step (its two moment buffers filled)."""
    accelerator = fresh_accelerator("fp32", torch.device("cpu"))
    model = build_model(ModelConfig(encoder=encoder))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    save_checkpoint(accelerator, model, out, TrainState(schedule="d_s_b"))
    return Path(out) / "checkpoints" / "last"


def main(args: argparse.Namespace) -> dict:
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ckpt-cost-"))
    try:
        tic = time.perf_counter()
        folder = checkpoint_of(args.encoder, root)
        save_s = time.perf_counter() - tic
        files = sorted(p for p in folder.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        hashing, checking = [], []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            write_manifest(folder)
            hashing.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            assert verify(folder) == []
            checking.append(time.perf_counter() - tic)
        result = {"encoder": args.encoder, "bytes": size, "files": {p.name: p.stat().st_size for p in files},
                  "save_checkpoint_s": save_s, "write_manifest_s": min(hashing), "verify_s": min(checking),
                  "load_avg": os.getloadavg()[0], "cpus": os.cpu_count()}
        print(f"{args.encoder} checkpoint: {size / 2**20:,.1f} MiB in {len(files)} files "
              + ", ".join(f"{n} {s / 2**20:,.1f} MiB" for n, s in result["files"].items() if s > 2**20))
        print(f"save_checkpoint (save_state, manifest, fsync, publish): {save_s:.2f} s")
        print(f"manifest (hash every file, write): {min(hashing):.3f} s; verify every file: {min(checking):.3f} s "
              f"({size / 2**20 / min(checking):,.0f} MiB/s; best of {args.repeats}; load average "
              f"{result['load_avg']:.2f} on {result['cpus']} CPUs)")
        return result
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time a checkpoint's manifest and its verification", add_help=True)
    p.add_argument("--encoder", default="resnet50", help="encoder of the model checkpointed (default: the paper's)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    p.add_argument("--out", default=None, help="keep the checkpoint in this run folder (default: a temporary one)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
