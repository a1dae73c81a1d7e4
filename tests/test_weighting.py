"""Joint-stage loss weightings: DWA and uncertainty weighting by hand, and train.py runs with each."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from models import load_model
from models.weighting import DynamicWeightAverage, UncertaintyWeighting, build_weighting, trainable_params
from run_state import CheckpointError, load_extra

REPO = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "resnet18", "--crop-size", "64", "--base-size", "64", "--batch-size", "4",
        "--max-steps-per-epoch", "2", "--workers", "0", "--val-batch-size", "4", "--schedule", "b",
        "--lr-schedule", "constant", "--warmup", "0"]  # 2 steps: the synthetic preset's warmup would keep lr ~0


def test_dwa_weights_by_hand():
    dwa = DynamicWeightAverage(("seg", "depth"), temperature=2.0)
    assert dwa.current() == {"seg": 1.0, "depth": 1.0}  # epoch 0: no history
    dwa.epoch_end({"seg": 2.0, "depth": 0.5, "loss": 9.9})
    assert dwa.current() == {"seg": 1.0, "depth": 1.0}  # epoch 1: one epoch of history is not a rate yet
    dwa.epoch_end({"seg": 1.0, "depth": 0.45})
    # r = (1.0/2.0, 0.45/0.5) = (0.5, 0.9); w = 2 * exp(r/2) / sum = 2 * (1.2840254, 1.5683122) / 2.8523376
    w = dwa.current()
    assert w["seg"] == pytest.approx(0.9003320, abs=1e-6) and w["depth"] == pytest.approx(1.0996680, abs=1e-6)
    terms = {"seg": torch.tensor(3.0), "depth": torch.tensor(2.0)}
    assert dwa(terms).item() == pytest.approx(0.9003320 * 3 + 1.0996680 * 2, abs=1e-5)
    dwa.epoch_end({"seg": 0.9, "depth": 0.45})  # only the last two epochs count: r = (0.9, 1.0)
    e1, e2 = math.exp(0.45), math.exp(0.5)
    assert dwa.current()["depth"] == pytest.approx(2 * e2 / (e1 + e2))
    restored = DynamicWeightAverage(("seg", "depth"))
    restored.load_state_dict(dwa.state_dict())
    assert restored.current() == dwa.current()


def test_uncertainty_gradient_matches_formula():
    u = UncertaintyWeighting(("seg", "depth"))
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([0.3, -0.7]))
    seg, depth = torch.tensor(1.7, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    loss = u({"seg": seg, "depth": depth})
    loss.backward()
    s1, s2 = 0.3, -0.7
    # seg is a classification term: exp(-s) L + s/2; depth a regression term: exp(-s) L / 2 + s/2
    assert loss.item() == pytest.approx(math.exp(-s1) * 1.7 + s1 / 2 + 0.5 * math.exp(-s2) * 0.2 + s2 / 2, rel=1e-6)
    expected = [-math.exp(-s1) * 1.7 + 0.5, -0.5 * math.exp(-s2) * 0.2 + 0.5]
    assert u.log_vars.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert seg.grad.item() == pytest.approx(math.exp(-s1)) and depth.grad.item() == pytest.approx(0.5 * math.exp(-s2))
    w = u.weights()
    assert w["seg"].item() == pytest.approx(math.exp(-s1)) and w["depth"].item() == pytest.approx(0.5 * math.exp(-s2))


def test_build_weighting_and_its_parameters():
    assert build_weighting("paper", ("seg", "depth")) is None
    assert build_weighting("dwa", ("seg",)) is None  # a one-decoder model has nothing to weigh
    assert isinstance(build_weighting("dwa", ("seg", "depth")), DynamicWeightAverage)
    u = build_weighting("uncertainty", ("seg", "depth"))
    assert trainable_params(u, ("seg",)) == [] and trainable_params(u, ("seg", "depth")) == [u.log_vars]
    with pytest.raises(ValueError, match="unknown joint weighting"):
        build_weighting("gradnorm", ("seg", "depth"))


def run(root, out, *extra):
    train.main(train.get_args_parser().parse_args(["--data-root", str(root), "--output-dir", str(out), *TINY, *extra]))
    return [json.loads(line)["train"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["paper", "uncertainty", "dwa"])
def test_train_runs_with_each_weighting(kind, tiny_voc, tmp_path, fresh_accelerate):
    out = tmp_path / kind
    epochs = run(tiny_voc, out, "--stage-epochs", "3", "--joint-weighting", kind)
    assert len(epochs) == 3 and json.loads((out / "metrics.json").read_text())["mIoU"] >= 0
    last = out / "checkpoints" / "last"
    assert load_model(last).config.tasks == ("seg", "depth")  # the model file holds the model alone
    if kind == "paper":
        assert all("w_seg" not in e for e in epochs) and not (last / "model_1.safetensors").exists()
        assert not (last / "weighting.pt").exists()
    elif kind == "dwa":  # no parameters, not prepared: its history is weighting.pt
        assert not (last / "model_1.safetensors").exists()
        history = torch.load(last / "weighting.pt", weights_only=True)["_extra_state"]["history"]
        assert [h["seg"] for h in history] == [e["seg"] for e in epochs[-2:]]
        assert [(e["w_seg"], e["w_depth"]) for e in epochs[:2]] == [(1.0, 1.0), (1.0, 1.0)]
        r = [epochs[1][t] / epochs[0][t] for t in ("seg", "depth")]
        w_seg = 2 * math.exp(r[0] / 2) / (math.exp(r[0] / 2) + math.exp(r[1] / 2))
        assert epochs[2]["w_seg"] == pytest.approx(w_seg, rel=1e-5) and epochs[2]["w_seg"] != 1.0
        assert epochs[2]["w_seg"] + epochs[2]["w_depth"] == pytest.approx(2.0, rel=1e-5)
    else:
        s = load_file(last / "model_1.safetensors")["log_vars"]  # prepared alongside the model, saved by save_state
        assert not (last / "weighting.pt").exists()  # and only there
        assert s.abs().min() > 1e-3  # 6 steps at lr 1e-2 moved both log-variances
        assert epochs[-1]["w_seg"] == pytest.approx(math.exp(-s[0].item()), rel=0.05)


def test_uncertainty_weighting_resumes(tiny_voc, tmp_path, fresh_accelerate, monkeypatch):
    out = tmp_path / "run"
    run(tiny_voc, out, "--stage-epochs", "1", "--joint-weighting", "uncertainty")
    saved = load_file(out / "checkpoints" / "last" / "model_1.safetensors")["log_vars"]
    seen = []
    real = train.train_one_epoch

    def spy(model, criterion, *args, **kwargs):
        seen.append(criterion.joint.log_vars.detach().clone())
        return real(model, criterion, *args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", spy)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run(tiny_voc, out, "--stage-epochs", "2", "--joint-weighting", "uncertainty", "--resume", "auto")
    assert len(seen) == 1 and torch.equal(seen[0], saved) and saved.abs().min() > 0  # not back at zero


def test_load_extra_reads_its_file_or_leaves_the_prepared_one_to_load_state(tmp_path):
    trained = UncertaintyWeighting(("seg", "depth"))
    with torch.no_grad():
        trained.log_vars.copy_(torch.tensor([0.5, -0.25]))
    old = tmp_path / "old"  # written before the weighting was saved once: both files
    old.mkdir()
    torch.save(trained.state_dict(), old / "weighting.pt")
    (old / "model_1.safetensors").write_bytes(b"")
    fresh = UncertaintyWeighting(("seg", "depth"))
    load_extra(old, {"weighting": fresh})
    assert torch.equal(fresh.log_vars, trained.log_vars)
    new = tmp_path / "new"  # prepared when saved: only save_state's file, which load_state reads
    new.mkdir()
    (new / "model_1.safetensors").write_bytes(b"")
    load_extra(new, {"weighting": UncertaintyWeighting(("seg", "depth"))})
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(CheckpointError, match="weighting.pt: missing"):
        load_extra(broken, {"weighting": UncertaintyWeighting(("seg", "depth"))})


def test_uncertainty_weighting_on_two_cpu_ranks(tiny_voc, tmp_path, launch_two_ranks):
    out = tmp_path / "ddp"
    proc = launch_two_ranks(REPO / "train.py", "--data-root", tiny_voc, "--output-dir", out, *TINY,
                            "--batch-size", "2", "--stage-epochs", "1", "--joint-weighting", "uncertainty", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert epoch["world_size"] == 2 and epoch["train"]["w_seg"] != 1.0
    assert (out / "checkpoints" / "last" / "model_1.safetensors").is_file()
