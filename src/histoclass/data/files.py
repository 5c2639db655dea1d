"""Files in and out, safely: atomic writes that honour the umask, output checks before the
work starts, stale temporary files cleaned up, folder walks that follow symlinks, CSV reading
whose errors name the file.

Every file histoclass writes (manifests, predictions, checkpoints, ensembles, the decode cache,
figures) goes through :func:`atomic_write`: a temporary file beside the target, renamed over it
when complete, so a crash or a full disk never leaves half a file under the final name, and the
temporary file is removed when writing fails. ``tempfile.mkstemp`` creates files with mode 0600
whatever the umask; :func:`atomic_write` gives them the mode ``open()`` would (0666 & ~umask).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pandas as pd

# A temporary file of atomic_write is ".<target name>.<random>.tmp" beside the target.
TMP_SUFFIX = ".tmp"
# Older than this, a temporary file is left over from a killed or failed run (a write takes
# milliseconds); younger ones may belong to a process writing right now.
STALE_SECONDS = 60.0


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | Path, exc: OSError) -> OSError:
    """``exc`` as an ``OSError`` naming the final ``path`` (not a temporary name) in one line."""
    why = exc.strerror or str(exc) or type(exc).__name__
    err = OSError(exc.errno, f"cannot write {path}: {why}")
    err.filename = str(path)
    return err


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Write ``path`` through ``write(file object)`` into a temporary file, then rename it.

    Raises:
        OSError: The folder cannot be created or written (read-only, full disk, a file where a
            folder should be); the message names ``path`` and no temporary file is left.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(folder: str | Path, older_than: float = STALE_SECONDS,
                       recursive: bool = False) -> list[Path]:
    """Delete temporary files of :func:`atomic_write` left in ``folder`` by killed runs."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    files = folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}")
    for p in files:
        with contextlib.suppress(OSError):
            if p.is_file() and now - p.stat().st_mtime > older_than:
                p.unlink()
                removed.append(p)
    return removed


def check_output(path: str | Path, kind: str = "file", inputs: tuple = ()) -> Path:
    """Make sure ``path`` (a ``file`` or a ``folder``) can be written, before any work starts.

    Creates the folder (the file's folder), writes and removes a probe file, and removes stale
    temporary files there. ``inputs`` are paths ``path`` must not be (it would overwrite them).

    Raises:
        OSError: The location cannot be written; the message names it.
        ValueError: ``path`` is one of ``inputs``, or a folder where a file is wanted.
    """
    path = Path(path)
    for item in inputs:
        if item and path.exists() and Path(item).exists() and path.samefile(item):
            raise ValueError(f"--out {path} is also an input; it would be overwritten: choose "
                             "another output path")
    folder = path if kind == "folder" else path.parent
    if kind == "file" and path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name (e.g. {path}/out.csv)")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".histoclass-probe.", suffix=TMP_SUFFIX)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise write_error(folder, exc) from None
    remove_stale_temps(folder)
    return path


OUTPUT_MARKER = ".histoclass-output"


def mark_output(folder: str | Path, command: str) -> Path:
    """Mark ``folder`` as written by ``histoclass <command>``: scans will not take it for data."""
    from histoclass._version import __version__

    path = Path(folder) / OUTPUT_MARKER
    path.write_text(f"written by histoclass {command} {__version__}: outputs, not data; "
                    "histoclass refuses to scan this folder for images\n", encoding="utf-8")
    return path


def output_root(path: str | Path) -> Path | None:
    """The folder at or above ``path`` that histoclass wrote (holds the marker), if any."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / OUTPUT_MARKER).is_file():
            return folder
    return None


def refuse_output(path: str | Path) -> str | None:
    """Why ``path`` is not data (it lies in a folder histoclass wrote), else ``None``."""
    root = output_root(path)
    if root is None:
        return None
    return (f"{root} was written by histoclass (it holds {OUTPUT_MARKER}): its images are "
            "figures, not data; give the folder of the original images")


def walk(root: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every regular file under ``root``, following directory symlinks (each real folder once,
    so a link loop ends), sorted; and every entry that is not one, as ``(path, reason)``: a
    dangling link, a FIFO/socket/device, a link loop, an empty folder, a sub-folder histoclass
    wrote (:func:`mark_output`: its images are figures, not data)."""
    root = Path(root)
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> None:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            skipped.append((str(folder), "symlink loop: folder already scanned"))
            return
        seen.add((st.st_dev, st.st_ino))
        if folder != root and (folder / OUTPUT_MARKER).is_file():
            skipped.append((str(folder), refuse_output(folder) or ""))
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(folder), f"cannot list folder ({exc.strerror})"))
            return
        if not entries and folder != root:
            skipped.append((str(folder), "empty folder"))
        for entry in entries:
            p = Path(entry.path)
            try:
                mode = os.stat(p).st_mode
            except OSError:
                skipped.append((str(p), "dangling symlink" if entry.is_symlink()
                                else "cannot be read"))
                continue
            if stat.S_ISDIR(mode):
                visit(p)
            elif stat.S_ISREG(mode):
                if p.name != OUTPUT_MARKER:
                    files.append(p)
            else:
                kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                        else "device")
                skipped.append((str(p), f"not a regular file ({kind})"))

    visit(root)
    return sorted(files), skipped


def read_csv(path: str | Path, what: str = "CSV") -> pd.DataFrame:
    """A CSV as strings (empty cells stay ``""``); errors name the file and say what is wrong.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Empty, not UTF-8 text, or not parseable as CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file, not a {what} (expected a header row)") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text, not a {what} (byte {exc.start}: "
                         f"{exc.reason})") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path}: not a readable {what} ({str(exc).strip()})") from None
