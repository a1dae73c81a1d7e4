"""tools/make_depth.py on tiny random DINOv2 depth models saved with save_pretrained (no network)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
)
from transformers.modeling_outputs import DepthEstimatorOutput

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.visualize import PREVIEW_HEIGHT, TITLE_HEIGHT  # noqa: E402
from data.voc import DataError, depth_fix_command, missing_depth  # noqa: E402
from models.depth_teacher import native_kind, to_stored  # noqa: E402
from tools import make_depth  # noqa: E402

# (width, height): odd sizes, both orientations, repeats (so batches share a shape), 56x42 needs no padding.
SIZES = [(50, 37), (37, 50), (56, 42), (56, 42), (70, 45), (45, 70), (63, 41), (56, 56), (33, 29)]
BACKBONE = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=56,
                patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
HEAD = dict(neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, head_hidden_size=8)


def make_voc(root: Path, sizes=SIZES, split="trainval") -> list[str]:
    """A VOC2012 folder with random JPEGs of the given sizes; returns the ids."""
    rng = np.random.default_rng(0)
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = [f"2007_{k:06d}" for k in range(len(sizes))]
    for id_, (w, h) in zip(ids, sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{id_}.jpg")
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return ids


def randomize(model: torch.nn.Module, head_bias: torch.nn.Parameter) -> None:
    """Weights large enough that the tiny model's output varies, and stays positive."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        head_bias.fill_(20.0)


