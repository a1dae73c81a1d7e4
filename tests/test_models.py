import pytest
import torch
from torch import nn

from models import ModelConfig, build_model, load_model, save_model
from models.files import write_manifest
from models.io import drop_decoders
from models.decoder import DecoderBlock, UnetDecoder
from models.encoder import ENCODERS, ResNetEncoder

R18 = ModelConfig(encoder="resnet18", decoder_channels=(64, 32, 16, 16, 8))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(R18)


@pytest.mark.parametrize("size", [(64, 64), (67, 71)])
def test_forward_backward_shapes(model, size):
    x = torch.randn(2, 3, *size)
    out = model.train()(x)
    assert set(out) == {"seg", "depth"}
    assert out["seg"].shape == (2, 21, *size)
    assert out["depth"].shape == (2, 1, *size)
    (out["seg"].mean() + out["depth"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_forward_runs_only_requested_decoders(model):
    model.zero_grad(set_to_none=True)
    out = model.train()(torch.randn(1, 3, 64, 64), tasks=("seg",))
    assert set(out) == {"seg"}
    out["seg"].sum().backward()
    assert all(p.grad is None for p in model.decoders["depth"].parameters())
    assert all(p.grad is None for p in model.heads["depth"].parameters())
    model.zero_grad(set_to_none=True)


def test_resnet50_encoder_channels_and_strides():
    enc = ResNetEncoder("resnet50")
    assert enc.out_channels == (64, 256, 512, 1024, 2048)
    feats = enc(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(enc.out_channels)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]  # strides 2..32


def test_freezing_flips_grad_and_batchnorm_mode_and_survives_train():
    m = build_model(R18)
    m.set_trainable(("seg",), encoder=False)
    m.train()
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert not any(p.requires_grad for p in m.decoders["depth"].parameters())
    assert all(p.requires_grad for p in m.decoders["seg"].parameters())
    bns = lambda mod: [b for b in mod.modules() if isinstance(b, nn.BatchNorm2d)]  # noqa: E731
    assert not any(b.training for b in bns(m.encoder) + bns(m.decoders["depth"]))
    assert all(b.training for b in bns(m.decoders["seg"]))
    before = [b.running_mean.clone() for b in bns(m.encoder)]
    m(torch.randn(2, 3, 64, 64), tasks=("seg",))
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, bns(m.encoder)))
    m.set_trainable(("seg", "depth"))
    m.train()
    assert all(p.requires_grad for p in m.parameters())
    assert all(b.training for b in bns(m))


def test_copy_decoder_copies_every_non_head_tensor():
    m = build_model(R18)
    copied = m.copy_decoder("depth", "seg")
    src, dst = m.decoders["depth"].state_dict(), m.decoders["seg"].state_dict()
    assert len(copied) == len(src) > 0
    assert all(torch.equal(src[k], dst[k]) for k in src)
    assert m.heads["seg"].weight.shape != m.heads["depth"].weight.shape  # heads are not copied
    # the copy is a copy, not shared storage
    with torch.no_grad():
        next(m.decoders["depth"].parameters()).add_(1)
    assert not torch.equal(next(m.decoders["depth"].parameters()), next(m.decoders["seg"].parameters()))


@pytest.mark.parametrize("low, skip_size", [((8, 6), (16, 12)), ((5, 4), (9, 7)), ((4, 3), None)])
def test_decoder_block_is_smps_block(low, skip_size):
    """The same weights in smp's own UnetDecoderBlock give the same outputs, at even and odd sizes, with and without
    a skip (the parameter names match too: a block's state_dict loads into smp's)."""
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock

    torch.manual_seed(0)
    block = DecoderBlock(6, 5 if skip_size else 0, 7).double().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (block.conv1[1], block.conv2[1]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    smp_block = UnetDecoderBlock(6, 5 if skip_size else 0, 7).double().eval()
    smp_block.load_state_dict(block.state_dict())
    x = torch.randn(2, 6, *low, dtype=torch.double)
    skip = torch.randn(2, 5, *skip_size, dtype=torch.double) if skip_size else None
    size = skip_size or (2 * low[0] - 1, 2 * low[1])
    got = block(x, skip, size)
    assert got.shape == (2, 7, *size)
    torch.testing.assert_close(got, smp_block(x, *size, skip), rtol=0, atol=0)


def test_decoder_channel_mismatch_raises():
    with pytest.raises(ValueError, match="give 1 to 5"):
        UnetDecoder((64, 64, 128, 256, 512), (64, 32, 16, 16, 8, 8))
    with pytest.raises(ValueError, match="give 1 to 5"):
        UnetDecoder((64, 64, 128, 256, 512), ())


@pytest.mark.parametrize("size", [(64, 64), (67, 93)])
def test_four_decoder_blocks_end_at_stride_2_and_the_logits_are_upsampled_bilinearly(size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8))).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        features = model.encoder(x)
        low = model.decoders["seg"](features, size)
        out = model(x)
    assert low.shape[-2:] == features[0].shape[-2:]  # stride 2, the last skip's size
    expected = torch.nn.functional.interpolate(model.heads["seg"](low), size=size, mode="bilinear",
                                               align_corners=False)
    assert out["seg"].shape == (1, 21, *size) and out["depth"].shape == (1, 1, *size)
    assert torch.equal(out["seg"], expected)
    assert not build_model(R18).upsample_logits  # five blocks: the heads run at full resolution


def test_single_decoder_model_is_the_multi_decoder_model_without_depth():
    full = build_model(R18)
    single = build_model(ModelConfig(**{**R18.__dict__, "tasks": ("seg",)}))
    slim = drop_decoders(full, ("seg",))
    assert n_params(single) == n_params(slim) == n_params(full) - n_params(full.decoders["depth"]) - n_params(full.heads["depth"])
    x = torch.randn(1, 3, 64, 64)
    full.eval(), slim.eval()
    assert torch.equal(full(x)["seg"], slim(x)["seg"])


def test_encoder_weights_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    ref = ENCODERS["resnet18"].builder(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    enc = ResNetEncoder("resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(enc.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(FileNotFoundError, match="no such file"):
        ResNetEncoder("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="do not fit resnet34"):
        ResNetEncoder("resnet34", str(tmp_path / "r18.pth"))


def test_imagenet_weights_offline_error_says_how_to_supply_them(monkeypatch):
    enum = ENCODERS["resnet50"].weights

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(enum), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="--encoder-weights") as err:
        ResNetEncoder("resnet50", "imagenet")
    assert "resnet50" in str(err.value) and "cache" in str(err.value)


def test_save_and_load_roundtrip_and_mismatch_error(tmp_path, model):
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x)["seg"], model.eval()(x)["seg"])
    other = build_model(ModelConfig(encoder="resnet18", decoder_channels=R18.decoder_channels, num_classes=5))
    save_model(other, tmp_path / "o")
    (tmp_path / "o" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"o/config\.json: .*manifest\.json"):  # changed after it was saved
        load_model(tmp_path / "o")
    write_manifest(tmp_path / "o")  # a folder that verifies, whose weights do not fit its config
    with pytest.raises(ValueError, match="another shape"):
        load_model(tmp_path / "o")
