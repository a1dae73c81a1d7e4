"""Reliability: bad input named up front and damaging nothing, wrong checkpoints refused clearly, resume loading
with weights_only. Killed, NaN-stopped and multi-process failures: test_interrupted_runs.py, which (like
test_run_folder.py) uses the helpers here."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import train
from data import PRESETS
from data.checks import check_data
from data.sampler import Stream
from data.voc import DataError
from models import ModelConfig, build_model
from models.files import write_manifest
from run_state import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "4", "--workers", "0",
        "--val-batch-size", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def parse(root, out, *extra):
    return train.get_args_parser().parse_args(["--data-root", str(root), "--output-dir", str(out), *TINY, *extra])


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


def first_read(root, position: int) -> str:
    """The id a one-process run (seed 0, batch 4) reads at a position of its first stage's labelled stream (the
    stream of an s or b stage, data/pools.py plan_stage)."""
    ids = ids_of(root)
    return ids[Stream(tuple(range(len(ids))), 4, 1).sample(0, position, {})[0]]


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
    pattern = corrupt(root, first_read(root, 16))  # epoch 1 of 4 steps of 4 images, after epoch 0's (capped) 2
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
    report, errors = check_data(root, ["train", "val"], True, PRESETS["voc"])
    assert errors == 4
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in report.splitlines()), pattern
    assert f"{ids[2]}.png: constant pseudo depth" in report and f"{ids[3]}.png: pseudo depth missing" in report
    assert "split 'train': 16 samples, 3 with errors" in report and "split 'val': 7 samples, 1 with errors" in report
    assert f"make_depth.py --data-root {root} --split train" in report
    report_seg, errors_seg = check_data(root, ["train", "val"], False, PRESETS["voc"])  # a seg-only schedule: depth not read
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
    write_manifest(fake)  # a checkpoint that verifies, of another model
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
