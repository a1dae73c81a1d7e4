"""Few labels, many images: depth-only images (pseudo depth, no label) next to the labelled split, what each stage
draws from, stage lengths in steps, SBD's train_aug split, VOC's and Cityscapes' depth-only pools, and reusing a
finished stage prefix bit for bit."""
import json
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

import train
from data import PRESETS, DataError, VOCSegmentation
from data.pools import TrainPool, plan_stage
from data.sampler import StreamSampler
from evaluation.metrics import SegEvaluator
from models.losses import FocalLoss
from schedules import get_schedule, stage_rounds

TINY = ["--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "4", "--workers", "0",
        "--val-batch-size", "4"]
WRONG = 7  # the would-be label of every depth-only image: a class painted everywhere


def parse(root, out, *extra):
    return train.get_args_parser().parse_args(["--data-root", str(root), "--output-dir", str(out), *TINY, *extra])


def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture()
def few(tiny_voc, tmp_path):
    """tiny_voc (16 train, 7 val) with 4 labelled images (train_n4); the 12 others keep a label file that says
    class 7 everywhere: read by mistake, it would show up in the loss targets."""
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    (root / "ImageSets/Segmentation/train_n4.txt").write_text("".join(f"{i}\n" for i in ids[:4]))
    for i in ids[4:]:
        path = root / "SegmentationClass" / f"{i}.png"
        with Image.open(path) as im:
            wrong = Image.fromarray(np.full((im.height, im.width), WRONG, np.uint8))
            wrong.putpalette(im.getpalette())
        wrong.save(path)
    return root, ids[:4], ids[4:]


def test_a_depth_only_image_never_reaches_the_segmentation_loss_or_the_metrics(few, tmp_path, fresh_accelerate,
                                                                                monkeypatch):
    root, labelled, depth_only = few
    targets, scored = [], []
    real_loss, real_update = FocalLoss.forward, SegEvaluator.update

    def loss(self, logits, target):
        targets.append(target.clone())
        return real_loss(self, logits, target)

    def update(self, outputs, batch, accelerator=None):
        scored.extend(batch["id"])
        return real_update(self, outputs, batch, accelerator)

    monkeypatch.setattr(FocalLoss, "forward", loss)
    monkeypatch.setattr(SegEvaluator, "update", update)
    seen = []
    real_step = train.train_step

    def step(model, criterion, optimizer, batch, *args):
        seen.append((batch["id"], batch["label"].clone()))
        return real_step(model, criterion, optimizer, batch, *args)

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "run"
    train.main(parse(root, out, "--train-split", "train_n4", "--depth-only", "rest", "--schedule", "d_s_b",
                     "--stage-steps", "3,3,4"))
    b_batches = seen[6:]
    assert targets
    for ids, labels in seen:
        for i, label in zip(ids, labels):
            if i in depth_only:
                assert (label == 255).all(), i  # the label file (class 7 everywhere) was never read
    assert not any((t == WRONG).all(dim=(-2, -1)).any() for t in targets)  # no target is the painted label
    assert all(any(i in depth_only for i in ids) for ids, _ in b_batches)  # the b stage did mix them in
    val_ids = set((root / "ImageSets/Segmentation/val.txt").read_text().split())
    assert scored and set(scored) <= val_ids  # validation scores the val split only
    config = json.loads((out / "run_config.json").read_text())["images"]
    assert config["labelled"] == {"split": "train_n4", "count": 4}
    assert config["depth_only"]["count"] == 12 and config["depth_only"]["left_out_val"] == 7
    assert [s["images"].split(",")[0] for s in config["stages"]] == [
        "labelled + depth-only images", "labelled images", "labelled + depth-only images"]
    assert [s["count"] for s in config["stages"]] == [16, 4, 16]
    assert [s["steps"] for s in config["stages"]] == [3, 3, 4]


