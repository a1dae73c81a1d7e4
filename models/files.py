"""The files of a model or checkpoint folder: a manifest (each file's size and SHA-256) written last, its verification
before anything is loaded, and file modes that follow the umask like any other file the user writes."""
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 20  # bytes read per hash update


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run or fails verification; the message names it, says why and what to do."""


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, a race with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):  # not Linux, or a kernel before 4.7
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def match_umask(*paths: Path) -> None:
    """Give files the mode a plain open() gives (0644 under umask 022): writers that go through a temporary file
    (safetensors, mkstemp) leave 0600, which a copy to a device or a service account cannot read."""
    mode = 0o666 & ~umask()
    for path in paths:
        os.chmod(path, mode)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])  # hashlib releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(sha256, paths))


def write_manifest(folder: Path) -> dict:
    """Record every file under `folder` (size, SHA-256) in manifest.json, written last and atomically; returns it."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                   and not p.name.startswith(f".{MANIFEST_NAME}"))
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": h}
             for p, h in zip(paths, _hash_all(paths))}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, None when it has none; CheckpointError when it is unreadable."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not all(isinstance(v["size"], int) and isinstance(v["sha256"], str) for v in files.values()):
            raise ValueError("an entry lacks size or sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    return manifest


def verify(folder: Path, names: list[str] | None = None) -> list[str] | None:
    """What is wrong with the folder's files against its manifest (`names` only, else every listed file): one
    message per bad file naming it, [] when all verify, None when there is no manifest."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except CheckpointError as exc:
        return [str(exc)]
    if manifest is None:
        return None
    listed = manifest["files"]
    problems = [f"{folder / n}: not in {MANIFEST_NAME} (not written with this folder)"
                for n in names or () if n not in listed]
    to_hash = []
    for name in [n for n in (names or listed) if n in listed]:
        path, expected = folder / name, listed[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (size := path.stat().st_size) < expected["size"]:
            problems.append(f"{path}: truncated ({size:,} of {expected['size']:,} bytes)")
        elif size > expected["size"]:
            problems.append(f"{path}: {size:,} bytes, {MANIFEST_NAME} says {expected['size']:,}")
        else:
            to_hash.append((path, expected["sha256"]))
    for (path, expected), found in zip(to_hash, _hash_all([p for p, _ in to_hash])):
        if found != expected:
            problems.append(f"{path}: contents changed (SHA-256 differs from {MANIFEST_NAME})")
    return problems


_warned: set[Path] = set()


def warn_unverified(folder: Path) -> None:
    """One line, once per folder: it has no manifest (written before checkpoints carried checksums)."""
    if Path(folder).resolve() not in _warned:
        _warned.add(Path(folder).resolve())
        # printed, not warnings.warn: Python's format adds a source line that means nothing to a user
        print(f"warning: {folder}: no {MANIFEST_NAME} (written before checkpoints carried checksums); "
              "loading it unverified", file=sys.stderr)


def check(folder: Path, names: list[str] | None = None) -> None:
    """Raise CheckpointError naming every bad file; a folder without a manifest loads with a one-line warning."""
    problems = verify(folder, names)
    if problems:
        raise CheckpointError(f"{folder} fails verification: " + "; ".join(problems))
    if problems is None:
        warn_unverified(folder)
