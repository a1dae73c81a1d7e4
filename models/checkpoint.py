"""Model files (`model.safetensors` + `config.json`, the layout Accelerate's save_state uses) and atomic training checkpoints."""
import json
import os
import shutil
import signal
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.model import ModelConfig, MultiDecoderModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "train_state.json"
FAULT_ENV = "SEGDEPTH_TEST_KILL_AT"  # test hook, see fault_point


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run; the message names it, says why and what to do."""


def _parse_fault(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    event, _, count = text.partition(":")
    return event, int(count or 1)


_FAULT = _parse_fault(os.environ.get(FAULT_ENV))
_fault_counts: Counter = Counter()


def fault_point(event: str) -> None:
    """Test hook: with SEGDEPTH_TEST_KILL_AT=EVENT:N the process SIGKILLs itself the Nth time it passes EVENT
    (step: after an optimizer step; save: checkpoint files written, not yet published; publish: between the two
    renames; stage: a stage finished). Unset (always, outside tests) it costs one comparison."""
    if _FAULT is None or _FAULT[0] != event:
        return
    _fault_counts[event] += 1
    if _fault_counts[event] == _FAULT[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, an exported folder or a run folder (its best, else last, checkpoint)."""
    path = Path(path)
    ckpt = path / "checkpoints"
    # last.prev: what a kill between publish()'s two renames leaves
    for candidate in (path, ckpt / "best", ckpt / "last", ckpt / "last.prev"):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} + {CONFIG_NAME} here or in checkpoints/best|last")


def check_shapes(model: MultiDecoderModel, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Raise CheckpointError naming the mismatching tensors (a few of each kind) instead of dumping every shape."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    wrong = sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source}: weights do not fit the model {model.config} "
            f"({len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
            f"{len(wrong)} of another shape e.g. {wrong[:3]}). Was it trained with another "
            f"--encoder, number of classes or schedule?"
        )


def load_state_dict(model: MultiDecoderModel, state: dict, source: Path) -> None:
    """Strict load that names the mismatching tensors instead of dumping every shape."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state)


def load_model(path: str | Path, tasks: tuple[str, ...] | None = None) -> MultiDecoderModel:
    """Rebuild the model from config.json and load its weights (safetensors: no pickle)."""
    folder = resolve_checkpoint(path)
    config = ModelConfig.load(folder / CONFIG_NAME)
    model = MultiDecoderModel(config)
    load_state_dict(model, load_file(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)
    if tasks is not None:
        model = drop_decoders(model, tasks)
    return model.eval()


def drop_decoders(model: MultiDecoderModel, tasks: tuple[str, ...]) -> MultiDecoderModel:
    """A new model with only `tasks` (e.g. ("seg",) for deployment), sharing nothing with the input."""
    config = ModelConfig(**{**model.config.__dict__, "tasks": tuple(tasks)})
    slim = MultiDecoderModel(config)
    wanted = slim.state_dict().keys()
    slim.load_state_dict({k: v for k, v in model.state_dict().items() if k in wanted})
    return slim


def save_model(model: MultiDecoderModel, folder: str | Path) -> None:
    """Write weights and config (contiguous tensors, as safetensors requires)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_NAME)
    model.config.save(folder / CONFIG_NAME)


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


def save_checkpoint(accelerator, model, out: Path, state: TrainState, best: bool = False, extra: dict | None = None) -> None:
    """save_state into a temporary folder, then publish it as checkpoints/last (and a copy as best)."""
    # extra: {name: module} not prepared in every stage, saved as name.pt (loads with weights_only=True)
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
    """Load what save_checkpoint's `extra` wrote."""
    for name, module in extra.items():
        module.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))


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


def rewind_log(path: Path, state: TrainState) -> None:
    """Drop log.jsonl lines of epochs the checkpoint does not include (a kill after logging, before saving)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    keep = [line for line, r in zip(lines, records) if (r["stage"], r["epoch"]) < state.position()]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def write_json_atomic(path: Path, record: dict) -> None:
    """Write JSON next to `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def write_json_line(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def refuse_overwrite(out: Path, resume: str | None) -> None:
    """A run that starts from scratch must not overwrite another: not without --resume in a folder with a log or a
    checkpoint, not with --resume auto where a finished run left only its metrics (no checkpoint to resume)."""
    ckpt = Path(out) / "checkpoints"
    found = [name for name in ("log.jsonl", "metrics.json") if (Path(out) / name).is_file()]
    found += [f"checkpoints/{c.name}" for c in (ckpt / "last", ckpt / "last.prev") if is_complete(c)]
    if resume is not None:
        found = [f for f in found if f == "metrics.json"]
    if found:
        raise CheckpointError(f"{out} holds a run ({', '.join(found)}): continue it with --resume auto (if it has a "
                              "checkpoint) or choose a new --output-dir; nothing was written")


def differ(before: dict, now: dict) -> bool:
    """Whether two run configs differ in more than how the run was started (--resume)."""
    return {k: v for k, v in before.items() if k != "resume"} != {k: v for k, v in now.items() if k != "resume"}


class RunLog:
    """The run folder's settings and TensorBoard scalars, held back until the run has shown it starts (its first
    epoch trained and validated, or its first checkpoint): a run refused or stopped before then (a setting that does
    not fit the checkpoint, a file that fails to decode) leaves an existing run folder exactly as it was."""

    def __init__(self, accelerator, out: Path, run_config: dict, start: TrainState, resumed: bool):
        self.accelerator, self.out, self.run_config = accelerator, Path(out), run_config
        self.start, self.resumed = start, resumed
        self.pending: list[tuple[dict, int]] = []  # (values, step) logged before open()
        self.opened = False

    def log(self, values: dict, step: int) -> None:
        if self.opened:
            self.accelerator.log(values, step=step)
        else:
            self.pending.append((values, step))

    def open(self) -> None:
        """Write run_config.json (a resumed run keeps the one it started with), drop log lines the checkpoint does
        not include, start TensorBoard and send it what was logged so far."""
        if self.opened:
            return
        self.opened = True
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / "run_config.json"
            if not self.resumed or not path.is_file():
                write_json_atomic(path, self.run_config)
            elif differ(json.loads(path.read_text()), json.loads(json.dumps(self.run_config, default=str))):
                write_json_atomic(self.out / "run_config.resumed.json", self.run_config)  # what this part ran with
            rewind_log(self.out / "log.jsonl", self.start)
        self.accelerator.init_trackers("tensorboard")  # the run's settings are in run_config.json
        for values, step in self.pending:
            self.accelerator.log(values, step=step)
        self.pending.clear()
