"""The run folder's log: run_config.json, log.jsonl, TensorBoard, held back until the run has shown it starts; the
refusal to start a fresh run over another one; a torn last log line (a crash mid-write) dropped at resume. Every
write names its path when it fails (run_state/writes.py)."""
import json
import os
import sys
from pathlib import Path

from data.visualize import log_images
from models.io import CheckpointError
from run_state.checkpoints import TrainState, is_complete, save_checkpoint
from run_state.writes import writing

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"  # Accelerate's TensorBoard tracker writes into project_dir/<its run name>


def parse_record(line: str) -> dict:
    """One log.jsonl line: a JSON object with the stage and epoch it logs (ValueError otherwise)."""
    record = json.loads(line)
    if not isinstance(record, dict) or not {"stage", "epoch"} <= record.keys():
        raise ValueError("not a JSON object with stage and epoch")
    return record


def read_log(path: Path) -> tuple[list[str], list[dict], str | None]:
    """log.jsonl's lines and records, and its torn last line (None when the last line is whole); any other line
    that is not a record is an error naming its number."""
    lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(parse_record(line))
        except ValueError as exc:
            if n == len(lines):  # a crash mid-append leaves part of the last line
                return lines[:-1], records, line
            raise CheckpointError(f"{path} line {n}: not a log record ({exc}); only a torn last line is dropped by "
                                  f"itself: fix or delete line {n}, then resume") from exc
    return lines, records, None


def rewrite_log(path: Path, lines: list[str]) -> None:
    """Replace log.jsonl by `lines`, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, cleanup=(tmp,)):
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)


def repair_log(path: Path) -> None:
    """At resume, before any step: drop a torn last line of log.jsonl with a warning naming it (and end a whole
    last line that lacks its newline, so the next line does not join it)."""
    if not Path(path).is_file():
        return
    lines, _, torn = read_log(path)
    whole = not lines or Path(path).read_bytes().endswith(b"\n")
    if torn is None and whole:
        return
    rewrite_log(path, lines)
    if torn is not None:
        shown = torn if len(torn) <= 80 else torn[:77] + "..."
        print(f"warning: {path} line {len(lines) + 1} is torn (a crash mid-write), dropped: {shown!r}", file=sys.stderr)


def rewind_log(path: Path, state: TrainState) -> None:
    """Drop log.jsonl lines of epochs the checkpoint does not include (a kill after logging, before saving)."""
    if not path.is_file():
        return
    lines, records, torn = read_log(path)
    keep = [line for line, r in zip(lines, records) if (r["stage"], r["epoch"]) < state.position()]
    if len(keep) != len(lines) or torn is not None:
        rewrite_log(path, keep)


def write_json_atomic(path: Path, record: dict) -> None:
    """Write JSON next to `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, cleanup=(tmp,)):
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, path)


def write_json_line(path: Path, record: dict) -> None:
    """Append one JSON line; a failed write is cut off again, so the log never keeps half a line it can avoid."""
    with writing(path):
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


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
    beside the prepared objects (see save_checkpoint). A write that fails raises WriteError naming its path."""

    def __init__(self, accelerator, out: Path, run_config: dict, start: TrainState, resumed: bool,
                 extra: dict | None = None):
        self.accelerator, self.out, self.run_config = accelerator, Path(out), run_config
        self.start, self.resumed, self.extra = start, resumed, extra or {}
        self.pending: list[tuple[dict, int]] = []  # (values, step) logged before open()
        self.opened = False
        self.tensorboard = self.out / TENSORBOARD_DIR

    def save(self, model, state: TrainState, best: bool = False) -> None:
        """Publish a checkpoint of where training stands as checkpoints/last (and best)."""
        self.open()
        save_checkpoint(self.accelerator, model, self.out, state, best=best, extra=self.extra)

    def epoch_line(self, record: dict) -> None:
        """One line of log.jsonl (main process)."""
        self.open()
        if self.accelerator.is_main_process:
            write_json_line(self.out / LOG_NAME, record)

    def final_metrics(self, metrics: dict) -> None:
        """metrics.json (main process), written before the checkpoint that marks the run finished."""
        if self.accelerator.is_main_process:
            write_json_atomic(self.out / "metrics.json", metrics)

    def log(self, values: dict, step: int) -> None:
        if self.opened:
            with writing(self.tensorboard):  # the event file's writer thread raises its failure on the next call
                self.accelerator.log(values, step=step)
        else:
            self.pending.append((values, step))

    def images(self, batch: dict, outputs: dict, step: int, palette=None) -> None:
        """TensorBoard's validation images (data/visualize.py log_images), main process."""
        with writing(self.tensorboard):
            log_images(self.accelerator, batch, outputs, step, palette=palette)

    def open(self) -> None:
        """Write run_config.json (a resumed run keeps the one it started with), drop log lines the checkpoint does
        not include, start TensorBoard and send it what was logged so far."""
        if self.opened:
            return
        self.opened = True
        if self.accelerator.is_main_process:
            with writing(self.out):
                self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / "run_config.json"
            if not self.resumed or not path.is_file():
                write_json_atomic(path, self.run_config)
            elif differ(json.loads(path.read_text()), json.loads(json.dumps(self.run_config, default=str))):
                write_json_atomic(self.out / "run_config.resumed.json", self.run_config)  # what this part ran with
            rewind_log(self.out / LOG_NAME, self.start)
        with writing(self.tensorboard):
            self.accelerator.init_trackers("tensorboard")  # the run's settings are in run_config.json
        for values, step in self.pending:
            self.log(values, step)
        self.pending.clear()

    def finish(self) -> None:
        """End training: TensorBoard flushes and closes its event file (which may fail like any write)."""
        with writing(self.tensorboard):
            self.accelerator.end_training()
