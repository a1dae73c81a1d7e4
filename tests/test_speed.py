"""models/speed.py: the per-device choices, and that switching the folds changes speed only, never the function."""
import pytest
import torch

from models import ModelConfig, build_model
from models.speed import FOLD_CHOICES, apply_folds, use_folds, use_keep_freed_memory

PREFERRED = ["products"] + ["transposed"] * 4


def folds(model) -> list:
    return [b.fold for b in model.decoders["seg"].blocks]


@pytest.mark.parametrize("device, choice, want", [
    ("cpu", "auto", True),  # measured faster there (BENCHMARKS.md)
    ("cuda", "auto", False),  # not measured: the plain upsample + convolution
    ("mps", "auto", False),
    ("cuda", "on", True), ("cpu", "on", True),
    ("cpu", "off", False), ("cuda", "off", False),
])
def test_use_folds_auto_folds_only_where_measured_and_on_off_force(device, choice, want):
    assert use_folds(device, choice) is want
    assert FOLD_CHOICES == ("auto", "on", "off")


def test_use_folds_refuses_other_choices():
    with pytest.raises(ValueError, match="folds must be one of"):
        use_folds("cpu", "yes")


def test_keep_freed_memory_applies_on_the_cpu_only():
    assert use_keep_freed_memory("cpu") and use_keep_freed_memory("cpu", True)
    assert not use_keep_freed_memory("cpu", False) and not use_keep_freed_memory("cuda", True)


def test_apply_folds_off_then_on_restores_each_blocks_fold():
    model = build_model(ModelConfig(encoder="resnet18"))
    assert folds(model) == PREFERRED  # built with the folds on
    apply_folds(model, False)
    assert folds(model) == [None] * 5 and [b.fold for b in model.decoders["depth"].blocks] == [None] * 5
    apply_folds(model, False)  # idempotent
    apply_folds(model, True)
    assert folds(model) == PREFERRED and [b.fold for b in model.decoders["depth"].blocks] == PREFERRED
    apply_folds(model, True)
    assert folds(model) == PREFERRED


def test_folds_on_and_off_give_the_same_outputs_and_gradients():
    """The whole model at an odd size (67x71), in float64: the folds change how, not what, it computes."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18")).double()
    x = torch.randn(2, 3, 67, 71, dtype=torch.double)
    results = []
    for on in (True, False):
        apply_folds(model, on)
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out["seg"].square().mean() + out["depth"].square().mean()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (folded, grads_on), (plain, grads_off) = results
    for task in ("seg", "depth"):
        assert folded[task].shape[-2:] == (67, 71)
        torch.testing.assert_close(folded[task], plain[task], rtol=1e-9, atol=1e-9)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-7, atol=1e-9, msg=name)
    assert any(not torch.equal(folded[t], plain[t]) for t in folded)  # two computations, not one run twice


def test_apply_folds_keeps_parameters_and_checkpoint_keys():
    model = build_model(ModelConfig(encoder="resnet18"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_folds(model, False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
