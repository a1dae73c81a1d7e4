"""Reusing a finished stage prefix: a run whose first stages are set up exactly as another run's (the same settings,
model, seed and images up to the end of them) starts from that run's checkpoint at the end of those stages instead of
training them again. tools/run_tables.py gives every run of a sweep one store (`train.py --reuse-prefixes DIR`), so
the depth stage that `d_s_b` and `d_s_b --copy-weights` share, at every labelled count, trains once per seed.

A prefix is keyed by a fingerprint of everything that decides the weights at its end (`fingerprint`); a run reusing
one resumes from it exactly as a killed run resumes from its last checkpoint, so its final weights are those it would
have reached training the prefix itself (bit-identical on the CPU). While a run trains a prefix that is not stored yet
it holds a lock on it: a run that needs the same prefix waits for it instead of training it a second time.
"""
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from models.files import CheckpointError, verify, write_manifest
from run_state.checkpoints import STATE_NAME, fsync_tree, is_complete
from run_state.writes import write_text, writing

CHECKPOINT_DIR = "checkpoint"
INFO_NAME = "prefix.json"
LOG_NAME = "log.jsonl"


def fingerprint(settings: dict) -> str:
    """A short hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


class PrefixStore:
    """A folder of finished stage prefixes, one subfolder per fingerprint: the checkpoint at the prefix's end, the
    log.jsonl lines of its rounds and prefix.json (which run made it, its stages)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.held: dict[str, int] = {}  # fingerprint -> locked file descriptor

    def entry(self, key: str) -> Path:
        return self.folder / key

    def has(self, key: str) -> bool:
        return is_complete(self.entry(key) / CHECKPOINT_DIR) and (self.entry(key) / INFO_NAME).is_file()

    def longest(self, keys: list[str]) -> int:
        """The index of the longest stored prefix of `keys` (prefix k: stages 0..k), -1 for none."""
        return max((k for k, key in enumerate(keys) if self.has(key)), default=-1)

    def lock(self, key: str) -> None:
        """Wait until no other run trains this prefix, then hold it until `release` (or until this process ends)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f".{key}.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.held[key] = fd

    def release(self, key: str) -> None:
        fd = self.held.pop(key, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def put(self, key: str, checkpoint: Path, log_lines: list[str], info: dict) -> bool:
        """Store a prefix (atomically: a temporary folder renamed into place); False when it is there already. The
        checkpoint is copied with its manifest: a prefix verifies like any checkpoint."""
        if self.has(key):
            return False
        tmp = self.folder / f".{key}.tmp-{os.getpid()}"
        with writing(self.entry(key), cleanup=(tmp,)):
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint, tmp / CHECKPOINT_DIR)
            (tmp / LOG_NAME).write_text("".join(line + "\n" for line in log_lines))
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=2))  # last: marks it complete
            fsync_tree(tmp)
            shutil.rmtree(self.entry(key), ignore_errors=True)  # an incomplete one left by a crash
            os.replace(tmp, self.entry(key))
        return True

    def take(self, key: str, out: Path, schedule: str) -> dict:
        """Start the run folder `out` from a stored prefix, verified first: its checkpoint as checkpoints/last (the
        train state's schedule set to this run's, the manifest written again) and its log.jsonl lines; returns
        prefix.json."""
        entry = self.entry(key)
        problems = verify(entry / CHECKPOINT_DIR)
        if problems:
            raise CheckpointError(f"--reuse-prefixes: the stored prefix {entry} fails verification: "
                                  + "; ".join(problems) + f". Delete {entry} and run again (it will be trained anew).")
        last = Path(out) / "checkpoints" / "last"
        tmp = last.with_name(".last.tmp")
        with writing(last, cleanup=(tmp,)):
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(entry / CHECKPOINT_DIR, tmp)
            state = json.loads((tmp / STATE_NAME).read_text())
            (tmp / STATE_NAME).write_text(json.dumps({**state, "schedule": schedule}))
            if problems is not None:  # a prefix stored before checksums stays without a manifest
                write_manifest(tmp)
            fsync_tree(tmp)
            os.replace(tmp, last)
        write_text(Path(out) / LOG_NAME, (entry / LOG_NAME).read_text())
        return json.loads((entry / INFO_NAME).read_text())


# train.py flags that cannot change the weights at the end of a stage prefix, or whose effect is in the prefix's own
# record (its stages, the images of each stage's streams, its rounds): left out of the fingerprint
NEUTRAL = ("output_dir", "resume", "reuse_prefixes", "workers", "log_every", "val_batch_size", "checkpoint_every",
           "dist_timeout", "check_data", "schedule", "copy_weights", "stage_epochs", "stage_steps", "loss_weights",
           "joint_weighting", "dwa_temperature", "weighting_lr", "train_split", "depth_only", "depth_only_val",
           "depth_only_fraction", "val_every", "max_steps_per_epoch")
JOINT = ("loss_weights", "joint_weighting", "dwa_temperature", "weighting_lr")  # they matter once a `b` stage ran


def prefix_keys(args: dict, plans: list, ids: list[str], model: dict, copies: dict, processes: int) -> list[str]:
    """The fingerprint of each stage prefix that ends before the last stage (stages 0..k, k = 0, 1, ...): the run's
    settings but the neutral ones, the model, the number of processes, and per stage its definition, rounds and the
    images of its streams (ids, per batch, tag); copies done within it; the joint stage's settings once one ran."""
    settings = {k: v for k, v in args.items() if k not in NEUTRAL}
    keys, stages = [], []
    for k, plan in enumerate(plans[:-1]):
        streams = [(fingerprint([ids[i] for i in s.indices]), s.per_batch, s.tag) for s in plan.streams]
        stages.append({"stage": asdict(plan.stage), "rounds": plan.rounds, "streams": streams})
        joint = {name: args[name] for name in JOINT} if any(len(p.stage.tasks) > 1 for p in plans[: k + 1]) else {}
        keys.append(fingerprint({"settings": settings, "model": model, "processes": processes, "stages": stages,
                                 "copies": {i: c for i, c in copies.items() if i <= k}, "joint": joint}))
    return keys


