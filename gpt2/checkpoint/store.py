"""The checkpoints of a run directory: listing the complete ones (gpt2.checkpoint.handle.find_checkpoint picks
the newest), retention, deletion, and the start-up clean-up of interrupted saves.

A checkpoint is built as ``step_XXXXXXXX.tmp`` and renamed into place only once complete; one is deleted by
first renaming it to ``step_XXXXXXXX.deleting``. So a crash never leaves a ``step_*`` dir that looks valid
but is not. Discovery lists candidates by name and COMPLETE marker, and reads meta.json only of the one it
returns (or of a newer one it skips because that meta.json is damaged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2.checkpoint.format import COMPLETE, LEFTOVER, STEP_DIR, checkpoints_dir, read_meta
from gpt2.errors import UserError
from gpt2.utils.fs import remove_tree, rename_durably

log = logging.getLogger("gpt2")


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints under a checkpoints/ dir that finished saving (COMPLETE present), oldest first (a ``.old``
    one only if its final is gone). Their meta.json is not read here."""
    found: dict[int, Path] = {}
    if not ckpt_dir.is_dir():
        return []
    for child in sorted(ckpt_dir.iterdir()):
        m = STEP_DIR.match(child.name)
        if not m or not child.is_dir() or not (child / COMPLETE).is_file():
            continue
        step = int(m.group(1))
        if m.group(2) is None or step not in found:
            found[step] = child
    return sorted(found.items())


def complete_checkpoints(ckpt_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, meta) of every valid checkpoint under a checkpoints/ dir, newest first, meta.json read lazily."""
    for _, path in reversed(step_dirs(ckpt_dir)):
        try:
            yield path, read_meta(path)
        except UserError:  # damaged meta.json: an earlier checkpoint is the newest valid one
            continue


# ------------------------------------------------------------------ retention and deletion


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint dir. One that discovery would accept (``step_X``, ``step_X.old``) is first retired
    atomically (renamed to ``<name>.deleting``, which discovery ignores), so a kill mid-way never leaves a
    ``step_*`` dir with COMPLETE but missing files; `remove_leftovers` finishes the job later. Only folders
    are deleted: a file under a checkpoint's name is not ours and stays."""
    if not path.is_dir() or path.is_symlink():
        return
    if STEP_DIR.match(path.name):
        doomed = path.with_name(path.name + ".deleting")
        remove_tree(doomed)
        rename_durably(path, doomed)
        path = doomed
    remove_tree(path)


def remove_leftovers(ckpt_dir: Path, older_than: float | None = None,
                     keep: frozenset[Path] = frozenset()) -> list[Path]:
    """Delete interrupted saves (``*.tmp``), replaced ``*.old`` dirs and half-deleted ``*.deleting`` dirs:
    ``.deleting`` ones always, the others when last modified before `older_than` (if given) and not in `keep`
    (a ``.old`` dir is a live checkpoint while its replacement is missing)."""
    removed = []
    for child in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if not LEFTOVER.match(child.name) or child in keep:
            continue
        if child.name.endswith(".deleting") or older_than is None or child.stat().st_mtime < older_than:
            delete_checkpoint(child)
            removed.append(child)
    return removed


def remove_interrupted(run_dir: str | Path) -> list[Path]:
    """The start-up clean-up of a run dir's checkpoints/ (rank 0, before this process saves anything): delete
    what interrupted saves and deletions of an earlier process left behind, keeping a ``.old`` dir that is still
    the newest copy of its step. Logs each removal; returns them."""
    ckpt_dir = checkpoints_dir(run_dir)
    removed = remove_leftovers(ckpt_dir, keep=frozenset(p for _, p in step_dirs(ckpt_dir)))
    for p in removed:
        log.info("removed the leftover %s of an interrupted save or deletion", p)
    return removed


def apply_retention(ckpt_dir: Path, *, keep_last: int, keep_best: bool, newest: Path | None = None,
                    older_than: float | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (keeping the best by val_loss when keep_best,
    and `newest`), and interrupted ``*.tmp`` / ``*.old`` leftovers last modified before `older_than`.
    Each is retired atomically first (see `delete_checkpoint`)."""
    found = []  # (step, path, val_loss) of the valid ones: a checkpoint with a damaged meta.json is left alone
    for step, path in step_dirs(ckpt_dir):
        try:
            found.append((step, path, read_meta(path)["val_loss"]))
        except UserError:
            continue
    keep = {p for _, p, _ in found[-max(keep_last, 1):]}
    if newest is not None:
        keep.add(newest)
    scored = [(loss, s, p) for s, p, loss in found if isinstance(loss, (int, float))]
    if keep_best and scored:
        keep.add(min(scored, key=lambda x: (x[0], -x[1]))[2])
    removed = [p for _, p, _ in found if p not in keep]
    for p in removed:
        delete_checkpoint(p)
    return removed + remove_leftovers(ckpt_dir, older_than=older_than, keep=frozenset(keep))
