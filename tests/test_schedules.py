import math

import pytest

from schedules import DEPTH, SCHEDULES, SEG, copy_plan, get_schedule, lr_factor, schedule_tasks

EXPECTED_COPY = {
    "s": {},
    "b": {},
    "s_b": {1: (SEG, DEPTH)},
    "s_d_b": {1: (SEG, DEPTH)},
    "d_b": {1: (DEPTH, SEG)},
    "d_s_b": {1: (DEPTH, SEG)},
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_is_valid(name):
    stages = get_schedule(name, default_epochs=3)
    assert [s.name for s in stages] == name.split("_")  # the name spells the stages
    for stage in stages:
        assert stage.epochs == 3
        assert set(stage.tasks) <= {SEG, DEPTH} and stage.tasks
        assert set(stage.weights()) == set(stage.tasks)
        assert all(w > 0 for w in stage.weights().values())
        assert stage.train_encoder
    assert copy_plan(stages) == EXPECTED_COPY[name]


def test_single_decoder_schedule_builds_no_depth_decoder():
    assert schedule_tasks(get_schedule("s")) == (SEG,)
    assert schedule_tasks(get_schedule("d_s_b")) == (SEG, DEPTH)


def test_joint_stage_uses_paper_weights_by_default_and_overrides():
    (b,) = get_schedule("b")
    assert b.weights() == {SEG: 0.85, DEPTH: 0.15}
    stages = get_schedule("d_s_b", joint_weights=(0.5, 0.5))
    assert stages[2].weights() == {SEG: 0.5, DEPTH: 0.5}
    assert stages[0].weights() == {DEPTH: 1.0}


def test_stage_epochs():
    assert [s.epochs for s in get_schedule("d_s_b", [1, 2, 3])] == [1, 2, 3]
    assert [s.epochs for s in get_schedule("s_b", [4])] == [4, 4]
    with pytest.raises(ValueError, match="3 stages"):
        get_schedule("d_s_b", [1, 2])
    with pytest.raises(ValueError, match="at least one epoch"):
        get_schedule("s", [0])
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("x")


def test_lr_factor_is_a_pure_function_of_progress():
    assert lr_factor(0.0) == lr_factor(0.7) == 1.0
    assert lr_factor(0.0, "cosine") == pytest.approx(1.0)
    assert lr_factor(0.5, "cosine") == pytest.approx(0.5)
    assert lr_factor(1.0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.05, "constant", warmup=0.1) == pytest.approx(0.5, rel=1e-6)
    assert lr_factor(0.55, "cosine", warmup=0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError):
        lr_factor(1.5)
