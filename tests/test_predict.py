"""tools/predict.py: VOC-palette masks at the image's size, overlays, depth images, both backends, bad input."""
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.synthetic import VOC_PALETTE
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, SIZE_DIVISOR, eval_image
from data.voc import DataError
from data.visualize import overlay
from evaluation.inference import onnx_predictor, predict_rgb, torch_predictor
from models import ModelConfig, build_model, load_model, save_model
from tools import export
from tools import predict as predict_tool

TINY = ModelConfig(encoder="resnet18", decoder_channels=(64, 32, 16, 16, 8))
NUM_REAL = 8  # real VOC images predicted: the smallest ones, for speed
NUM_CHECKED = 2  # of which recomputed independently
ORT_TOL = 1e-4  # max abs diff / max |logit|


def save_tiny(folder):
    """A random tiny multi-decoder model; zero head biases so that the masks depend on the image."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    with torch.no_grad():
        for head in model.heads.values():
            head.bias.zero_()
    save_model(model, folder / "checkpoints" / "last")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported folder whose training checkpoint is deleted afterwards: predict must need nothing else."""
    root = tmp_path_factory.mktemp("exported")
    run = save_tiny(root / "run")
    export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(run), "--out", str(root / "model"), "--flops-size", "32", "--check-sizes", "35x37",
         "--check-batch", "1", "--onnx-exporter", "legacy"]))  # the default exporter is tested in test_export.py
    shutil.rmtree(run)
    return root / "model"


def run_predict(*argv):
    predict_tool.main(predict_tool.get_args_parser().parse_args([str(a) for a in argv]))


def write_images(folder, sizes=((67, 71), (40, 50))):
    """Smooth random RGB images (h, w) as a.png, b.jpg, ... and a file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        small = gen.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        paths.append(folder / f"{'abcdefgh'[i]}.{'png' if i % 2 == 0 else 'jpg'}")
        img.save(paths[-1])
    (folder / "notes.txt").write_text("not an image")
    return paths


@torch.no_grad()
def independent_logits(model, path) -> torch.Tensor:
    """Normalise with ImageNet statistics, run at the image's size; no repo helpers."""
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy((img - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32))
    return model(x.permute(2, 0, 1)[None])["seg"][0]


def test_real_voc_images_give_palette_masks_of_the_image_size(voc_mini, exported, tmp_path):
    area = lambda p: np.prod(Image.open(p).size)  # noqa: E731  (reads the header only)
    images = sorted(sorted((voc_mini / "JPEGImages").glob("*.jpg")), key=area)[:NUM_REAL]
    assert len(images) == NUM_REAL and any(s % SIZE_DIVISOR for p in images for s in Image.open(p).size)
    run_predict("--model", exported, "--input", *images, "--out", tmp_path / "pred", "--device", "cpu")
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(f"{p.stem}.png" for p in images)
    model = load_model(exported)
    for i, path in enumerate(images):
        mask = Image.open(tmp_path / "pred" / f"{path.stem}.png")
        assert mask.mode == "P" and mask.size == Image.open(path).size
        assert mask.getpalette()[: 3 * 21] == list(VOC_PALETTE[: 3 * 21])
        if i < NUM_CHECKED:
            logits = independent_logits(model, path)
            expected = logits.argmax(0)
            assert len(expected.unique()) > 1  # a constant mask would prove little
            got = torch.from_numpy(np.asarray(mask).astype(np.int64))
            # equal, except where two classes tie to float rounding (the two paths normalise in different order)
            margin = logits.max(0).values - logits.gather(0, got[None])[0]
            assert (margin <= 1e-5 * logits.abs().max()).all()
            assert (got != expected).float().mean() < 1e-3


def test_multi_decoder_checkpoint_writes_depth_and_overlay(checkpoint, exported, tmp_path):
    paths = write_images(tmp_path / "in")
    run_predict("--model", checkpoint, "--input", tmp_path / "in", "--out", tmp_path / "full", "--overlay")
    run_predict("--model", exported, "--input", tmp_path / "in", "--out", tmp_path / "slim")
    names = {f"{p.stem}{s}" for p in paths for s in (".png", "_overlay.jpg", "_depth.png")}
    assert {p.name for p in (tmp_path / "full").iterdir()} == names  # notes.txt skipped
    assert {p.name for p in (tmp_path / "slim").iterdir()} == {f"{p.stem}.png" for p in paths}
    for p in paths:
        size = Image.open(p).size
        depth = Image.open(tmp_path / "full" / f"{p.stem}_depth.png")
        overlay = Image.open(tmp_path / "full" / f"{p.stem}_overlay.jpg")
        assert depth.mode == "RGB" and depth.size == size and overlay.size == size
        assert len(np.unique(np.asarray(depth))) > 2
        full, slim = (np.asarray(Image.open(tmp_path / d / f"{p.stem}.png")) for d in ("full", "slim"))
        assert np.array_equal(full, slim)  # dropping the depth decoder changes no prediction


def test_no_depth_flag(checkpoint, tmp_path):
    paths = write_images(tmp_path / "in", sizes=((33, 45),))
    run_predict("--model", checkpoint, "--input", *paths, "--out", tmp_path / "out", "--no-depth")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


