"""The run folder's log: run_config.json, log.jsonl, TensorBoard, held back until the run has shown it starts; and
the refusal to start a fresh run over another one."""
import json
import os
from pathlib import Path

from models.io import CheckpointError
from run_state.checkpoints import TrainState, is_complete, save_checkpoint


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
    """What a run writes into its folder: settings, TensorBoard scalars, log.jsonl, metrics.json and checkpoints.
    Nothing is written until the run has shown it starts (its first epoch trained and validated, or its first
    checkpoint): a run refused or stopped before then (a setting that does not fit the checkpoint, a file that fails
    to decode) leaves an existing run folder exactly as it was. `extra`: {name: module} saved with every checkpoint
    beside the prepared objects (see save_checkpoint)."""

    def __init__(self, accelerator, out: Path, run_config: dict, start: TrainState, resumed: bool,
                 extra: dict | None = None):
        self.accelerator, self.out, self.run_config = accelerator, Path(out), run_config
        self.start, self.resumed, self.extra = start, resumed, extra or {}
        self.pending: list[tuple[dict, int]] = []  # (values, step) logged before open()
        self.opened = False

    def save(self, model, state: TrainState, best: bool = False) -> None:
        """Publish a checkpoint of where training stands as checkpoints/last (and best)."""
        self.open()
        save_checkpoint(self.accelerator, model, self.out, state, best=best, extra=self.extra)

    def epoch_line(self, record: dict) -> None:
        """One line of log.jsonl (main process)."""
        self.open()
        if self.accelerator.is_main_process:
            write_json_line(self.out / "log.jsonl", record)

    def final_metrics(self, metrics: dict) -> None:
        """metrics.json (main process), written before the checkpoint that marks the run finished."""
        if self.accelerator.is_main_process:
            write_json_atomic(self.out / "metrics.json", metrics)

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
