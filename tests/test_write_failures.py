"""Write failures named, nothing lost (issue 24): a full disk while writing any checkpoint file, a log line,
metrics.json or TensorBoard stops the run with one line naming the path and the cause, no traceback; the previous
checkpoint stays intact, no temporary folder is left, and `--resume auto` on a disk with room ends bit-identical to a
run that never failed. Under two processes every process stops. The faults: tests/write_faults.py."""
import errno
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import ENV, REPO, TINY, parse, snapshot, train_state
from test_verified_checkpoints import reset_accelerate
from write_faults import FAIL_ENV, install

import train
from models.files import verify
from run_state import WriteError
from run_state.writes import writing

# the TensorBoard case: the event writer's thread dies of its full disk, as it would (its error reaches the run at its
# next call); pytest reports that thread's exception wherever it sees it
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
HELPER = Path(__file__).with_name("write_faults.py")
# 16 images, batch 4, 2 steps an epoch, 5 epochs: 10 optimizer steps and a checkpoint after each one, each holding
# the joint weighting's state (--joint-weighting WEIGHTING)
CHAIN = [*TINY, "--schedule", "b", "--stage-epochs", "5", "--max-steps-per-epoch", "2", "--checkpoint-every", "1",
         "--deterministic", "--resume", "auto", "--joint-weighting"]
# every kind of file a checkpoint holds, in the order its writer writes them, by the joint weighting that gives them:
# the weighting's state is saved once, in save_state's model_1.safetensors when it is prepared (uncertainty), else as
# weighting.pt (DWA has no parameters and is never prepared)
KINDS = {"uncertainty": ["model.safetensors", "model_1.safetensors", "optimizer.bin", "random_states_0.pkl",
                         "config.json", "train_state.json", "manifest.json"],
         "dwa": ["weighting.pt"]}
WEIGHTING_FILE = {"uncertainty": "model_1.safetensors", "dwa": "weighting.pt"}


