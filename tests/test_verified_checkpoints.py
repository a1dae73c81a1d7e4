"""Checkpoints you can trust (issue 24): every checkpoint carries a manifest of checksums that is verified before
anything loads; a truncated or byte-flipped file is named and `--resume auto` falls back to the newest checkpoint that
verifies; tools/evaluate.py names it too; a torn last log line is dropped before the first step; files get the mode
the umask gives. Write failures (disk full): test_write_failures.py."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from test_reliability import ENV, REPO, TINY, parse, snapshot, train_state

import train
from models import load_model
from models.files import MANIFEST_NAME, umask, verify
from run_state import CheckpointError, find_resume

RUN = ["--schedule", "s", "--max-steps-per-epoch", "2"]  # 2 steps an epoch, a checkpoint at each epoch's end


def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def own_copy(path: Path) -> bytearray:
    """The file's bytes, after giving it its own inode (copy_run hard-links the large files)."""
    data = bytearray(path.read_bytes())
    path.unlink()
    path.write_bytes(bytes(data))
    return data


def truncate(path: Path) -> str:
    data = own_copy(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    return "truncated"


def flip(path: Path) -> str:
    """4 KiB of flipped bytes in the middle of the file, as a bad disk sector or a bad copy leaves them."""
    data = own_copy(path)
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    path.write_bytes(bytes(data))
    return "contents changed"


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def history(tiny_voc, tmp_path_factory):
    """A run folder with checkpoints/last (global step 6), last.prev (step 4: what a kill between publish's two
    renames leaves) and best; and `direct`: the final weights of resuming the checkpoint --resume auto must fall back
    to (the newest of last.prev and best) directly, by --resume PATH into another folder, to epoch 4."""
    root = tmp_path_factory.mktemp("history")
    out = root / "run"
    reset_accelerate()
    train.main(parse(tiny_voc, out, *RUN, "--stage-epochs", "2"))
    shutil.copytree(out / "checkpoints" / "last", root / "step4")
    reset_accelerate()
    train.main(parse(tiny_voc, out, *RUN, "--stage-epochs", "3", "--resume", "auto"))
    shutil.copytree(root / "step4", out / "checkpoints" / "last.prev")
    ckpt = out / "checkpoints"
    assert [train_state(ckpt / n)["global_step"] for n in ("last", "last.prev")] == [6, 4]
    fallback = max(("last.prev", "best"), key=lambda n: (train_state(ckpt / n)["global_step"], n == "last.prev"))
    shutil.copytree(ckpt / fallback, root / "direct_from")
    reset_accelerate()
    train.main(parse(tiny_voc, root / "direct", *RUN, "--stage-epochs", "4", "--resume", str(root / "direct_from")))
    reset_accelerate()
    return out, fallback, weights(root / "direct" / "checkpoints" / "last")


def copy_run(history, tmp_path) -> Path:
    """A copy of the history's run folder to damage and resume: the large checkpoint files hard-linked (runs replace
    them, never write into them; own_copy before damaging one), the rest copied."""
    def link_large(src, dst):
        return os.link(src, dst) if os.path.getsize(src) > 1 << 20 else shutil.copy2(src, dst)

    out = tmp_path / "run"
    shutil.copytree(history[0], out, copy_function=link_large)
    return out


def test_every_checkpoint_carries_a_manifest_that_verifies(history):
    ckpt = history[0] / "checkpoints"
    for name in ("last", "best"):
        listed = json.loads((ckpt / name / MANIFEST_NAME).read_text())["files"]
        assert set(listed) == {p.name for p in (ckpt / name).iterdir() if p.name != MANIFEST_NAME}
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json",
                "config.json"} <= set(listed)
        assert listed["optimizer.bin"]["size"] == (ckpt / name / "optimizer.bin").stat().st_size
        assert verify(ckpt / name) == []


@pytest.mark.parametrize("damage", [truncate, flip])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin"])
def test_a_damaged_last_is_named_and_resume_auto_falls_back(name, damage, history, tmp_path, fresh_accelerate,
                                                            capsys):
    """A truncated or byte-flipped file in checkpoints/last: --resume auto names it, continues from the newest
    checkpoint that verifies and ends with the weights of resuming that checkpoint directly."""
    out = copy_run(history, tmp_path)
    _, fallback, direct = history
    problem = damage(out / "checkpoints" / "last" / name)
    train.main(parse(tiny_voc_root(out), out, *RUN, "--stage-epochs", "4", "--resume", "auto"))
    printed = capsys.readouterr().out
    assert f"--resume auto: skipped checkpoints/last: {out / 'checkpoints/last' / name}: {problem}" in printed
    assert f"continuing from {out / 'checkpoints' / fallback}, the newest checkpoint that verifies" in printed
    final = weights(out / "checkpoints" / "last")
    assert [k for k in direct if not torch.equal(direct[k], final[k])] == []
    assert train_state(out / "checkpoints" / "last")["global_step"] == 8