def test_each_stage_draws_from_its_images_in_the_configured_mix(few):
    root, labelled, depth_only = few
    preset = PRESETS["synthetic"]
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    pool = TrainPool(preset.open(root, "train_n4"), preset.open_depth_only(root, "rest", labelled, val, check=False)[0])
    ids = pool.ids()
    d, s, b = get_schedule("d_s_b", [1])
    d_plan, s_plan, b_plan = (plan_stage(pool, st, i, 4, 0.75) for i, st in enumerate((d, s, b)))

    def batches(plan, rounds=2):
        sampler = StreamSampler(plan.streams, 0, plan.rounds * rounds)
        out = []
        for r in range(len(plan.rounds) * rounds):
            sampler.set_epoch(r)
            items = [ids[i] for i, _ in sampler]
            out += [items[k: k + 4] for k in range(0, len(items), 4)]
        return out

    d_batches = [i for batch in batches(d_plan, 1) for i in batch]
    assert sorted(d_batches) == sorted(labelled + depth_only)  # an epoch of d: every image once
    assert {i for batch in batches(s_plan) for i in batch} == set(labelled)
    for batch in batches(b_plan):
        assert [i in labelled for i in batch] == [True, False, False, False]  # 1 labelled + 3 depth-only (0.75)
    assert (d_plan.epoch_steps, s_plan.epoch_steps, b_plan.epoch_steps) == (4, 1, 4)
    none = TrainPool(preset.open(root, "train_n4"))
    assert [len(s.indices) for s in plan_stage(none, b, 2, 4, 0.5).streams] == [4]  # nothing to mix: labelled only


def test_stage_lengths_in_steps_make_rounds():
    d = get_schedule("d_s_b", stage_steps=[1000, 25, 30])[0]
    assert d.steps == 1000 and d.epochs is None
    assert stage_rounds(d, epoch_steps=250) == [100] * 10  # a tenth of the stage by default
    assert stage_rounds(d, epoch_steps=250, val_every=300) == [300, 300, 300, 100]
    s = get_schedule("d_s_b", [2])[1]
    assert stage_rounds(s, epoch_steps=7) == [7, 7] and stage_rounds(s, epoch_steps=7, cap=3) == [3, 3]
    with pytest.raises(ValueError, match="not both"):
        get_schedule("d_s_b", [2], stage_steps=[10])
    with pytest.raises(ValueError, match="3 stages"):
        get_schedule("d_s_b", stage_steps=[10, 10])


def test_a_presets_steps_by_stage_name_apply_when_no_length_is_given():
    by_name = {"d": 40, "s": 200, "b": 80}
    assert [s.steps for s in get_schedule("d_s_b", default_steps=by_name)] == [40, 200, 80]
    assert [s.steps for s in get_schedule("s", default_steps=by_name)] == [200]
    assert [s.epochs for s in get_schedule("d_s_b", [2], default_steps=by_name)] == [2, 2, 2]  # the flag wins
    assert [s.steps for s in get_schedule("s_b", stage_steps=[7], default_steps=by_name)] == [7, 7]
    only_once = get_schedule("s", stage_steps=[130])[0]
    assert stage_rounds(only_once, epoch_steps=9, val_every=0) == [130]  # 0: validated once, at the stage's end


def test_reusing_a_stage_prefix_gives_the_weights_of_training_it_again(few, tmp_path, fresh_accelerate):
    root, _, _ = few
    store = tmp_path / "prefixes"
    common = ["--depth-only", "rest", "--schedule", "d_s_b", "--stage-steps", "3,2,2", "--val-every", "2"]
    train.main(parse(root, tmp_path / "a", *common, "--train-split", "train_n4", "--reuse-prefixes", str(store)))
    reset_accelerate()
    train.main(parse(root, tmp_path / "again", *common, "--train-split", "train_n4"))  # no store: trains it all
    reset_accelerate()
    train.main(parse(root, tmp_path / "b", *common, "--train-split", "train_n4", "--copy-weights",
                     "--reuse-prefixes", str(store)))
    reset_accelerate()
    train.main(parse(root, tmp_path / "b_again", *common, "--train-split", "train_n4", "--copy-weights"))
    weights = {k: load_file(tmp_path / k / "checkpoints" / "last" / "model.safetensors")
               for k in ("a", "again", "b", "b_again")}
    for x, y in (("a", "again"), ("b", "b_again")):
        assert all(torch.equal(weights[x][n], weights[y][n]) for n in weights[x])
    reused = json.loads((tmp_path / "b" / "run_config.json").read_text())["reused_prefix"]
    assert reused["stages"] == 1 and reused["made_by"] == str((tmp_path / "a").resolve())  # the d stage, shared
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == [0, 0, 1, 2] and "reused_prefix" not in json.loads(
        (tmp_path / "a" / "run_config.json").read_text())