def dpt_model_dir(out: Path, flat: bool = False) -> Path:
    """DPT head on a DINOv2 backbone with the NYU heads' processor (no resize, pad to 14); flat: the head's last
    conv zeroed, so the raw output is 0 everywhere, below the metric clamp (a degenerate model)."""
    config = DPTConfig(backbone_config=Dinov2Config(**BACKBONE, apply_layernorm=False), add_projection=False,
                       use_bias_in_fusion_residual=False, is_hybrid=False, **HEAD)
    model = DPTForDepthEstimation(config)
    randomize(model, model.head.head[-2].bias)
    if flat:
        with torch.no_grad():
            model.head.head[-2].weight.zero_()
            model.head.head[-2].bias.zero_()
    model.save_pretrained(out)
    DPTImageProcessor(do_resize=False, do_rescale=False, do_pad=True, size_divisor=14,
                      image_mean=(123.675, 116.28, 103.53), image_std=(58.395, 57.12, 57.375)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dpt_dir(tmp_path_factory) -> Path:
    return dpt_model_dir(tmp_path_factory.mktemp("dpt"))


def depth_anything_dir(out: Path, estimation_type: str = "relative") -> Path:
    """Depth Anything on a DINOv2 backbone with the V2 processor (aspect-keeping resize, multiple of 14)."""
    config = DepthAnythingConfig(backbone_config=Dinov2Config(**BACKBONE), reassemble_hidden_size=16, patch_size=14,
                                 depth_estimation_type=estimation_type, **HEAD)
    model = DepthAnythingForDepthEstimation(config)
    randomize(model, model.head.conv3.bias)
    model.save_pretrained(out)
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def da_dir(tmp_path_factory) -> Path:
    return depth_anything_dir(tmp_path_factory.mktemp("da"))


def run(data_root: Path, model: Path, *extra: str) -> None:
    """main() in this process, CPU, no DataLoader workers."""
    argv = ["--data-root", str(data_root), "--model", str(model), "--batch-size", "3", "--workers", "0", *extra]
    make_depth.main(make_depth.get_args_parser().parse_args(argv))


def read_png(path: Path) -> np.ndarray:
    """A 16-bit PNG as int64 (fails on another mode or a truncated file)."""
    with Image.open(path) as im:
        assert im.mode.startswith("I;16"), f"{path} is {im.mode}, not 16-bit"
        return np.array(im).astype(np.int64)


def check_set(voc: Path, ids: list[str]) -> None:
    """Every id has a 16-bit map of its image's size spanning 0..65535."""
    for id_ in ids:
        depth = read_png(voc / "PseudoDepth" / f"{id_}.png")
        with Image.open(voc / "JPEGImages" / f"{id_}.jpg") as im:
            assert depth.shape == (im.height, im.width), id_
        assert depth.min() == 0 and depth.max() == 65535, id_


@pytest.mark.parametrize("kind", ["dpt", "da"])
def test_every_id_gets_full_range_map(tmp_path, kind, dpt_dir, da_dir):
    ids = make_voc(tmp_path)
    run(tmp_path, dpt_dir if kind == "dpt" else da_dir, "--preview", "3")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    check_set(voc, ids)
    meta = json.loads((voc / "PseudoDepth" / "meta.json").read_text())
    assert meta["native"] == ("metric" if kind == "dpt" else "disparity")
    assert meta["count"] == meta["total"] == len(ids) and meta["complete"]
    assert sorted(meta["shards"][0]["written"]) == ids and meta["shards"][0]["constant"] == meta["constant"] == 0
    preview = np.array(Image.open(voc / "PseudoDepth" / "preview.png"))
    row = PREVIEW_HEIGHT + TITLE_HEIGHT
    assert preview.shape[0] == 3 * row
    for k in range(3):  # titles "input <id>" and "pseudo depth" on a white strip above each row's two panels
        strip = preview[k * row : k * row + TITLE_HEIGHT]
        assert (strip == 255).all(-1).mean() > 0.6 and (strip.max(-1) < 128).sum() > 20
    assert missing_depth(voc, ids) == [] and missing_depth(tmp_path, ids + ["x"]) == ["x"]


class Fake(torch.nn.Module):
    """Stands in for a loaded model (keeps its config): predicted depth = fn(height, width)."""

    def __init__(self, model, fn):
        super().__init__()
        self.config, self.fn = model.config, fn

    def forward(self, pixel_values):
        b, _, h, w = pixel_values.shape
        return DepthEstimatorOutput(predicted_depth=self.fn(h, w).expand(b, h, w).clone())


def fake_loader(monkeypatch, fn) -> None:
    """make_depth.load_model returns the real processor and a Fake around the real model."""
    load = make_depth.load_model

    def fake(name, revision):
        model, processor = load(name, revision)
        return Fake(model, fn), processor

    monkeypatch.setattr(make_depth, "load_model", fake)


def ramp(h: int, w: int) -> torch.Tensor:
    """1 on the left to 3 on the right."""
    return 1 + 2 * torch.linspace(0, 1, w).expand(h, w)


@pytest.mark.parametrize("kind", ["metric", "disparity"])
def test_convention_metric_inverted_disparity_not(tmp_path, monkeypatch, kind, dpt_dir, da_dir):
    ids = make_voc(tmp_path, sizes=[(56, 42), (50, 37)])
    fake_loader(monkeypatch, ramp)
    run(tmp_path, dpt_dir if kind == "metric" else da_dir)  # native kind from the config: DPT-DINOv2 / Depth Anything
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    # 56x42 is a multiple of 14 for both processors: the ramp reaches the image unresized. 50x37: the DPT
    # processor pads it to 56x42 (columns 3..52 are the image); Depth Anything resizes it to 56x42 and back.
    ramps = {ids[0]: (1 + 2 * np.arange(56) / 55, 1.0)}
    if kind == "metric":
        ramps[ids[1]] = (1 + 2 * np.arange(3, 53) / 55, 1.0)
    else:  # bicubic keeps a ramp linear but for the border pixels
        ramps[ids[1]] = (1 + 2 * np.linspace(0, 1, 50), 0.002 * 65535)
    for id_, (d, atol) in ramps.items():
        x = 1 / d if kind == "metric" else d
        expected = (x - x.min()) / (x.max() - x.min()) * 65535
        depth = read_png(voc / "PseudoDepth" / f"{id_}.png")
        np.testing.assert_allclose(depth, np.broadcast_to(expected, depth.shape), atol=atol)
    assert json.loads((voc / "PseudoDepth" / "meta.json").read_text())["native"] == kind


def test_native_kind_from_config_and_override(tmp_path, dpt_dir):
    metric_da = depth_anything_dir(tmp_path / "da_metric", "metric")
    assert native_kind(DPTConfig.from_pretrained(dpt_dir)) == "metric"
    assert native_kind(DepthAnythingConfig.from_pretrained(metric_da)) == "metric"
    assert native_kind(DepthAnythingConfig()) == "disparity"
    assert native_kind(DPTConfig()) == "disparity"  # ViT DPT (MiDaS) predicts relative disparity
    assert native_kind(DPTConfig.from_pretrained(dpt_dir), "disparity") == "disparity"


def test_to_stored_values_and_constant():
    pred = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    np.testing.assert_array_equal(to_stored(pred, "disparity"), [[16384, 32768], [65535, 0]])
    # metric: 1/d with d clamped at 1e-3 -> the zero is nearest.
    inv = 1 / np.array([1.0, 2.0, 4.0, 1e-3])
    expected = np.round((inv - inv.min()) / (inv.max() - inv.min()) * 65535).reshape(2, 2)
    np.testing.assert_array_equal(to_stored(pred, "metric"), expected)
    assert not to_stored(torch.full((3, 4), 7.0), "metric").any()
    with pytest.raises(FloatingPointError):
        to_stored(torch.tensor([[1.0, float("nan")]]), "disparity")


def test_constant_predictions_are_counted(tmp_path, monkeypatch, dpt_dir, capsys):
    sizes = [(50, 37), (70, 42), (56, 42)]  # the DPT processor pads 50x37 to 56x42; 70x42 stays
    ids = make_voc(tmp_path, sizes=sizes)
    fake_loader(monkeypatch, lambda h, w: torch.full((h, w), 2.5) if w == 56 else ramp(h, w))
    run(tmp_path, dpt_dir)
    out, err = capsys.readouterr()
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for id_, (w, h) in zip(ids, sizes):
        depth = read_png(voc / "PseudoDepth" / f"{id_}.png")
        assert depth.shape == (h, w) and depth.any() == (w == 70)
    lines = [line for line in err.splitlines() if "constant depth prediction" in line]
    assert lines == [f"warning: {i}: constant depth prediction, writing zeros" for i in sorted([ids[0], ids[2]])]
    assert "2 of 3 maps constant (stored as zeros)" in out.splitlines()
    meta = json.loads((voc / "PseudoDepth" / "meta.json").read_text())
    assert meta["constant"] == meta["shards"][0]["constant"] == 2 and meta["complete"]


def test_degenerate_model_exits_non_zero_naming_it(tmp_path, capsys):
    ids = make_voc(tmp_path, sizes=SIZES[:4])
    flat = dpt_model_dir(tmp_path / "flat_dpt", flat=True)
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path, flat)
    assert exit_.value.code == (f"error: the output of depth model {flat} is degenerate: all 4 maps of this run are "
                                "constant (stored as zeros, nothing to learn from). Check the model, its --revision "
                                "and --native, then remake the maps with --overwrite")  # a str: exit status 1
    out, err = capsys.readouterr()
    assert "4 of 4 maps constant (stored as zeros)" in out.splitlines()
    assert sum(f"{i}: constant depth prediction" in err for i in ids) == 4
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    meta = json.loads((voc / "PseudoDepth" / "meta.json").read_text())
    assert meta["constant"] == meta["shards"][0]["constant"] == 4 and sorted(meta["shards"][0]["written"]) == ids
    assert not any(read_png(voc / "PseudoDepth" / f"{i}.png").any() for i in ids)