def tiny_voc_root(out: Path) -> Path:
    """The dataset the run was trained on (its run_config.json)."""
    return Path(json.loads((out / "run_config.json").read_text())["data_root"])


def test_all_three_damaged_is_an_error_naming_each(history, tmp_path, fresh_accelerate):
    out = copy_run(history, tmp_path)
    ckpt = out / "checkpoints"
    truncate(ckpt / "last" / "model.safetensors")
    flip(ckpt / "last.prev" / "optimizer.bin")
    (ckpt / "best" / "random_states_0.pkl").unlink()
    kept = snapshot(ckpt)
    with pytest.raises(CheckpointError) as err:
        train.main(parse(tiny_voc_root(out), out, *RUN, "--stage-epochs", "4", "--resume", "auto"))
    msg = str(err.value)
    assert f"no checkpoint in {ckpt} verifies" in msg
    assert f"checkpoints/last: {ckpt / 'last/model.safetensors'}: truncated" in msg
    assert f"checkpoints/last.prev: {ckpt / 'last.prev/optimizer.bin'}: contents changed" in msg
    assert f"checkpoints/best: {ckpt / 'best/random_states_0.pkl'}: missing" in msg
    assert snapshot(ckpt) == kept  # nothing trained, nothing written


def test_resume_path_never_falls_back(history, tmp_path, fresh_accelerate):
    out = copy_run(history, tmp_path)
    flip(out / "checkpoints" / "last" / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"--resume .*: .*last/optimizer\.bin: contents changed .*does not fall "
                                              r"back"):
        train.main(parse(tiny_voc_root(out), tmp_path / "new", *RUN, "--stage-epochs", "4", "--resume", str(out)))
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_without_manifest_loads_with_one_warning(history, tmp_path, fresh_accelerate, capsys):
    """Written before checksums: it resumes as before, with a one-line warning."""
    out = copy_run(history, tmp_path)
    (out / "checkpoints" / "last" / MANIFEST_NAME).unlink()
    train.main(parse(tiny_voc_root(out), out, *RUN, "--stage-epochs", "4", "--resume", "auto"))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if MANIFEST_NAME in line]
    assert warnings == [f"warning: {out / 'checkpoints/last'}: no {MANIFEST_NAME} (written before checkpoints "
                        f"carried checksums); loading it unverified"]
    assert train_state(out / "checkpoints" / "last")["global_step"] == 8
    assert verify(out / "checkpoints" / "last") == []  # the checkpoints it writes have one


