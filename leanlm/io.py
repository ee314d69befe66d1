"""Files: atomic directory writes (complete under their final name, or not at all), and JSON objects read back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from leanlm.errors import LeanLMError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success fsync its files and rename it to `final`, so a crash
    never leaves a half-written directory under the final name.

    An existing `final` is replaced only after the new directory is complete (it is moved aside, then deleted).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result ordinary permissions
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(f: Path, what: str, missing: str) -> dict:
    """The JSON object in file `f`; LeanLMError `missing` without the file, naming it when it is not a JSON object."""
    if not f.is_file():
        raise LeanLMError(missing)
    try:
        obj = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeanLMError(f"{f}: corrupt {what} ({e})") from None
    if not isinstance(obj, dict):
        raise LeanLMError(f"{f}: corrupt {what} (not a mapping)")
    return obj
