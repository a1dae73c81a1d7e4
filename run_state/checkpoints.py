"""Training checkpoints: Accelerate's save_state into a temporary folder, published atomically as checkpoints/last
(and best), with the train state that says where the run stands; finding and checking the one to resume from."""
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open

from models.io import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, check_shapes
from models.model import ModelConfig, MultiDecoderModel
from run_state.faults import fault_point

STATE_NAME = "train_state.json"
PREPARED_EXTRA = "model_1.safetensors"  # save_state's file of the second prepared model (the model is model.safetensors)


@dataclass
class TrainState:
    """Where training stands; saved as train_state.json with every checkpoint and read back before load_state."""

    # JSON, not Accelerate's register_for_checkpointing: that unpickles registered objects with weights_only=False

    stage: int = 0
    epoch: int = 0  # within the stage
    step: int = 0  # optimizer steps done within the epoch
    global_step: int = 0
    best_miou: float = -1.0
    steps_per_epoch: int = 0
    schedule: str = ""
    sums: dict = field(default_factory=dict)  # this epoch's loss sums so far (averaged over processes)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)

    def epoch_done(self) -> None:
        self.epoch, self.step, self.sums = self.epoch + 1, 0, {}

    def stage_done(self) -> None:
        self.stage, self.epoch, self.step, self.sums = self.stage + 1, 0, 0, {}

    def position(self) -> tuple[int, int]:
        """(stage, epoch) of the next epoch to run."""
        return self.stage, self.epoch

    def set_steps_per_epoch(self, steps: int) -> None:
        """A mid-epoch checkpoint resumes only with the epoch cut into the same batches."""
        if self.step and steps != self.steps_per_epoch:
            raise CheckpointError(
                f"the checkpoint was taken at step {self.step} of {self.steps_per_epoch} of an epoch; this run has "
                f"{steps} steps per epoch (another --batch-size, --max-steps-per-epoch or number of processes). "
                f"Resume with the same settings.")
        self.steps_per_epoch = steps


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself to disk before the rename that publishes it."""
    for path in [*folder.rglob("*"), folder]:
        fsync_path(path)


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`; at every instant `final` or `final.prev` is a complete checkpoint."""
    prev = final.with_name(final.name + ".prev")
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)  # stale: `final` is complete
        os.replace(final, prev)
    # else a kill between the two renames left only `prev`: keep it until `final` is in place
    fault_point("publish")
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(prev, ignore_errors=True)


def prepared(accelerator, module) -> bool:
    """Whether `module` is among the models Accelerate's save_state writes (model_<i>.safetensors)."""
    # Accelerate lists them only in this attribute, the one its own save_state reads
    return any(accelerator.unwrap_model(m) is accelerator.unwrap_model(module) for m in accelerator._models)


def save_checkpoint(accelerator, model, out: Path, state: TrainState, best: bool = False, extra: dict | None = None) -> None:
    """save_state into a temporary folder, then publish it as checkpoints/last (and a copy as best)."""
    # extra: {name: module} not prepared in every stage (the joint weighting); saved as name.pt (loads with
    # weights_only=True) when it is not prepared now, else save_state holds it (model_1.safetensors): once, not twice
    ckpt = Path(out) / "checkpoints"
    tmp = ckpt / ".last.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill mid-write
        ckpt.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its RNG state; the main one the weights
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).config.save(tmp / CONFIG_NAME)
        for name, module in (extra or {}).items():
            if not prepared(accelerator, module):
                torch.save(accelerator.unwrap_model(module).state_dict(), tmp / f"{name}.pt")
        (tmp / STATE_NAME).write_text(json.dumps(state.state_dict()))  # written last: marks it complete
        fsync_tree(tmp)
        fault_point("save")
        publish(tmp, ckpt / "last")
        if best:
            shutil.rmtree(ckpt / ".best.tmp", ignore_errors=True)
            shutil.copytree(ckpt / "last", ckpt / ".best.tmp")
            fsync_tree(ckpt / ".best.tmp")
            publish(ckpt / ".best.tmp", ckpt / "best")
    accelerator.wait_for_everyone()


def load_extra(folder: Path, extra: dict) -> None:
    """Load what save_checkpoint's `extra` wrote as name.pt; one prepared when the checkpoint was taken has no file of
    its own: load_state has already loaded it from PREPARED_EXTRA. (Checkpoints written before that hold both.)"""
    for name, module in extra.items():
        path = Path(folder) / f"{name}.pt"
        if path.is_file():
            module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        elif not (Path(folder) / PREPARED_EXTRA).is_file():
            raise CheckpointError(f"{path}: missing, and {folder} has no {PREPARED_EXTRA} that would hold {name}'s state")


def is_complete(folder: Path) -> bool:
    return (folder / STATE_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def find_resume(resume: str | None, out: Path) -> Path | None:
    """`auto`: the run folder's last checkpoint (or the last.prev a kill mid-publish left), None if there is none;
    a PATH: that checkpoint folder, or a run folder's last one."""
    if resume is None:
        return None
    folder = Path(out) if resume == "auto" else Path(resume)
    last = folder / "checkpoints" / "last"
    for candidate in (folder, last, last.with_name("last.prev")):
        if is_complete(candidate):
            return candidate
    if resume == "auto":
        return None
    raise CheckpointError(f"--resume {resume}: not a complete checkpoint (needs {STATE_NAME} and {WEIGHTS_NAME}) "
                          f"nor a run folder with one in checkpoints/last")


def read_checkpoint(folder: Path, model: MultiDecoderModel, schedule: str) -> TrainState:
    """The checkpoint's TrainState, after checking (before load_state: no shape dump) it fits this model and schedule."""
    saved = ModelConfig.load(folder / CONFIG_NAME)
    if saved != model.config:
        diff = [f"{f.name}={getattr(saved, f.name)} (this run: {getattr(model.config, f.name)})"
                for f in fields(saved) if getattr(saved, f.name) != getattr(model.config, f.name)]
        raise CheckpointError(f"{folder}: checkpoint of another model configuration: {', '.join(diff)}. Resume with "
                              f"the settings it was trained with (--encoder, --schedule, --dataset) or use a new --output-dir.")
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as f:
        check_shapes(model, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, folder / WEIGHTS_NAME)
    state = TrainState()
    state.load_state_dict(json.loads((folder / STATE_NAME).read_text()))
    if state.schedule and state.schedule != schedule:
        raise CheckpointError(f"{folder}: checkpoint of schedule {state.schedule!r}, this run is {schedule!r}. "
                              f"Resume with --schedule {state.schedule} or use a new --output-dir.")
    return state
