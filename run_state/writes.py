"""Write failures named: a full disk, a quota, a read-only folder, an I/O or serialisation error while writing the run
folder becomes one WriteError that names the path and the cause (for a full disk: free and needed space), and the
temporary files and folders a failed or crashed write leaves are removed."""
import errno
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from models.files import CheckpointError

# what torch.save (RuntimeError "unexpected pos"), safetensors, json and pickle raise when a write fails
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError, TypeError, ValueError, pickle.PicklingError)
STALE = (".last.tmp", ".best.tmp")  # checkpoints/ temporary folders (run_state/checkpoints.py)


class WriteError(RuntimeError):
    """A file of the run folder could not be written; the message names it and the cause. Nothing already
    published (the previous checkpoint, log lines before it) was touched."""


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024


def free_space(path: Path) -> int | None:
    """Free bytes on the filesystem of `path` (its nearest existing parent); None if unknown."""
    for parent in (Path(path), *Path(path).parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def error_number(exc: BaseException) -> int | None:
    """The errno behind a write failure: an OSError's, or the one safetensors quotes ("os error 28")."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))
    return int(found.group(1)) if found else None


def describe(exc: BaseException, path: Path, needed: int | None = None) -> str:
    """`cannot write PATH: CAUSE`, one line; ENOSPC and EDQUOT say the free and (if known) the needed space; a
    failure without an errno (torch.save's "unexpected pos") says the free space, which tells a full disk apart."""
    code = error_number(exc)
    free = free_space(path)
    if code is not None:
        cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    else:
        cause = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    serialising = isinstance(exc, (TypeError, ValueError, pickle.PicklingError))  # the object, not the disk
    if free is not None and (code in (errno.ENOSPC, errno.EDQUOT) or code is None and not serialising):
        cause += f"; {human(free)} free there" + (f", about {human(needed)} needed" if needed else "")
        if code is None and needed and free < needed:
            cause += " (the disk is full)"
    return f"cannot write {path}: {cause}"


def remove(*paths: Path) -> None:
    """Remove temporary files and folders, whatever state a failed write left them in."""
    for path in paths:
        if Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)


@contextmanager
def writing(path: Path, needed: int | None = None, cleanup: tuple = ()):
    """Turn a failure to write `path` into a WriteError naming it, after removing `cleanup`."""
    try:
        yield
    except (WriteError, CheckpointError):
        remove(*cleanup)
        raise
    except WRITE_ERRORS as exc:
        remove(*cleanup)
        raise WriteError(describe(exc, path, needed)) from exc


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary folders and files a crash mid-write left in a run folder; returns them."""
    out = Path(out)
    found = [out / "checkpoints" / name for name in STALE if (out / "checkpoints" / name).exists()]
    found += sorted(out.glob(".*.tmp"))  # run_log.py's atomic writes
    remove(*found)
    return found


def write_text(path: Path, text: str) -> None:
    """Write a small text file (and its folder), naming the path if that fails."""
    with writing(path, needed=len(text.encode())):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
