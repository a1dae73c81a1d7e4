"""A run that is refused or stops on bad data leaves an existing run folder exactly as it was: no rewritten
run_config.json, no new TensorBoard file, no checkpoint or log touched (issue 17)."""
import json
import shutil

import pytest
from test_reliability import bad_label_value, first_read, parse, snapshot, truncate_jpeg

import train
from data.voc import DataError
from run_state import CheckpointError


@pytest.fixture()
def finished(tiny_voc, tmp_path, fresh_accelerate):
    """A finished one-epoch run of schedule b (resnet18) in its own folder, and its files' snapshot."""
    out = tmp_path / "run"
    train.main(parse(tiny_voc, out, "--schedule", "b", "--stage-epochs", "1", "--max-steps-per-epoch", "2"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert (out / "run_config.json").is_file() and list((out / "tensorboard").rglob("events.out.tfevents.*"))
    return out, snapshot(out)


@pytest.mark.parametrize("extra, error, pattern", [
    (["--resume", "auto", "--encoder", "resnet34"], CheckpointError, r"another model configuration: encoder=resnet18"),
    (["--resume", "auto", "--schedule", "s_b"], CheckpointError, r"checkpoint of schedule 'b', this run is 's_b'"),
    ([], CheckpointError, r"holds a run \(log\.jsonl, metrics\.json, checkpoints/last\): continue it with --resume auto"),
], ids=["encoder", "schedule", "fresh-start"])
def test_refused_run_leaves_the_folder_as_it_was(extra, error, pattern, finished, tiny_voc):
    out, before = finished
    args = extra if "--schedule" in extra else [*extra, "--schedule", "b"]
    with pytest.raises(error, match=pattern):
        train.main(parse(tiny_voc, out, "--stage-epochs", "2", "--max-steps-per-epoch", "2", *args))
    assert snapshot(out) == before


@pytest.mark.parametrize("corrupt", [truncate_jpeg, bad_label_value], ids=["truncated-jpeg", "label-value"])
def test_run_stopped_mid_epoch_on_bad_data_leaves_the_folder_as_it_was(corrupt, finished, tiny_voc, tmp_path):
    out, before = finished
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    pattern = corrupt(root, first_read(root, 8))  # what the resumed run's next epoch reads first (after 2 x 4)
    with pytest.raises(DataError, match=pattern):
        train.main(parse(root, out, "--schedule", "b", "--stage-epochs", "2", "--max-steps-per-epoch", "2",
                         "--resume", "auto"))
    assert snapshot(out) == before


def test_resumed_run_keeps_its_run_config_and_records_what_changed(finished, tiny_voc):
    out, before = finished
    original = (out / "run_config.json").read_bytes()
    train.main(parse(tiny_voc, out, "--schedule", "b", "--stage-epochs", "2", "--max-steps-per-epoch", "2",
                     "--resume", "auto"))
    assert (out / "run_config.json").read_bytes() == original
    resumed = json.loads((out / "run_config.resumed.json").read_text())
    assert [s["epochs"] for s in resumed["stages"]] == [2] and resumed["resume"] == "auto"
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_finished_run_resumed_again_writes_nothing(finished, tiny_voc):
    out, before = finished
    train.main(parse(tiny_voc, out, "--schedule", "b", "--stage-epochs", "1", "--max-steps-per-epoch", "2",
                     "--resume", "auto"))
    assert snapshot(out) == before


def test_check_data_checks_depth_only_for_a_schedule_that_needs_it(tiny_voc, tmp_path, capsys):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    shutil.rmtree(root / "PseudoDepth")
    assert train.main(parse(root, tmp_path / "x", "--check-data", "--schedule", "s"))["errors"] == 0
    assert "schedule s (needs no pseudo depth)" in capsys.readouterr().out
    assert train.main(parse(root, tmp_path / "x", "--check-data"))["errors"] > 0  # the default d_s_b needs it
    assert "schedule d_s_b (needs pseudo depth: pass --schedule s to check a seg-only run)" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