def run_cli(root, out, *extra, fail=None):
    """train.py as a user runs it (under the fault helper when `fail` is NAME:N)."""
    import subprocess

    cmd = [sys.executable, *([str(HELPER)] if fail else []), str(REPO / "train.py"), "--data-root", str(root),
           "--output-dir", str(out), *extra]
    env = {**ENV, FAIL_ENV: fail} if fail else ENV
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def screen_lines(text: str) -> list[str]:
    """The lines a terminal shows (a progress bar clears itself with carriage returns)."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def no_temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("weighting", list(KINDS))
def test_disk_full_during_each_checkpoint_file_is_named_and_resume_is_bit_identical(weighting, tiny_voc, tmp_path):
    """Each kind of checkpoint file fails in turn (a run per kind, each resuming the last): one line naming the file
    and the full disk, no traceback, `last` intact and verifying, no temporary folder; the run that then finishes
    has the weights, Adam state, weighting state and log lines of one that never failed."""
    chain = [*CHAIN, weighting]
    for folder in ("ref", "failed"):
        (tmp_path / folder).mkdir()
    ref = run_cli(tiny_voc, tmp_path / "ref" / "run", *chain)  # runs alongside
    out = tmp_path / "failed" / "run"
    last = out / "checkpoints" / "last"
    kinds = KINDS[weighting]
    for k, kind in enumerate(kinds):
        rc, stdout, stderr = finish(run_cli(tiny_voc, out, *chain, fail=f"{kind}:2"))  # this run's 2nd checkpoint
        assert rc == 1, f"{kind}: rc {rc}\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = screen_lines(stderr)
        errors = [line for line in lines if "error" in line.lower()]
        assert len(errors) == 1 and errors[0] == lines[-1], stderr[-3000:]
        path = out / "checkpoints" / ".last.tmp" / kind
        assert errors[0].startswith(f"train.py: error: cannot write {path}: "), errors[0]
        assert ("No space left on device (ENOSPC)" in errors[0] or "(the disk is full)" in errors[0]), errors[0]
        assert "1.0 MiB free there, about 2" in errors[0] and "MiB needed" in errors[0], errors[0]  # resnet18: ~200 MiB
        assert "; checkpoints/last" in errors[0] and errors[0].endswith(" unchanged"), errors[0]
        assert train_state(last)["global_step"] == k + 1 and verify(last) == []
        assert no_temporaries(out) == []
    rc, stdout, stderr = finish(run_cli(tiny_voc, out, *chain))
    assert rc == 0, stderr[-3000:]
    assert "resumed from" in stdout and f"stage 0, epoch {len(kinds) // 2}, step {len(kinds) % 2}" in stdout
    rc_ref, _, ref_err = finish(ref)
    assert rc_ref == 0, ref_err[-3000:]

    a = tmp_path / "ref/run/checkpoints/last"
    assert train_state(a)["global_step"] == train_state(last)["global_step"] == 10
    wa, wb = load_file(a / "model.safetensors"), load_file(last / "model.safetensors")
    assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    oa, ob = (torch.load(f / "optimizer.bin", weights_only=True)["state"] for f in (a, last))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    state = WEIGHTING_FILE[weighting]
    assert sorted(p.name for p in last.iterdir() if p.name in WEIGHTING_FILE.values()) == [state]  # held once
    ua, ub = (load_file(f / state) if state.endswith(".safetensors") else torch.load(f / state, weights_only=True)
              for f in (a, last))
    torch.testing.assert_close(ua, ub, rtol=0, atol=0)
    assert (out / "log.jsonl").read_text() == (tmp_path / "ref/run/log.jsonl").read_text()


@pytest.fixture()
def one_epoch(tiny_voc, tmp_path, fresh_accelerate):
    """A run folder after one epoch of schedule s (2 steps), to be continued by a run whose write fails."""
    out = tmp_path / "run"
    train.main(parse(tiny_voc, out, "--schedule", "s", "--stage-epochs", "1", "--max-steps-per-epoch", "2"))
    reset_accelerate()
    return out


@pytest.mark.parametrize("name, where", [
    ("log.jsonl", "log.jsonl"),
    ("metrics.json", "metrics.json"),
    ("run_config.resumed.json", "run_config.resumed.json"),
    ("events.out.tfevents", "tensorboard"),
], ids=["log-line", "metrics", "run-config", "tensorboard"])
def test_disk_full_on_a_log_file_is_named_and_loses_nothing(name, where, one_epoch, tiny_voc, monkeypatch):
    """A log line, metrics.json, the run config or a TensorBoard event: WriteError naming the path (and the full
    disk); the checkpoints and the log lines before stay as they were, no temporary file is left."""
    out = one_epoch
    kept = snapshot(out / "checkpoints")
    log = (out / "log.jsonl").read_text()
    if name == "events.out.tfevents":  # the event writer's thread fails; its error surfaces at the next call
        from tensorboard.summary.writer import record_writer

        def full(self, data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    else:
        install(name, 1, monkeypatch.setattr)
    with pytest.raises(WriteError) as err:
        # one more epoch (its last: metrics.json), 4 steps of 2 images... with another --batch-size the run config
        # differs from the one it started with (run_config.resumed.json)
        train.main(parse(tiny_voc, out, "--schedule", "s", "--stage-epochs", "2", "--max-steps-per-epoch", "2",
                         "--val-batch-size", "2", "--resume", "auto"))
    msg = str(err.value)
    assert msg.startswith(f"cannot write {out / where}: No space left on device (ENOSPC); "), msg
    assert "\n" not in msg
    if name != "events.out.tfevents":
        assert "1.0 MiB free there" in msg
    assert snapshot(out / "checkpoints") == kept
    assert (out / "log.jsonl").read_text().startswith(log) and no_temporaries(out) == []
    if name == "log.jsonl":
        assert (out / "log.jsonl").read_text() == log  # half a line written, cut off again


@pytest.mark.parametrize("kind", ["optimizer.bin", "log.jsonl"])
def test_two_processes_stop_when_the_main_one_cannot_write(kind, tiny_voc, tmp_path, launch_two_ranks):
    """The main process fails to write a checkpoint file (every process learns it at the checkpoint's next
    collective) or a log line (the other process waits in a collective until the launcher ends it, or
    --dist-timeout): both exit well within the timeout, non-zero, the message naming the path."""
    out = tmp_path / "ddp"
    args = ["--data-root", tiny_voc, "--output-dir", out, *TINY, "--schedule", "s", "--stage-epochs", "2",
            "--max-steps-per-epoch", "1", "--batch-size", "2", "--dist-timeout", "60"]
    tic = time.monotonic()
    proc = launch_two_ranks(HELPER, REPO / "train.py", *args, cwd=tmp_path, env={**ENV, FAIL_ENV: f"{kind}:2"},
                            timeout=300)
    elapsed = time.monotonic() - tic
    assert proc.returncode != 0 and elapsed < 150, (proc.returncode, elapsed, proc.stderr[-3000:])
    path = out / "checkpoints" / ".last.tmp" / kind if kind.endswith(".bin") else out / kind
    messages = [line for line in screen_lines(proc.stderr) if line.startswith("train.py: error: ")]
    assert messages and all(m.startswith(f"train.py: error: cannot write {path}: ") for m in messages), \
        proc.stderr[-3000:]
    if kind.endswith(".bin"):
        assert len(messages) == 2  # each process stops with the same line
    assert train_state(out / "checkpoints" / "last")["epoch"] == 1 and verify(out / "checkpoints" / "last") == []
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["world_size"] == 2
    if kind.endswith(".bin"):  # with room again, both processes resume (the main one verifies, both load)
        proc = launch_two_ranks(REPO / "train.py", *args, "--resume", "auto", cwd=tmp_path, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert train_state(out / "checkpoints" / "last")["epoch"] == 2
        assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES])
def test_each_cause_is_said_in_one_line(code, tmp_path):
    """Full disk and quota say the free and the needed space; a read-only folder, an I/O or permission error their
    own cause (root ignores permissions, so these are raised, not provoked)."""
    path = tmp_path / "run" / "log.jsonl"
    with pytest.raises(WriteError) as err:
        with writing(path, needed=3 << 20):
            raise OSError(code, os.strerror(code))
    msg = str(err.value)
    assert msg.startswith(f"cannot write {path}: {os.strerror(code)} ({errno.errorcode[code]})") and "\n" not in msg
    assert ("free there, about 3.0 MiB needed" in msg) == (code in (errno.ENOSPC, errno.EDQUOT))
