"""Reliability: SIGKILL anywhere and resume bit-identically, bad input named up front, NaN stops with `last` intact,
wrong checkpoints refused clearly, one failing process ends a multi-process run."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train
from data.checks import check_data
from data.sampler import EpochSampler
from data.voc import DataError, VOCSegmentation
from models import ModelConfig, build_model, load_model
from models import checkpoint as ckpt
from models.checkpoint import CheckpointError, find_resume, publish

REPO = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "4", "--workers", "0",
        "--val-batch-size", "4"]
KILL_RUN = [*TINY, "--stage-epochs", "1,1,1", "--schedule", "d_s_b", "--copy-weights", "--deterministic",
            "--resume", "auto"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def parse(root, out, *extra):
    return train.get_args_parser().parse_args(["--data-root", str(root), "--output-dir", str(out), *TINY, *extra])


def run_cli(root, out, *extra, kill_at=None):
    env = {**ENV, ckpt.FAULT_ENV: kill_at} if kill_at else ENV
    cmd = [sys.executable, str(REPO / "train.py"), "--data-root", str(root), "--output-dir", str(out), *extra]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def train_state(folder: Path) -> dict:
    return json.loads((folder / "train_state.json").read_text())


def snapshot(*folders) -> dict:
    """Every file under the folders: size, mtime, inode and, for small ones, a hash (a rewrite changes some)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 20 else ""
                out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return out


