"""Resuming: the checkpoint to continue from, verified against its manifest before anything of it is used.
`--resume auto` takes the newest of checkpoints/last, last.prev and best that verifies and says which it skipped and
why; `--resume PATH` takes that checkpoint or fails naming what is wrong with it, never another one."""
import json
import pickle
from dataclasses import fields
from pathlib import Path

from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError, safe_open

from models.files import MANIFEST_NAME, verify, warn_unverified
from models.io import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, check_shapes
from models.model import ModelConfig, MultiDecoderModel
from run_state.checkpoints import STATE_NAME, TrainState, is_complete, load_extra
from run_state.run_log import LOG_NAME, repair_log
from run_state.writes import WriteError, clean_stale

FALLBACK = ("last", "last.prev", "best")  # --resume auto's candidates; on a tie of their train states, this order
LOAD_ERRORS = (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError, KeyError, ValueError)


def problems(folder: Path) -> list[str] | None:
    """What is wrong with a checkpoint folder: [] when it verifies, None when it has no manifest but every file a
    resume needs (a checkpoint written before checksums), else one message per bad or missing file."""
    found = verify(folder)
    absent = [f"{folder / n}: missing" for n in (STATE_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if found is None:
        return absent or None
    return found + [a for a in absent if a not in found]


def global_step(folder: Path) -> int:
    """Where a checkpoint stands, read before it is verified (only to order the candidates): -1 if unreadable."""
    try:
        return int(json.loads((folder / STATE_NAME).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def find_resume(resume: str | None, out: Path, say=print) -> Path | None:
    """The verified checkpoint to resume from. `auto`: the newest of the run folder's last, last.prev and best that
    verifies (None when there is none at all, an error naming each when none verifies); a PATH: that checkpoint
    folder, or a run folder's last one, which must verify."""
    if resume is None:
        return None
    if resume != "auto":
        return checked_path(Path(resume))
    ckpt = Path(out) / "checkpoints"
    candidates = sorted((ckpt / n for n in FALLBACK if (ckpt / n).is_dir()), key=lambda c: -global_step(c))
    skipped = []
    for folder in candidates:
        bad = problems(folder)
        if not bad:
            for line in skipped:
                say(f"--resume auto: skipped {line}")
            if skipped:
                say(f"--resume auto: continuing from {folder}, the newest checkpoint that verifies")
            if bad is None:
                warn_unverified(folder)
            return folder
        skipped.append(f"checkpoints/{folder.name}: " + "; ".join(bad))
    if not skipped:
        return None
    raise CheckpointError(f"--resume auto: no checkpoint in {ckpt} verifies: " + " | ".join(skipped)
                          + ". Nothing was trained on them; restore one or start a new --output-dir.")


def checked_path(path: Path) -> Path:
    """--resume PATH: the checkpoint folder it names (itself, or a run folder's last, or the last.prev a kill between
    publish's two renames left), verified; never another one."""
    last = path / "checkpoints" / "last"
    folder = next((c for c in (path, last, last.with_name("last.prev"))
                   if is_complete(c) or (c / MANIFEST_NAME).is_file()), None)
    if folder is None:
        raise CheckpointError(f"--resume {path}: not a complete checkpoint (needs {STATE_NAME} and {WEIGHTS_NAME}) "
                              f"nor a run folder with one in checkpoints/last")
    bad = problems(folder)
    if bad:
        raise CheckpointError(f"--resume {path}: {'; '.join(bad)}. --resume PATH does not fall back to another "
                              f"checkpoint: pass one that verifies (e.g. a run folder's checkpoints/best), or "
                              f"--resume auto in the run folder itself, which takes the newest that does.")
    if bad is None:
        warn_unverified(folder)
    return folder


def prepare_resume(accelerator, resume: str | None, out: Path) -> Path | None:
    """At the start of a resumed run, on the main process: remove temporary folders a crash left, drop a torn last
    line of log.jsonl, find the checkpoint (find_resume: verifies it). Every process gets the same answer or error."""
    answer = [("none", None)]
    if accelerator.is_main_process and resume is not None:
        try:
            for path in clean_stale(out):
                accelerator.print(f"removed {path} (left by a run stopped while writing it)")
            repair_log(Path(out) / LOG_NAME)
            found = find_resume(resume, out, accelerator.print)
            answer = [("path", str(found)) if found is not None else ("none", None)]
        except (CheckpointError, WriteError) as exc:
            answer = [(type(exc).__name__, str(exc))]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    kind, value = answer[0]
    if kind == "CheckpointError":
        raise CheckpointError(value)
    if kind == "WriteError":
        raise WriteError(value)
    return Path(value) if kind == "path" else None


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


def load_checkpoint(accelerator, folder: Path, extra: dict) -> None:
    """load_state and the `extra` modules (save_checkpoint) of a checkpoint find_resume chose; a load that fails
    anyway (a checkpoint without a manifest, which nothing verified) names the folder instead of a traceback."""
    try:
        accelerator.load_state(str(folder))
        load_extra(folder, extra)
    except CheckpointError:  # load_extra's: names the missing file already
        raise
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"{folder}: cannot load it ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
                              + ("" if (folder / MANIFEST_NAME).is_file() else
                                 f"; it has no {MANIFEST_NAME} to tell which file is damaged")) from exc
