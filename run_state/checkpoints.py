"""Training checkpoints: Accelerate's save_state into a temporary folder with the train state that says where the run
stands and a manifest of every file (models/files.py), published atomically as checkpoints/last (and best). Finding,
verifying and loading the one to resume from: run_state/resume.py."""
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from itertools import count
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError

from models.files import MANIFEST_NAME, match_umask, write_manifest
from models.io import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from run_state.faults import fault_point
from run_state.writes import WRITE_ERRORS, WriteError, describe, remove, writing

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
    try:
        os.replace(tmp, final)
    except OSError:
        if prev.exists() and not final.exists():
            os.replace(prev, final)  # put the previous one back where it was
        raise
    fsync_path(final.parent)
    shutil.rmtree(prev, ignore_errors=True)


def folder_size(folder: Path) -> int | None:
    files = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).is_dir() else []
    return sum(p.stat().st_size for p in files) or None


def newest_file(folder: Path) -> Path | None:
    """The file last written in `folder`, None if there is none."""
    files = [p for p in Path(folder).iterdir() if p.is_file()] if Path(folder).is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def failed_file(exc: BaseException, tmp: Path) -> Path:
    """Which file a failed save_state was writing: the OSError's; for safetensors (which removes its temporary file)
    the first model file Accelerate writes (model.safetensors, model_1.safetensors, ...) that is not there; else the
    newest file in the folder (torch.save leaves its partial file)."""
    if isinstance(exc, OSError) and exc.filename:
        return Path(exc.filename)
    if isinstance(exc, SafetensorError):
        names = (WEIGHTS_NAME if i == 0 else f"model_{i}.safetensors" for i in count())
        return next(tmp / n for n in names if not (tmp / n).exists())
    newest = newest_file(tmp)
    return newest if newest is not None else tmp / WEIGHTS_NAME


def agree(accelerator, error: str | None, cleanup: tuple[Path, ...]) -> None:
    """Every process learns whether any failed to write its part (one gather, in place of a barrier): all raise the
    same WriteError, so no process waits in a collective for one that has stopped."""
    errors = [e for e in (gather_object([error]) if accelerator.num_processes > 1 else [error]) if e is not None]
    if errors:
        if accelerator.is_main_process:
            remove(*cleanup)
        raise WriteError(errors[0])


def prepared(accelerator, module) -> bool:
    """Whether `module` is among the models Accelerate's save_state writes (model_<i>.safetensors)."""
    # Accelerate lists them only in this attribute, the one its own save_state reads
    return any(accelerator.unwrap_model(m) is accelerator.unwrap_model(module) for m in accelerator._models)


def write_files(accelerator, model, tmp: Path, state: TrainState, extra: dict, needed: int | None) -> None:
    """The main process's files beside save_state's: config, the `extra` modules save_state does not hold, the train
    state, then the manifest (`needed`: the checkpoint's size, said when the disk is full)."""
    with writing(tmp / CONFIG_NAME, needed):
        accelerator.unwrap_model(model).config.save(tmp / CONFIG_NAME)
    for name, module in extra.items():
        if not prepared(accelerator, module):
            with writing(tmp / f"{name}.pt", needed):
                torch.save(accelerator.unwrap_model(module).state_dict(), tmp / f"{name}.pt")
    with writing(tmp / STATE_NAME, needed):
        (tmp / STATE_NAME).write_text(json.dumps(state.state_dict()))
    with writing(tmp, needed):
        match_umask(*(p for p in tmp.rglob("*") if p.is_file()))  # safetensors leaves 0600
    with writing(tmp / MANIFEST_NAME, needed):
        write_manifest(tmp)  # last: marks it complete and lets a load verify every file


def save_checkpoint(accelerator, model, out: Path, state: TrainState, best: bool = False, extra: dict | None = None) -> None:
    """save_state into a temporary folder, then publish it as checkpoints/last (and a copy as best). A failed write
    on any process raises WriteError naming the file on every process; the temporary folders are removed and the
    previous checkpoints stay as they were."""
    # extra: {name: module} not prepared in every stage (the joint weighting); saved as name.pt (loads with
    # weights_only=True) when it is not prepared now, else save_state holds it (model_1.safetensors): once, not twice
    ckpt = Path(out) / "checkpoints"
    tmp, best_tmp = ckpt / ".last.tmp", ckpt / ".best.tmp"
    needed = folder_size(ckpt / "last")  # a checkpoint takes about as much room as the one before
    error = None
    if accelerator.is_main_process:
        try:
            with writing(ckpt, needed):
                shutil.rmtree(tmp, ignore_errors=True)  # left by a kill mid-write
                ckpt.mkdir(parents=True, exist_ok=True)
        except WriteError as exc:
            error = f"{exc}; {kept(ckpt)}"
    agree(accelerator, error, ())
    try:
        accelerator.save_state(str(tmp))  # every rank writes its RNG state; the main one the weights
    except WRITE_ERRORS as exc:
        error = f"{describe(exc, failed_file(exc, tmp), needed)}; {kept(ckpt)}"
    agree(accelerator, error, (tmp,))
    if accelerator.is_main_process:
        try:
            write_files(accelerator, model, tmp, state, extra or {}, needed)
            with writing(tmp, needed):
                fsync_tree(tmp)
            fault_point("save")
            with writing(ckpt / "last", needed):
                publish(tmp, ckpt / "last")
        except WriteError as exc:
            error = f"{exc}; {kept(ckpt)}"
        if best and error is None:
            try:
                with writing(best_tmp, needed):
                    shutil.rmtree(best_tmp, ignore_errors=True)
                    shutil.copytree(ckpt / "last", best_tmp)
                    fsync_tree(best_tmp)
                    publish(best_tmp, ckpt / "best")
            except WriteError as exc:
                error = f"{exc}; checkpoints/last is saved, {kept(ckpt, ('best',))}"
    agree(accelerator, error, (tmp, best_tmp))


def kept(ckpt: Path, names: tuple[str, ...] = ("last", "last.prev", "best")) -> str:
    """What a failed save left: the checkpoints that stay as they were."""
    found = [f"checkpoints/{n}" for n in names if is_complete(ckpt / n)]
    return f"{' and '.join(found)} unchanged" if found else "no earlier checkpoint to keep"


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