def test_sbd_train_aug_and_the_voc_depth_only_pool(tmp_path, fresh_accelerate):
    """A fake VOC tree: 10 images, val 3, train 3 (SegmentationClass), train_aug 5 (SegmentationClassAug, grey PNGs,
    the SBD labels of 2 train images differ from VOC's), 2 images in no split."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    ids = [f"2008_{k:06d}" for k in range(10)]
    val, train_ids, aug = ids[:3], ids[3:6], ids[3:8]
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "PseudoDepth", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, i in enumerate(ids):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray((rng.random((64, 64)) * 65535).astype(np.uint16)).save(root / "PseudoDepth" / f"{i}.png")
        if i in val or i in train_ids:
            Image.fromarray(np.full((64, 64), 1, np.uint8), mode="L").save(root / "SegmentationClass" / f"{i}.png")
        if i in aug:
            Image.fromarray(np.full((64, 64), 2, np.uint8), mode="L").save(root / "SegmentationClassAug" / f"{i}.png")
    for name, split in (("val", val), ("train", train_ids), ("train_aug", aug)):
        (root / "ImageSets/Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in split))
    sbd = VOCSegmentation(root, "train_aug")
    assert len(sbd) == 5 and all((sbd[k]["label"] == 2).all() for k in range(5)) and not sbd.with_instances
    assert all((VOCSegmentation(root, "train")[k]["label"] == 1).all() for k in range(3))
    voc = PRESETS["voc"]
    pool, choice = voc.open_depth_only(tmp_path / "VOCdevkit", "rest", aug, val)
    assert pool.ids == ids[8:] and (choice.listed, choice.labelled_dropped, choice.val_dropped) == (10, 5, 3)
    assert (pool[0]["label"] == 255).all() and pool[0]["depth"].shape == (1, 64, 64)
    with_val, _ = voc.open_depth_only(root, "rest", train_ids, val, with_val=True)
    assert with_val.ids == sorted(val + ids[6:])
    (root / "PseudoDepth" / f"{ids[9]}.png").unlink()
    with pytest.raises(DataError, match=rf"(?s)1 of 2 depth-only images have no pseudo depth \(e.g. {ids[9]}\).*make_depth"):
        voc.open_depth_only(root, "rest", aug, val)
    with pytest.raises(DataError, match="leaves no image"):
        voc.open_depth_only(root, "train", train_ids, val)


def test_cityscapes_subsets_and_train_extra_as_depth_only(tmp_path):
    """A labelled subset listed in ImageSets/Segmentation/ (tools/make_subsets.py) and `rest`: the other train images
    and train_extra's (which has no fine labels), never val's."""
    from test_cityscapes import TRAIN, VAL, scene, write_sample

    root = tmp_path / "cityscapes"
    for split, samples in (("train", TRAIN), ("val", VAL)):
        for id_, objects in samples.items():
            write_sample(root, split, id_, *scene(objects))
    extra = "erfurt_000000_000019"
    write_sample(root, "train_extra", extra, *scene([]))
    shutil.rmtree(root / "gtFine" / "train_extra")
    every = [*TRAIN, *VAL, extra]
    (root / "PseudoDepth").mkdir()
    for i in every:
        Image.fromarray(np.zeros((64, 128), np.uint16)).save(root / "PseudoDepth" / f"{i}.png")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    first = next(iter(TRAIN))
    (lists / "train_n1.txt").write_text(f"{first}\n")
    preset = PRESETS["cityscapes"]
    labelled = preset.open(root, "train_n1", with_depth=True)
    assert labelled.ids == [first] and labelled[0]["label"].shape == (64, 128)
    pool, choice = preset.open_depth_only(root, "rest", labelled.ids, list(VAL))
    assert pool.ids == sorted([*list(TRAIN)[1:], extra]) and choice.val_dropped == 0
    (lists / "bad.txt").write_text("nowhere_000000_000000\n")
    with pytest.raises(DataError, match="1 ids are not in gtFine's train or val"):
        preset.open(root, "bad")