def start_from_prefix(accelerator, store: PrefixStore, keys: list[str], out: Path, schedule: str) -> dict | None:
    """A fresh run: on the main process, the longest stored prefix of `keys` becomes its last checkpoint (waiting
    while another run trains the one after it); the next prefix, which this run will train, stays locked until it is
    stored (keep_prefix). Returns the prefix's record on the main process (None on others, or when none was stored)."""
    taken = None
    if accelerator.is_main_process:
        k = store.longest(keys)
        while k + 1 < len(keys):
            store.lock(keys[k + 1])
            if not store.has(keys[k + 1]):
                break  # this run trains it
            store.release(keys[k + 1])  # another run stored it while this one waited
            k = store.longest(keys)
        if k >= 0:
            Path(out).mkdir(parents=True, exist_ok=True)
            info = store.take(keys[k], out, schedule)
            taken = {"stages": k + 1, "fingerprint": keys[k], "made_by": info["run"]}
            accelerator.print(f"--reuse-prefixes: stages 0..{k} as run {info['run']} trained them "
                              f"({store.entry(keys[k])}); training from stage {k + 1}")
    accelerator.wait_for_everyone()
    return taken


def keep_prefix(accelerator, store: PrefixStore, key: str, out: Path, stage: int) -> None:
    """At the end of a stage that is not the last: store the run's last checkpoint as the prefix ending there (unless
    stored already) with its log lines, and let runs waiting for it go on."""
    if accelerator.is_main_process:
        log = Path(out) / LOG_NAME
        lines = [line for line in (log.read_text().splitlines() if log.is_file() else [])
                 if json.loads(line)["stage"] <= stage]
        if store.put(key, Path(out) / "checkpoints" / "last", lines, {"run": str(Path(out).resolve()),
                                                                      "stages": stage + 1}):
            accelerator.print(f"--reuse-prefixes: stages 0..{stage} stored as {store.entry(key)}")
        store.release(key)
    accelerator.wait_for_everyone()