def ids_of(root, split="train") -> list[str]:
    return (Path(root) / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def write_palette(arr: np.ndarray, path: Path) -> None:
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    im.save(path)


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
    real = train.criterion
    calls, before = [], {}

    def poisoned(outputs, batch, weights, focal, joint=None):
        loss, terms = real(outputs, batch, weights, focal, joint)
        calls.append(1)
        if len(calls) == 3:  # stage 1 (b), its 1st step; checkpoints were written after global steps 1 and 2
            before.update(snapshot(out / "checkpoints"))
            terms = {**terms, "seg": terms["seg"] * float("nan")}
            loss = sum(weights[t] * terms[t] for t in terms)
        return loss, terms

    monkeypatch.setattr(train, "criterion", poisoned)
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


# ------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def finished_run(tiny_voc, tmp_path_factory):
    """A finished one-stage run (schedule b, 1 epoch) whose checkpoints later runs must not damage."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(parse(tiny_voc, out, "--schedule", "b", "--stage-epochs", "1", "--max-steps-per-epoch", "2"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


def first_read(root, epoch: int) -> str:
    """The id a one-process run reads first in an epoch (seed 0, one stage)."""
    sampler = EpochSampler(len(ids_of(root)), 0)
    sampler.set_epoch(epoch)
    return ids_of(root)[next(iter(sampler)) % len(ids_of(root))]


def truncate_jpeg(root, i):
    path = root / "JPEGImages" / f"{i}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # header intact, scan data cut
    return rf"{i}\.jpg: unreadable image \(corrupt or truncated JPEG"


def bad_label_value(root, i):
    path = root / "SegmentationClass" / f"{i}.png"
    arr = np.array(Image.open(path))
    arr[3, 5] = 42
    write_palette(arr, path)
    return rf"{i}\.png: label values \[42\] outside 0\.\.20 and 255"


def small_label(root, i):
    path = root / "SegmentationClass" / f"{i}.png"
    write_palette(np.array(Image.open(path))[:32, :48], path)
    return rf"SegmentationClass/{i}\.png: label size \(48, 32\) differs from the image's \(64, 64\)"


def small_depth(root, i):
    path = root / "PseudoDepth" / f"{i}.png"
    Image.fromarray(np.array(Image.open(path))[:40]).save(path)
    return rf"PseudoDepth/{i}\.png: pseudo depth size \(64, 40\) differs from the image's \(64, 64\)"


def listed_but_missing(root, i):
    split = root / "ImageSets/Segmentation/train.txt"
    split.write_text(split.read_text() + "ghost_0001\n")
    return r"JPEGImages: 1 of 17 files of split 'train' are missing \(e\.g\. ghost_0001\)"


def empty_split(root, i):
    (root / "ImageSets/Segmentation/train.txt").write_text("\n")
    return r"train\.txt: split 'train' is empty"


BAD_INPUTS = [truncate_jpeg, bad_label_value, small_label, small_depth, listed_but_missing, empty_split]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_names_the_file_and_damages_nothing(corrupt, tiny_voc, finished_run, tmp_path, fresh_accelerate):
    """Resuming the finished run for one more epoch on broken data: a DataError naming the file and the problem,
    raised before (header problems) or at (decode problems) the first read, and no checkpoint or depth map touched."""
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    pattern = corrupt(root, first_read(root, 1))
    kept = snapshot(finished_run / "checkpoints", root / "PseudoDepth")
    with pytest.raises(DataError, match=pattern):
        train.main(parse(root, finished_run, "--schedule", "b", "--stage-epochs", "2", "--resume", "auto"))
    assert snapshot(finished_run / "checkpoints", root / "PseudoDepth") == kept
    assert train_state(finished_run / "checkpoints" / "last")["epoch"] == 1


def test_check_data_reports_every_problem_and_cli_exit_code(tiny_voc, tmp_path, capsys):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    ids, val = ids_of(root), ids_of(root, "val")
    patterns = [truncate_jpeg(root, ids[0]), bad_label_value(root, ids[1]), small_depth(root, val[0])]
    Image.fromarray(np.full((64, 64), 7, np.uint16)).save(root / "PseudoDepth" / f"{ids[2]}.png")
    (root / "PseudoDepth" / f"{ids[3]}.png").unlink()
    report, errors = check_data(root, ["train", "val"], True, 21)
    assert errors == 4
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in report.splitlines()), pattern
    assert f"{ids[2]}.png: constant pseudo depth" in report and f"{ids[3]}.png: pseudo depth missing" in report
    assert "split 'train': 16 samples, 3 with errors" in report and "split 'val': 7 samples, 1 with errors" in report
    assert f"make_depth.py --data-root {root} --split train" in report
    report_seg, errors_seg = check_data(root, ["train", "val"], False, 21)  # a seg-only schedule: depth not read
    assert errors_seg == 2 and "PseudoDepth" not in report_seg

    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--check-data", "--data-root", str(root),
                           "--schedule", "s", "--output-dir", str(tmp_path / "none")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "2 error(s)" in proc.stdout and f"{ids[1]}.png: label values [42]" in proc.stdout
    assert not (tmp_path / "none").exists()  # --check-data trains nothing, writes nothing


def test_skip_bad_samples_trains_on_the_rest_and_counts(tiny_voc, tmp_path, fresh_accelerate, capsys):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    ids, val = ids_of(root), ids_of(root, "val")
    truncate_jpeg(root, ids[4])
    bad_label_value(root, ids[5])
    small_label(root, val[1])
    out = tmp_path / "run"
    metrics = train.main(parse(root, out, "--schedule", "s", "--stage-epochs", "1", "--skip-bad-samples"))
    printed = capsys.readouterr().out
    assert f"skipping the sample: error: [train] {root / 'JPEGImages' / ids[4]}.jpg: unreadable image" in printed
    assert "skipped 3 bad samples (train: 2, val: 1)" in printed
    line = json.loads((out / "log.jsonl").read_text())
    assert line["skipped_samples"] == {"train": 2, "val": 1}
    assert line["steps"] == 14 // 4  # 16 - 2 training images, batch 4, last partial batch dropped
    skipped = (out / "skipped_samples.txt").read_text()
    assert f"{ids[5]}.png: label values [42]" in skipped and f"{val[1]}.png: label size" in skipped
    labelled = sum(int((np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) != 255).sum())
                   for i in val if i != val[1])
    assert sum(map(sum, metrics["confusion_matrix"])) == labelled  # the 6 good val images, each once


# ------------------------------------------------------------------------------------------ wrong checkpoints


@pytest.mark.parametrize("extra, pattern", [
    (["--encoder", "resnet34", "--schedule", "b"], r"another model configuration: encoder=resnet18 \(this run: resnet34\)"),
    (["--schedule", "s"], r"another model configuration: tasks=\('seg', 'depth'\) \(this run: \('seg',\)\)"),
    (["--schedule", "s_b"], r"checkpoint of schedule 'b', this run is 's_b'. Resume with --schedule b"),
], ids=["encoder", "decoders", "schedule"])
def test_checkpoint_of_another_configuration_is_refused_clearly(extra, pattern, tiny_voc, finished_run, tmp_path,
                                                                fresh_accelerate):
    kept = snapshot(finished_run / "checkpoints")
    with pytest.raises(CheckpointError, match=pattern) as err:
        train.main(parse(tiny_voc, tmp_path / "new", "--resume", str(finished_run), "--stage-epochs", "2", *extra))
    assert len(str(err.value)) < 600  # a sentence, not a dump of every shape
    assert snapshot(finished_run / "checkpoints") == kept


def test_checkpoint_with_weights_of_other_shapes_is_refused_clearly(tiny_voc, finished_run, tmp_path, fresh_accelerate):
    fake = tmp_path / "fake"
    shutil.copytree(finished_run / "checkpoints" / "last", fake, ignore=shutil.ignore_patterns("*.bin", "*.safetensors"))
    weights = build_model(ModelConfig(encoder="resnet18", num_classes=5)).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, fake / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weights do not fit .* 2 of another shape e\.g\. \['heads\.seg\.bias', "
                                              r"'heads\.seg\.weight'\]"):
        train.main(parse(tiny_voc, tmp_path / "new", "--resume", str(fake), "--schedule", "b", "--stage-epochs", "2"))


def test_resume_loads_everything_with_weights_only(tiny_voc, finished_run, tmp_path, fresh_accelerate, monkeypatch):
    """--resume PATH of a run folder continues it into another folder; every torch.load is weights_only=True."""
    loads = []
    real_load = torch.load

    def recording(*a, **k):
        loads.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", recording)
    out = tmp_path / "continued"
    train.main(parse(tiny_voc, out, "--schedule", "b", "--stage-epochs", "2", "--resume", str(finished_run),
                     "--max-steps-per-epoch", "1"))
    assert loads and all(w is True for w in loads), loads  # optimizer, RNG states (model: safetensors)
    from accelerate.utils import load  # Accelerate skips RNG states it cannot load without a word: make sure it can
    assert isinstance(load(finished_run / "checkpoints/last/random_states_0.pkl")["torch_manual_seed"], torch.Tensor)
    assert not list((finished_run / "checkpoints").rglob("custom_checkpoint_*"))
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert train_state(out / "checkpoints" / "last")["epoch"] == 2


# ------------------------------------------------------------------------------------------------ two processes


def test_a_failing_process_ends_a_two_process_run_quickly(tiny_voc, tmp_path, launch_two_ranks):
    """Rank 1 reads a bad label in epoch 1: every process exits, non-zero, well within the time limit, with the
    file named; epoch 0's checkpoint and its one log line (main process only) are intact."""
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    ids, n = ids_of(root), len(ids_of(root))

    def order(seed, epoch):
        s = EpochSampler(n, seed)
        s.set_epoch(epoch)
        return [k % n for k in s]

    # --max-steps-per-epoch 1, batch 2 per rank: in epoch 0 each rank loads its first 3 batches (one step + the
    # look-ahead), i.e. the first 12 of the order; rank 1's first batch of epoch 1 is order[2:4]
    seed, bad = next((s, i) for s in range(50) for i in order(s, 1)[2:4] if i not in order(s, 0)[:12])
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
