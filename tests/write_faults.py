"""Test helper: one file write fails as it fails on a full disk, in this process or in a script run under it.

    SEGDEPTH_TEST_FAIL_WRITE=optimizer.bin:2 python tests/write_faults.py train.py ARGS...

The Nth write (main process only: RANK 0 or unset) of a file named NAME (or its `.NAME.tmp`) fails the way its writer
fails when the disk fills up: torch.save leaves a partial file and raises RuntimeError("... unexpected pos ..."),
safetensors raises SafetensorError("... No space left on device (os error 28)"), open() and os.write raise
OSError(ENOSPC) (os.write after writing half). From then on shutil.disk_usage reports 1 MiB free.
"""
import builtins
import errno
import io
import os
import runpy
import shutil
import sys
from collections import namedtuple
from pathlib import Path

FAIL_ENV = "SEGDEPTH_TEST_FAIL_WRITE"
FREE = 1 << 20


class WatchedFile:
    """A file opened for writing whose first write() asks `hit` whether to fail with ENOSPC (a copy through
    os.sendfile, as shutil.copytree makes checkpoints/best, writes nothing through it and is not counted)."""

    def __init__(self, f, hit):
        self._f, self._hit, self._asked = f, hit, False

    def write(self, data):
        if not self._asked:
            self._asked = True
            if self._hit():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def install(name: str, nth: int, set_attr=setattr) -> dict:
    """Patch the writers (set_attr: pytest's monkeypatch.setattr to undo it); returns the counts of writes seen."""
    import accelerate.utils.other
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    import models.io

    seen = {"writes": 0, "failed": False}
    usage = namedtuple("usage", "total used free")

    def hit(path) -> bool:
        if os.environ.get("RANK", "0") != "0" or seen["failed"]:
            return False
        if Path(str(path)).name not in (name, f".{name}.tmp"):
            return False
        seen["writes"] += 1
        seen["failed"] = seen["writes"] == nth
        return seen["failed"]

    real_save, real_safe, real_open, real_write, real_usage = (
        torch.save, safetensors.torch.save_file, io.open, os.write, shutil.disk_usage)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and hit(f):
            real_save(obj, f, *args, **kwargs)
            size = os.path.getsize(f)
            os.truncate(f, size // 2)
            raise RuntimeError(f"[enforce fail at inline_container.cc:672] . unexpected pos {size // 2 + 64} vs "
                               f"{size // 2}")
        return real_save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        if hit(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_safe(tensors, filename, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and \
                Path(file).name in (name, f".{name}.tmp"):
            return WatchedFile(f, lambda: hit(file))
        return f

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target and hit(target):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def disk_usage(path):
        total, used, free = real_usage(path)
        return usage(total, used, min(free, FREE)) if seen["failed"] else usage(total, used, free)

    set_attr(torch, "save", save)
    for module in (safetensors.torch, models.io):
        set_attr(module, "save_file", save_file)
    set_attr(accelerate.utils.other, "safe_save_file", save_file)
    set_attr(io, "open", open_)
    set_attr(builtins, "open", open_)
    set_attr(os, "write", write)
    set_attr(shutil, "disk_usage", disk_usage)
    return seen


if __name__ == "__main__":
    script, *argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    target, _, count = os.environ[FAIL_ENV].partition(":")
    install(target, int(count or 1))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
