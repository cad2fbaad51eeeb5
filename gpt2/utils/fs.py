"""Files on disk: the one way a file or folder is published, the one writability check, and run-directory
files that are never followed through a symbolic link.

Publishing. Every writer builds its output under a temporary name in the destination's own folder
(``.<name>.<random>.tmp``) and moves it into place with `move_into_place`, so a reader sees the old
content or the complete new one, never a half-written file; a failed write removes its temporary.
Durability, for every publish alike: the new file's data (or every file of a new folder) is fsynced
before the rename and the folder holding it after it, so what a rename published survives a crash.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

from gpt2.errors import UserError


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (a folder: its entries, e.g. after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file() and not child.is_symlink():
                fsync_path(child)
    fsync_path(path)


def temp_name(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside `path` (same folder, so the rename is atomic), nothing created."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")


def rename_durably(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename `src` to `dst` (same file system; a file replaces an existing `dst` atomically, a folder needs
    `dst` absent) and fsync the folders involved, so the rename itself survives a crash. The contents are
    not synced: use `move_into_place` to publish new content."""
    src, dst = Path(src), Path(dst)
    os.replace(src, dst)
    fsync_path(dst.parent)
    if src.parent != dst.parent:
        fsync_path(src.parent)


def move_into_place(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Publish the finished file or folder `src` as `dst`: fsync its contents, then `rename_durably`."""
    _fsync_tree(Path(src))
    rename_durably(src, dst)


def atomic_write(path: str | os.PathLike[str], content: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write `content` (bytes, UTF-8 text, or a function that writes to the open binary file) to `path`
    through a temporary file moved into place; the folder is created when missing. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def make_temp_dir(final: str | os.PathLike[str]) -> Path:
    """A new empty temporary folder beside `final`, for building a folder that is then moved into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a file or folder if it exists (a leftover temporary, a retired checkpoint)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------ checking by doing


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (or path itself) that does not exist yet."""
    return next((p for p in [*reversed(path.parents), path] if not p.exists()), None)


def check_writable(key: str, value: str | os.PathLike[str], *, is_dir: bool = False,
                   fix: str = "give a path in a writable folder") -> Path:
    """Check, before any slow work, that `key=value` can be written, by doing it: create the folder that
    will hold the output (an output file's folder, or the output folder itself) and a temporary file in
    it, then remove both again. Root passes every permission test, so nothing is asked of os.access.
    One process checks a path (the one that writes it): checks of one new folder from several processes
    at once would remove it from under each other.
    UserError naming the path, the reason and `fix` otherwise; returns the absolute path."""
    path = Path(value).expanduser().absolute()
    if not is_dir and path.is_dir():
        raise UserError(f"{key}={value} is a directory; give a file path, e.g. {key}={path / 'out.txt'}.")
    if is_dir and path.exists() and not path.is_dir():
        raise UserError(f"{key}={value} is an existing file; give a folder (new or existing).")
    folder = path if is_dir else path.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key}={value} cannot be written: {existing} is not a directory; {fix}.")
    created = first_missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{key}={value} cannot be written: {err.strerror or err} ({err.filename or folder}); "
                        f"{fix}.") from None
    finally:
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
    return path


# ------------------------------------------------------------------ run-directory files

RUN_FILES = (".hydra", "train.log", "metrics.jsonl", "loss.png")
"""What a run writes at the top of its run directory (checkpoints are built under new temporary names)."""


def symlink_refusal(path: Path) -> str:
    """The message for a symbolic link planted where a run writes one of its own files."""
    return (f"{path} is a symbolic link (to {os.readlink(path)}); a run writes only its own files, so it is not "
            f"followed. Remove the link (rm {path}) or pick another run dir.")


def open_run_file(path: str | os.PathLike[str], mode: str = "a") -> IO[Any]:
    """Open a file in a run directory for writing ("a", "w" or "wb") without following a symbolic link:
    a link planted where metrics.jsonl or loss.png belongs could point at any other file. A link is a
    UserError (one `error:` line) and its target stays untouched."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    path = Path(path)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise UserError(symlink_refusal(path)) from None
        raise UserError(f"cannot write {path}: {err.strerror}; check the run directory's permissions and free "
                        f"space.") from None
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