def test_preview_of_existing_maps_keeps_the_record(tmp_path, dpt_dir):
    ids = make_voc(tmp_path, sizes=SIZES[:4])
    run(tmp_path, dpt_dir)
    depth_dir = tmp_path / "VOCdevkit" / "VOC2012" / "PseudoDepth"
    record = (depth_dir / "meta.json").read_bytes()
    maps = {i: (depth_dir / f"{i}.png").read_bytes() for i in ids}
    run(tmp_path, dpt_dir, "--preview", "2")
    assert (depth_dir / "meta.json").read_bytes() == record  # still the run that wrote the 4 maps, at its speed
    assert sorted(json.loads(record)["shards"][0]["written"]) == ids
    assert {i: (depth_dir / f"{i}.png").read_bytes() for i in ids} == maps
    assert Image.open(depth_dir / "preview.png").size[1] == 2 * (PREVIEW_HEIGHT + TITLE_HEIGHT)


def test_bad_input_errors_name_the_problem(tmp_path, dpt_dir):
    ids = make_voc(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    assert depth_fix_command(voc, "train") == f"python tools/make_depth.py --data-root {voc} --split train"
    (voc / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        run(voc, dpt_dir, "--split", "empty")
    with pytest.raises(DataError, match="nosuch.txt"):
        run(voc, dpt_dir, "--split", "nosuch")
    with pytest.raises(DataError, match="JPEGImages"):
        run(tmp_path / "nowhere", dpt_dir)
    (voc / "JPEGImages" / f"{ids[4]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=f"{ids[4]}.jpg"):
        run(voc, dpt_dir)
    Image.new("RGB", (20, 10)).save(voc / "JPEGImages" / f"{ids[4]}.jpg")
    run(voc, dpt_dir, "--split", "all")
    check_set(voc, ids)
    def stamps() -> dict:
        return {i: ((st := (voc / "PseudoDepth" / f"{i}.png").stat()).st_ino, st.st_mtime_ns) for i in ids}

    before = stamps()
    with pytest.raises(ValueError, match="--overwrite"):  # another conversion must not mix into the folder
        run(voc, dpt_dir, "--native", "disparity")
    assert stamps() == before
    run(voc, dpt_dir, "--native", "disparity", "--overwrite", "--split", "all")
    assert json.loads((voc / "PseudoDepth" / "meta.json").read_text())["native"] == "disparity"
    after = stamps()
    assert all(after[i] != before[i] for i in ids)
    check_set(voc, ids)


SLOW_SAVE = """
import io, os, sys, time
from PIL import Image
from tools import make_depth

save = Image.Image.save


def slow_save(self, fp, format=None, **kwargs):
    buf = io.BytesIO()
    save(self, buf, format=format or "PNG", **kwargs)
    data = buf.getvalue()
    f = open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp
    f.write(data[: len(data) // 2])
    f.flush()
    time.sleep(0.25)
    f.write(data[len(data) // 2 :])
    if f is not fp:
        f.close()


Image.Image.save = slow_save
make_depth.main(make_depth.get_args_parser().parse_args(sys.argv[1:]))
"""


def test_killed_run_resumes_without_redoing_or_corrupting(tmp_path, dpt_dir):
    ids = make_voc(tmp_path, sizes=[(40 + k, 30 + k) for k in range(12)])
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    depth_dir = voc / "PseudoDepth"
    # Saving is slowed halfway through each file, so the kill lands mid-write.
    script = tmp_path / "slow_make_depth.py"
    script.write_text(SLOW_SAVE)
    argv = ["--data-root", str(tmp_path), "--model", str(dpt_dir), "--batch-size", "1", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(depth_dir.glob("*.png"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.stem: p.stat() for p in depth_dir.glob("*.png")}
    assert 4 <= len(done) < len(ids), f"kill missed the run: {len(done)} maps"
    for id_ in done:
        assert read_png(depth_dir / f"{id_}.png").max() == 65535  # decodes, complete
    run(tmp_path, dpt_dir)
    check_set(voc, ids)
    for id_, st in done.items():
        now = (depth_dir / f"{id_}.png").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{id_} was redone"
    assert not list(depth_dir.glob(".*.tmp")), "temp files left behind"
    meta = json.loads((depth_dir / "meta.json").read_text())
    assert sorted(meta["shards"][0]["written"]) == sorted(set(ids) - set(done))


def test_two_processes_write_disjoint_shards(tmp_path, dpt_dir, launch_two_ranks):
    ids = make_voc(tmp_path)
    result = launch_two_ranks("tools/make_depth.py", "--data-root", tmp_path, "--model", dpt_dir, "--batch-size", "2",
                              "--workers", "0", cwd=REPO, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    meta = json.loads((voc / "PseudoDepth" / "meta.json").read_text())
    assert meta["processes"] == 2
    shards = {s["rank"]: set(s["written"]) for s in meta["shards"]}
    assert sorted(shards) == [0, 1] and shards[0] and shards[1]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(ids)
    assert "rank 1/2: wrote" in result.stdout
    check_set(voc, ids)
