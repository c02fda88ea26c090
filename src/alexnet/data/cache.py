"""Folders built once: one process builds, the others wait and then use the result."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

DONE = "COMPLETE"


def is_complete(folder: Path) -> bool:
    return (folder / DONE).exists()


def partial_of(final: Path) -> Path:
    """Where a resumable build of `final` keeps what it has done (see build_once)."""
    return final.parent / f".{final.name}.partial"


def cannot_write(folder: Path, error: OSError) -> str:
    """Why a folder of the cache could not be written, in words ("a file, not a folder", "No space left on
    device (PATH)"), for a message that names `folder` already."""
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"{above} is a file, not a folder"
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(folder) else ""
    return f"{error.strerror or error}{where}"


def build_once(final: Path, build: Callable[[Path], None], note: str = "", replace_incomplete: bool = False,
               resumable: bool = False) -> bool:
    """Make `final` by calling `build(tmp)` on an empty temporary sibling folder, which is renamed into
    place once `build` returns (with a COMPLETE marker holding `note`). An exclusive lock beside it lets
    one process build while others, started at the same time, wait and then find it complete. Returns
    False when it was already complete. An interrupted build leaves no partial `final` behind. An
    existing `final` without the marker is replaced only when empty, or with `replace_incomplete` (for
    folders of our own cache). `resumable`: the temporary folder has a fixed name (.NAME.partial) and is
    kept when the build fails or is killed, so that `build` finds there what an interrupted build did."""
    final = Path(final)
    if is_complete(final):
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(final):
            return False
        if resumable:
            tmp = partial_of(final)
            tmp.mkdir(exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a plain folder's permissions, not mkdtemp's private ones
        try:
            build(tmp)
            (tmp / DONE).write_text(f"{note or final.name}\n")
            if final.exists():
                if replace_incomplete:  # a leftover in our cache
                    shutil.rmtree(final)
                else:
                    final.rmdir()  # an empty folder only: a user's files are never removed
            os.rename(tmp, final)
        finally:
            if tmp.exists() and not (resumable and not is_complete(final)):
                shutil.rmtree(tmp, ignore_errors=True)
    return True