def test_evaluate_names_a_corrupted_checkpoint_and_exits_non_zero(history, tmp_path):
    out = copy_run(history, tmp_path)
    last = out / "checkpoints" / "last"
    flip(last / "model.safetensors")
    proc = subprocess.run([sys.executable, str(REPO / "tools/evaluate.py"), "--checkpoint", str(last),
                           "--data-root", str(tiny_voc_root(out)), "--workers", "0"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[-1] == (f"evaluate.py: error: {last} fails verification: "
                                            f"{last / 'model.safetensors'}: contents changed (SHA-256 differs "
                                            f"from {MANIFEST_NAME})")
    assert "Traceback" not in proc.stderr
    assert not (last / "eval_val.json").exists()


def test_load_model_verifies_what_it_loads(history, tmp_path):
    """tools/predict.py and export.py load through load_model: the weights and config are verified, the optimizer
    state is not theirs to check."""
    out = copy_run(history, tmp_path)
    last = out / "checkpoints" / "last"
    flip(last / "optimizer.bin")
    load_model(last)
    truncate(last / "config.json")
    with pytest.raises(CheckpointError, match=rf"{last / 'config.json'}: truncated"):
        load_model(last)


# ------------------------------------------------------------------------------------------------ torn logs


def test_a_torn_last_log_line_is_dropped_before_the_first_step(history, tmp_path, fresh_accelerate, capsys,
                                                               monkeypatch):
    """A crash mid-append leaves half a line: it is dropped, with a warning naming it, before any step; temporary
    folders a crash left are removed at the same time."""
    out = copy_run(history, tmp_path)
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("".join(x + "\n" for x in lines) + lines[-1][:40])
    (out / "checkpoints" / ".last.tmp").mkdir()
    (out / "checkpoints" / ".last.tmp" / "optimizer.bin").write_bytes(b"partial")
    (out / ".metrics.json.tmp").write_text("{")
    seen = []
    real_step = train.train_step

    def first_step(*args, **kwargs):
        if not seen:
            seen.append(log.read_text())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", first_step)
    train.main(parse(tiny_voc_root(out), out, *RUN, "--stage-epochs", "4", "--resume", "auto"))
    assert seen[0] == "".join(x + "\n" for x in lines)
    assert f"warning: {log} line {len(lines) + 1} is torn (a crash mid-write), dropped: {lines[-1][:40]!r}" \
        in capsys.readouterr().err
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [0, 1, 2, 3]
    assert not (out / "checkpoints" / ".last.tmp").exists() and not (out / ".metrics.json.tmp").exists()


def test_a_malformed_log_line_before_the_last_is_an_error_naming_it(history, tmp_path, fresh_accelerate,
                                                                    monkeypatch):
    out = copy_run(history, tmp_path)
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("".join(x + "\n" for x in [lines[0], lines[1][:30], *lines[2:]]))
    kept = snapshot(out)
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained a step"))
    with pytest.raises(CheckpointError, match=rf"{log} line 2: not a log record"):
        train.main(parse(tiny_voc_root(out), out, *RUN, "--stage-epochs", "4", "--resume", "auto"))
    assert snapshot(out) == kept


# ---------------------------------------------------------------------------------------------- permissions


def modes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_every_file_train_and_export_write_has_the_umask_mode(tiny_voc, tmp_path):
    """Under umask 022 every file is 0644 and every folder 0755, as a plain open() and mkdir give: nothing carries
    a temporary file's 0600 into place (safetensors writes through one)."""
    out, exported = tmp_path / "run", tmp_path / "exported"
    train_cmd = [sys.executable, str(REPO / "train.py"), "--data-root", str(tiny_voc), "--output-dir", str(out),
                 *TINY, "--schedule", "b", "--stage-epochs", "1", "--max-steps-per-epoch", "1",
                 "--joint-weighting", "uncertainty"]
    export_cmd = [sys.executable, str(REPO / "tools/export.py"), "--checkpoint", str(out), "--out", str(exported),
                  "--flops-size", "64", "--check-sizes", "64x64", "--onnx-exporter", "legacy"]
    for cmd in (train_cmd, export_cmd):
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600,
                              preexec_fn=lambda: os.umask(0o022))
        assert proc.returncode == 0, proc.stderr[-3000:]
    found = {**modes(out), **{f"exported/{k}": v for k, v in modes(exported).items()}}
    assert "checkpoints/last/model.safetensors" in found and "exported/model.safetensors" in found
    assert "exported/model.onnx" in found and any(k.startswith("tensorboard/events") for k in found)
    wrong = {k: oct(v) for k, v in found.items()
             if v != (0o755 if (tmp_path / ("" if k.startswith("exported/") else "run") / k).is_dir() else 0o644)}
    assert wrong == {}


def test_atomic_writers_give_the_umask_mode(tmp_path):
    """The writers that go through a temporary file (mkstemp, safetensors) under another umask: 0640 for 027."""
    from models import ModelConfig, build_model, save_model
    from tools.make_depth import save_png_atomic

    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        save_png_atomic(np.zeros((4, 4), np.uint16), tmp_path / "depth.png")
        save_model(build_model(ModelConfig(encoder="resnet18", decoder_channels=(8, 8, 8, 8, 8))), tmp_path / "m")
    finally:
        os.umask(old)
    files = [tmp_path / "depth.png", *(tmp_path / "m").iterdir()]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o640" for p in files}


def test_find_resume_orders_by_train_state(history, tmp_path, capsys):
    """Newest first by their train states, whatever the folder names: a last older than best loses to it."""
    out = copy_run(history, tmp_path)
    ckpt = out / "checkpoints"
    shutil.rmtree(ckpt / "last")
    shutil.copytree(ckpt / "last.prev", ckpt / "last")  # step 4
    shutil.rmtree(ckpt / "last.prev")
    best_step = train_state(ckpt / "best")["global_step"]
    expected = ckpt / ("best" if best_step > 4 else "last")
    assert find_resume("auto", out) == expected
