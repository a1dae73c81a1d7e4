"""End to end: every schedule trains on the synthetic set; stage mechanics; two real CPU ranks."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import train
from data import PRESETS
from data.pools import plan_stage
from models import FocalLoss, ModelConfig, build_model, load_model
from run_state import TrainState
from models.model import MultiDecoderModel
from schedules import SCHEDULES, get_schedule

REPO = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "4",
        "--stage-epochs", "1", "--max-steps-per-epoch", "2", "--workers", "0", "--val-batch-size", "4"]
CONTRACT_KEYS = {"mIoU", "fg_mIoU", "pixel_acc", "iIoU"}


def parse(root, out, *extra):
    """train.py's args with the synthetic preset's defaults filled in, as main() fills them."""
    args = train.get_args_parser().parse_args(["--data-root", str(root), "--output-dir", str(out), *TINY, *extra])
    return PRESETS["synthetic"].fill(args)


@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_schedule_trains_end_to_end(schedule, copy, tiny_voc, tmp_path, fresh_accelerate, monkeypatch):
    copies = []
    real_copy = MultiDecoderModel.copy_decoder

    def checked_copy(self, src, dst):
        names = real_copy(self, src, dst)
        a, b = self.decoders[src].state_dict(), self.decoders[dst].state_dict()
        copies.append((src, dst, all(torch.equal(a[k], b[k]) for k in a), len(names) == len(a)))
        return names

    monkeypatch.setattr(MultiDecoderModel, "copy_decoder", checked_copy)
    out = tmp_path / "run"
    train.main(parse(tiny_voc, out, "--schedule", schedule, *(["--copy-weights"] if copy else [])))

    metrics = json.loads((out / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in CONTRACT_KEYS)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["stage_name"] for line in lines] == schedule.split("_")  # one epoch per stage
    assert all(line["steps"] == 2 for line in lines)
    assert (out / "checkpoints/last/model.safetensors").is_file() and (out / "checkpoints/best").is_dir()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    tasks = load_model(out / "checkpoints" / "last").tasks
    assert tasks == (("seg",) if schedule == "s" else ("seg", "depth"))
    expected = {"s_b": [("seg", "depth")], "s_d_b": [("seg", "depth")], "d_b": [("depth", "seg")],
                "d_s_b": [("depth", "seg")]}.get(schedule, []) if copy else []
    assert [(s, d) for s, d, _, _ in copies] == expected
    assert all(equal and complete for _, _, equal, complete in copies)


def test_the_presets_stage_steps_and_decoder_widths_reach_the_run(tiny_voc, tmp_path, fresh_accelerate, monkeypatch):
    """No length flag: the preset's steps by stage name, validated once at the stage's end; --decoder-channels
    reaches the model and its config.json."""
    quick = dataclasses.replace(PRESETS["synthetic"], stage_steps=(("d", 3), ("s", 2), ("b", 1)), val_every=0)
    monkeypatch.setitem(PRESETS, "synthetic", quick)
    out = tmp_path / "run"
    argv = TINY[:TINY.index("--stage-epochs")] + TINY[TINY.index("--workers"):]  # no length flags
    threads = torch.get_num_threads()
    try:
        train.main(quick.fill(train.get_args_parser().parse_args(
            ["--data-root", str(tiny_voc), "--output-dir", str(out), *argv, "--schedule", "d_s_b",
             "--decoder-channels", "32,16,16,8,8"])))
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(line["stage_name"], line["steps"]) for line in lines] == [("d", 3), ("s", 2), ("b", 1)]
    assert load_model(out / "checkpoints" / "last").config.decoder_channels == (32, 16, 16, 8, 8)
    # no --threads: every core of this machine, whatever OMP_NUM_THREADS says (accelerate launch sets it to 1)
    assert json.loads((out / "run_config.json").read_text())["cpu_threads"] == len(os.sched_getaffinity(0))


def test_cpu_threads_split_the_cores_among_this_machines_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train.cpu_threads(None) == 8 and train.cpu_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's (accelerate launch --num_processes 2)
    assert train.cpu_threads(None) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert train.cpu_threads(None) == 1


def test_decoder_outside_a_stage_is_bit_identical_and_gets_no_gradient(tiny_voc, tmp_path, fresh_accelerate):
    args = parse(tiny_voc, tmp_path)
    accelerator = Accelerator(cpu=True)
    pool, val_set, _ = train.get_datasets(args, PRESETS["synthetic"], tiny_voc, True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18"))
    depth_before = {k: v.clone() for k, v in model.state_dict().items() if ".depth" in k}
    seg_before = {k: v.clone() for k, v in model.state_dict().items() if ".seg" in k}
    stage = get_schedule("d_s_b", [1])[1]  # the "s" stage
    plan = plan_stage(pool, stage, 1, 4, 0.5, cap=2)
    loaders = train.get_train_loader(pool, plan, args, 1), train.get_loader(val_set, args, batch_size=4)
    model, optimizer, train_dl, _ = train.setup_stage(accelerator, model, stage, args, *loaders)
    state = TrainState(steps_per_epoch=2)
    criterion = train.Criterion(FocalLoss(), stage.weights())
    options = train.LoopOptions(args.lr, args.lr_schedule, args.warmup, args.log_every, 0, args.clip_grad_norm)
    run = train.RunLog(accelerator, tmp_path / "run", {}, state, resumed=False)
    train.train_one_epoch(model, criterion, optimizer, train_dl, accelerator, plan, state, run, options)
    m = accelerator.unwrap_model(model)
    after = m.state_dict()
    assert state.step == 2 and state.global_step == 2
    assert all(torch.equal(depth_before[k], after[k]) for k in depth_before)  # weights and BN buffers
    assert all(p.grad is None for n, p in m.named_parameters() if ".depth" in n)
    assert any(not torch.equal(seg_before[k], after[k]) for k in seg_before)  # the stage did train
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in m.named_parameters() if ".depth" not in n
    }


def test_two_cpu_ranks_split_the_epoch_and_count_validation_once(tiny_voc, tmp_path, fresh_accelerate, launch_two_ranks):
    out = tmp_path / "ddp"
    proc = launch_two_ranks(REPO / "train.py", "--data-root", tiny_voc, "--output-dir", out, "--schedule", "s_b",
                            "--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "2",
                            "--stage-epochs", "1", "--workers", "0", "--val-batch-size", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # 16 training images, batch 2 per rank: one process would take 8 steps, each of two ranks 4
    assert [line["steps"] for line in lines] == [4, 4] and all(line["world_size"] == 2 for line in lines)
    ddp_confmat = torch.tensor(json.loads((out / "metrics.json").read_text())["confusion_matrix"])

    accelerator = Accelerator(cpu=True)
    args = parse(tiny_voc, tmp_path / "eval", "--val-batch-size", "1")
    _, val_set, _ = train.get_datasets(args, PRESETS["synthetic"], tiny_voc, True)
    val_loader = train.get_loader(val_set, args, batch_size=1)
    model = load_model(out / "checkpoints" / "last").to(memory_format=torch.channels_last)
    model, val_loader = accelerator.prepare(model, val_loader)
    single, _ = train.evaluate(model, val_loader, accelerator, 21, ("seg", "depth"))
    assert ddp_confmat.sum() == torch.tensor(single["confusion_matrix"]).sum() == 7 * 64 * 64 - ddp_ignored(tiny_voc)
    assert torch.equal(ddp_confmat, torch.tensor(single["confusion_matrix"]))


def ddp_ignored(root) -> int:
    """Pixels labelled 255 in the val split (not counted by the confusion matrix)."""
    import numpy as np
    from PIL import Image

    ids = (Path(root) / "ImageSets/Segmentation/val.txt").read_text().split()
    return sum(int((np.array(Image.open(Path(root) / "SegmentationClass" / f"{i}.png")) == 255).sum()) for i in ids)


def test_missing_pseudo_depth_fails_before_the_first_step(tiny_voc, tmp_path, fresh_accelerate):
    import shutil

    from data import DataError

    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    for i in ids[:5]:
        (root / "PseudoDepth" / f"{i}.png").unlink()
    out = tmp_path / "run"
    with pytest.raises(DataError) as err:
        train.main(parse(root, out, "--schedule", "d_s_b"))
    msg = str(err.value)
    assert "5 of 16" in msg and ids[0] in msg and f"python tools/make_depth.py --data-root {root} --split train" in msg
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()
    train.main(parse(root, tmp_path / "seg_only", "--schedule", "s"))  # a seg-only schedule needs no depth

