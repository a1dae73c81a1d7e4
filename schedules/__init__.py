"""Training schedules as data: a Stage dataclass and named lists of stages (README "Schedules")."""
import math
from dataclasses import dataclass, replace

SEG, DEPTH = "seg", "depth"
PAPER_WEIGHTS = {SEG: 0.85, DEPTH: 0.15}  # the paper's joint-stage loss weights


@dataclass(frozen=True)
class Stage:
    """One stage: the decoders that train, for how long, with which loss weights."""

    name: str  # "s", "d" or "b"
    tasks: tuple[str, ...]  # decoders that run and train in this stage
    loss_weights: tuple[tuple[str, float], ...]  # (task, weight) pairs; a tuple keeps the dataclass frozen
    epochs: int | None = None  # None: the dataset preset's default
    train_encoder: bool = True  # the shared encoder trains in every stage unless a stage says otherwise
    steps: int | None = None  # optimizer steps in all, instead of epochs (a depth pool 20x the labelled set)

    def weights(self) -> dict[str, float]:
        return dict(self.loss_weights)


def semantic(**kw) -> Stage:
    """Segmentation decoder alone, focal loss."""
    return Stage("s", (SEG,), ((SEG, 1.0),), **kw)


def depth(**kw) -> Stage:
    """Depth decoder alone, MSE against pseudo depth."""
    return Stage("d", (DEPTH,), ((DEPTH, 1.0),), **kw)


def both(seg_weight: float = PAPER_WEIGHTS[SEG], depth_weight: float = PAPER_WEIGHTS[DEPTH], **kw) -> Stage:
    """Both decoders, weighted sum of the two losses."""
    return Stage("b", (SEG, DEPTH), ((SEG, seg_weight), (DEPTH, depth_weight)), **kw)


SCHEDULES: dict[str, list[Stage]] = {
    "s": [semantic()],  # table 2 row 1: the single-decoder baseline (built without a depth decoder)
    "b": [both()],  # table 2 row 2: conventional weighted joint training from the start
    "s_b": [semantic(), both()],  # table 3: semantic first, then fine-tune both
    "s_d_b": [semantic(), depth(), both()],  # table 3: semantic first, then depth, then both
    "d_b": [depth(), both()],  # table 3: depth first, then both (collapses in the paper)
    "d_s_b": [depth(), semantic(), both()],  # table 3: depth first, then semantic, then both (paper's best with copy)
}


def per_stage(values: list[int] | None, stages: list[Stage], flag: str) -> list[int] | None:
    """One value for every stage, or one per stage."""
    if values is None:
        return None
    if len(values) not in (1, len(stages)):
        raise ValueError(f"{flag} has {len(values)} values; the schedule has {len(stages)} stages")
    return values * len(stages) if len(values) == 1 else list(values)


def get_schedule(
    name: str, stage_epochs: list[int] | None = None, default_epochs: int = 1, joint_weights: tuple[float, float] | None = None,
    stage_steps: list[int] | None = None,
) -> list[Stage]:
    """The named schedule with every stage's length (epochs, or steps: one value for all, or one per stage) and joint
    weights filled in. A stage given steps trains that many optimizer steps whatever the size of its images."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if stage_epochs is not None and stage_steps is not None:
        raise ValueError("give stage lengths in epochs (--stage-epochs) or in steps (--stage-steps), not both")
    stages = SCHEDULES[name]
    stage_epochs = per_stage(stage_epochs, stages, "--stage-epochs")
    stage_steps = per_stage(stage_steps, stages, "--stage-steps")
    out = []
    for i, stage in enumerate(stages):
        if stage_steps:
            if stage_steps[i] < 1:
                raise ValueError(f"stage {i} ({stage.name}) of {name} needs at least one step, got {stage_steps[i]}")
            stage = replace(stage, epochs=None, steps=stage_steps[i])
        else:
            epochs = stage_epochs[i] if stage_epochs else (stage.epochs or default_epochs)
            if epochs < 1:
                raise ValueError(f"stage {i} ({stage.name}) of {name} needs at least one epoch, got {epochs}")
            stage = replace(stage, epochs=epochs)
        if joint_weights is not None and stage.name == "b":
            stage = replace(stage, loss_weights=((SEG, joint_weights[0]), (DEPTH, joint_weights[1])))
        out.append(stage)
    return out


def schedule_tasks(stages: list[Stage]) -> tuple[str, ...]:
    """Decoders the model needs for this schedule, in a fixed order."""
    used = {t for s in stages for t in s.tasks}
    return tuple(t for t in (SEG, DEPTH) if t in used)


def copy_plan(stages: list[Stage]) -> dict[int, tuple[str, str]]:
    """{stage index: (src, dst)}: before the first stage that adds a decoder, copy the first-trained one into it."""
    first = stages[0].tasks
    if len(first) != 1:
        return {}  # a schedule that starts with both decoders has nothing to copy from
    for i, stage in enumerate(stages[1:], start=1):
        new = [t for t in stage.tasks if t not in first]
        if new:
            return {i: (first[0], new[0])}
    return {}


def stage_rounds(stage: Stage, epoch_steps: int, val_every: int | None = None, cap: int | None = None) -> list[int]:
    """Optimizer steps of each round of a stage (a round ends with validation and a checkpoint): its epochs of
    `epoch_steps` steps each (at most `cap`), or its steps in rounds of `val_every` (default: a tenth of the stage),
    the last round taking what is left."""
    if stage.steps is None:
        return [min(epoch_steps, cap or epoch_steps)] * stage.epochs
    every = val_every or math.ceil(stage.steps / 10)
    full, rest = divmod(stage.steps, every)
    return [every] * full + ([rest] if rest else [])


def lr_factor(progress: float, kind: str = "constant", warmup: float = 0.0) -> float:
    """Learning-rate multiplier at `progress` (0..1 through the stage): linear warmup, then constant or cosine."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if warmup > 0 and progress < warmup:
        return (progress + 1e-8) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        t = (progress - warmup) / max(1.0 - warmup, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {kind!r}; choose constant or cosine")
