"""Interrupted runs: SIGKILL anywhere (between stages, mid-checkpoint-write, mid-epoch) and resume bit-identically,
publish always leaves a complete checkpoint, a NaN stops the run with `last` intact, one failing process ends a
multi-process run. Shared helpers: test_reliability.py."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import ENV, REPO, TINY, bad_label_value, ids_of, parse, snapshot, train_state

import train
from data.sampler import Stream
from models import load_model
from run_state import checkpoints as ckpt
from run_state import find_resume, publish
from run_state.faults import FAULT_ENV

KILL_RUN = [*TINY, "--stage-epochs", "1,1,1", "--schedule", "d_s_b", "--copy-weights", "--deterministic",
            "--resume", "auto"]


def run_cli(root, out, *extra, kill_at=None):
    env = {**ENV, FAULT_ENV: kill_at} if kill_at else ENV
    cmd = [sys.executable, str(REPO / "train.py"), "--data-root", str(root), "--output-dir", str(out), *extra]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


# ----------------------------------------------------------------------------------------------- kill and resume


def test_sigkill_anywhere_then_resume_is_bit_identical(tiny_voc, tmp_path):
    """Kill a real run between stages, mid-checkpoint-write (before and inside publish) and mid-epoch; resume each
    time with --resume auto; the final weights, optimizer state and step count equal an uninterrupted run's."""
    for folder in ("ref", "killed"):
        (tmp_path / folder).mkdir()
    ref = run_cli(tiny_voc, tmp_path / "ref" / "run", *KILL_RUN)  # runs alongside the killed one
    out = tmp_path / "killed" / "run"
    last, prev = out / "checkpoints" / "last", out / "checkpoints" / "last.prev"
    # 16 images, batch 4: 4 steps per epoch, one epoch per stage, a checkpoint after every step (12 steps, 12 saves)
    expected = {
        "stage:1": lambda: train_state(last)["global_step"] == 4 and train_state(last)["stage"] == 0,
        # 3rd save of this process (global step 7) killed after its files were written, before publishing
        "save:3": lambda: train_state(last)["global_step"] == 6 and (out / "checkpoints/.last.tmp").is_dir(),
        # 2nd publish (the end of stage 1, global step 8) killed between its two renames: only last.prev is left
        "publish:2": lambda: not last.exists() and train_state(prev)["global_step"] == 7,
        # killed right after the 3rd optimizer step of this process (global step 10), before its checkpoint
        "step:3": lambda: train_state(last)["global_step"] == 9 and train_state(last)["stage"] == 2,
    }
    for kill_at, check in expected.items():
        rc, log = finish(run_cli(tiny_voc, out, *KILL_RUN, "--checkpoint-every", "1", kill_at=kill_at))
        assert rc == -9, f"{kill_at}: expected SIGKILL, got {rc}\n{log[-3000:]}"
        assert check(), f"{kill_at}: unexpected checkpoints {sorted(p.name for p in (out / 'checkpoints').iterdir())}"
        resume = find_resume("auto", out)
        load_model(resume)  # what a kill leaves always loads
    rc, log = finish(run_cli(tiny_voc, out, *KILL_RUN, "--checkpoint-every", "1"))
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and "stage 2, epoch 0, step 1" in log
    rc_ref, ref_log = finish(ref)
    assert rc_ref == 0, ref_log[-3000:]

    a, b = tmp_path / "ref/run/checkpoints/last", last
    assert train_state(a)["global_step"] == train_state(b)["global_step"] == 12
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    oa, ob = (torch.load(f / "optimizer.bin", weights_only=True)["state"] for f in (a, b))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert int(oa[0]["step"]) == 4  # the last stage's Adam took 4 steps in both
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["epoch"], x["global_step"]) for x in lines] == [(0, 0, 4), (1, 0, 8), (2, 0, 12)]
    # one line per epoch, no duplicate from a kill between logging and saving; training losses averaged over the
    # whole epoch across the kills, validation of identical weights: the same lines as the uninterrupted run
    assert lines == [json.loads(line) for line in (tmp_path / "ref/run/log.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]


def test_publish_always_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """At every rename and delete of publish(), `last` or `last.prev` is complete, also after a kill between the
    renames (the next publish must not delete last.prev before the new last is in place)."""

    def make(folder: Path, step: int) -> Path:
        folder.mkdir(parents=True)
        (folder / ckpt.WEIGHTS_NAME).write_text("w")
        (folder / ckpt.STATE_NAME).write_text(json.dumps({"global_step": step}))
        return folder

    root = tmp_path / "checkpoints"
    last = root / "last"
    make(last, 1)
    seen = []

    def guarded(fn):
        def wrapper(*a, **k):
            ok = ckpt.is_complete(last) or ckpt.is_complete(root / "last.prev")
            seen.append(ok)
            return fn(*a, **k)
        return wrapper

    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", guarded(real_replace))
    monkeypatch.setattr(ckpt.shutil, "rmtree", guarded(shutil.rmtree))
    publish(make(root / ".last.tmp", 2), last)
    assert train_state(last)["global_step"] == 2 and not (root / "last.prev").exists()

    calls = []

    def killed_after_first_rename(src, dst):  # a kill between the two renames: the second never happens
        calls.append(dst)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        publish(make(root / ".last.tmp", 3), last)
    assert not last.exists() and find_resume("auto", tmp_path) == root / "last.prev"
    monkeypatch.setattr(ckpt.os, "replace", guarded(real_replace))
    shutil.rmtree(root / ".last.tmp")
    publish(make(root / ".last.tmp", 4), last)
    assert train_state(find_resume("auto", tmp_path))["global_step"] == 4
    assert seen and all(seen)


# ------------------------------------------------------------------------------------------------------ NaN


def test_nan_loss_stops_naming_where_and_keeps_last(tiny_voc, tmp_path, fresh_accelerate, monkeypatch):
    out = tmp_path / "run"
    real = train.Criterion.__call__
    calls, before = [], {}

    def poisoned(self, outputs, batch):
        loss, terms = real(self, outputs, batch)
        calls.append(1)
        if len(calls) == 3:  # stage 1 (b), its 1st step; checkpoints were written after global steps 1 and 2
            before.update(snapshot(out / "checkpoints"))
            terms = {**terms, "seg": terms["seg"] * float("nan")}
            loss = sum(self.weights[t] * terms[t] for t in terms)
        return loss, terms

    monkeypatch.setattr(train.Criterion, "__call__", poisoned)
    # 2 steps per epoch; --log-every 100: only the check before the mid-epoch checkpoint can catch it
    args = parse(tiny_voc, out, "--schedule", "s_b", "--stage-epochs", "1", "--max-steps-per-epoch", "2",
                 "--checkpoint-every", "1", "--log-every", "100")
    with pytest.raises(train.NonFiniteLossError) as err:
        train.main(args)
    msg = str(err.value)
    assert "stage 1 (b), epoch 0, step 1 of 2 (global step 3)" in msg
    assert "seg=nan" in msg and "loss=nan" in msg and "depth=" in msg and "depth=nan" not in msg
    last = out / "checkpoints" / "last"
    assert before and snapshot(out / "checkpoints") == before  # nothing written after the NaN
    assert train_state(last) == {**train_state(last), "stage": 0, "epoch": 1, "step": 0, "global_step": 2}
    model = load_model(last)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ two processes


def test_a_failing_process_ends_a_two_process_run_quickly(tiny_voc, tmp_path, launch_two_ranks):
    """Rank 1 reads a bad label in epoch 1: every process exits, non-zero, well within the time limit, with the
    file named; epoch 0's checkpoint and its one log line (main process only) are intact."""
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    ids, n = ids_of(root), len(ids_of(root))

    def read(seed, positions):  # the ids at positions of an s stage's labelled stream, batch 2 (data/pools.py)
        return [Stream(tuple(range(n)), 2, 1).sample(seed, p, {})[0] for p in positions]

    # --max-steps-per-epoch 1, batch 2 per rank: epoch 0 is stream batches 0 and 1 (one per rank, positions 0-3),
    # epoch 1 batches 2 and 3: rank 1 reads positions 6 and 7
    seed, bad = next((s, i) for s in range(50) for i in read(s, (6, 7)) if i not in read(s, range(6)))
    bad_label_value(root, ids[bad])
    out = tmp_path / "ddp"
    tic = time.monotonic()
    proc = launch_two_ranks(REPO / "train.py", "--data-root", root, "--output-dir", out, "--schedule", "s",
                            "--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "2",
                            "--workers", "0", "--stage-epochs", "2", "--max-steps-per-epoch", "1", "--seed", seed,
                            "--dist-timeout", "60", cwd=tmp_path, env=ENV, timeout=300)
    elapsed = time.monotonic() - tic
    assert proc.returncode != 0 and elapsed < 120, (proc.returncode, elapsed)
    assert f"train.py: error: {root / 'SegmentationClass' / ids[bad]}.png: label values [42]" in proc.stderr
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["world_size"] == 2
    assert train_state(out / "checkpoints" / "last")["epoch"] == 1
    load_model(out / "checkpoints" / "last")