def test_each_image_reaches_the_model_alone_at_its_size_normalised():
    image = torch.randint(0, 256, (3, 67, 71), dtype=torch.uint8)
    seen = []

    def fake(x):
        seen.append(x.clone())
        return {"seg": torch.zeros(x.shape[0], 21, *x.shape[-2:])}

    predict_rgb(fake, image, "cpu")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert len(seen) == 1 and seen[0].shape == (1, 3, 67, 71)  # no padding
    torch.testing.assert_close(seen[0][0], (image / 255.0 - mean) / std)


def test_predict_keeps_the_layout_of_the_outputs():
    def fake(x):  # class of a pixel = its column mod 21, depth = its row
        b, _, h, w = x.shape
        cols = torch.arange(w).remainder(21)
        seg = F.one_hot(cols, 21).T.float()[None, :, None, :].expand(b, 21, h, w)
        depth = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(b, 1, h, w)
        return {"seg": seg, "depth": depth}

    out = predict_rgb(fake, torch.zeros(3, 37, 50, dtype=torch.uint8), "cpu")
    assert out["seg"].shape == (37, 50) and out["seg"].dtype == torch.uint8
    assert torch.equal(out["seg"], torch.arange(50).remainder(21).to(torch.uint8).expand(37, 50))
    assert torch.equal(out["depth"][0, :, 0], torch.arange(37, dtype=torch.float32))


def test_overlay_blends_foreground_and_keeps_background():
    image = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    mask = torch.tensor([[0, 15], [15, 0]], dtype=torch.uint8)
    out = overlay(image, mask, alpha=0.5)
    assert torch.equal(out[:, 0, 0], image[:, 0, 0])
    person = torch.tensor(VOC_PALETTE[45:48], dtype=torch.float32)  # class 15
    assert torch.equal(out[:, 0, 1], ((100 + person) / 2).round().to(torch.uint8))


def test_onnx_backend_matches_torch_backend(exported, tmp_path):
    image = torch.from_numpy(np.array(Image.open(write_images(tmp_path / "in")[0]))).permute(2, 0, 1)
    x = eval_image(image)[None]
    ref = torch_predictor(load_model(exported))(x)["seg"]
    got = onnx_predictor(exported / "model.onnx", "cpu")(x)["seg"]
    assert got.shape == ref.shape and (got - ref).abs().max() <= ORT_TOL * ref.abs().max()
    run_predict("--model", exported, "--backend", "onnx", "--input", tmp_path / "in", "--out", tmp_path / "o")
    mask = Image.open(tmp_path / "o" / "a.png")
    assert mask.mode == "P" and mask.size == (71, 67)
    run_predict("--model", exported / "model.onnx", "--input", tmp_path / "in", "--out", tmp_path / "o2")  # the file
    assert np.array_equal(np.array(Image.open(tmp_path / "o2" / "a.png")), np.array(mask))


def test_unreadable_image_is_named(exported, tmp_path):
    paths = write_images(tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg: unreadable image"):
        run_predict("--model", exported, "--input", tmp_path / "in", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # found before any work
    truncated = tmp_path / "cut" / "truncated.jpg"  # a valid header, then the data stops: fails when decoded
    truncated.parent.mkdir()
    data = paths[1].read_bytes()
    truncated.write_bytes(data[: data.index(b"\xff\xda") + 20])  # 20 bytes past the start-of-scan marker
    assert Image.open(truncated).size == (50, 40)
    with pytest.raises(DataError, match=r"truncated\.jpg: unreadable image"):
        run_predict("--model", exported, "--input", truncated, "--out", tmp_path / "out")


def test_bad_arguments_give_clear_errors(exported, checkpoint, tmp_path, monkeypatch):
    paths = write_images(tmp_path / "in")
    (tmp_path / "empty").mkdir()
    (tmp_path / "in2").mkdir()
    shutil.copy(paths[0], tmp_path / "in2" / "a.jpg")
    shutil.copy(paths[0], tmp_path / "a_depth.png")  # its mask would be a.png's depth image
    out, m = tmp_path / "out", exported
    cases = [
        (["--model", m, "--input", tmp_path / "missing.jpg", "--out", out], FileNotFoundError, "missing.jpg: no such"),
        (["--model", m, "--input", tmp_path / "empty", "--out", out], FileNotFoundError, r"empty: no \.jpg/"),
        (["--model", m, "--input", tmp_path / "in", tmp_path / "in2", "--out", out], ValueError, "would both write"),
        (["--model", m, "--input", paths[0], tmp_path / "a_depth.png", "--out", out], ValueError, "would both write"),
        (["--model", m, "--input", paths[0], "--out", tmp_path / "in"], ValueError, "would overwrite the input"),
        (["--model", checkpoint, "--backend", "onnx", "--input", paths[0], "--out", out], FileNotFoundError,
         "no ONNX model.*tools/export.py"),
    ]
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            run_predict(*argv)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        run_predict("--model", exported, "--backend", "onnx", "--input", paths[0], "--out", tmp_path / "out")
