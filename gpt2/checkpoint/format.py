"""The on-disk checkpoint format: file names, durable writes, safe reads, discovery, and deletion.

Layout of one checkpoint, ``<run_dir>/checkpoints/step_00000100/``:
``model.safetensors`` + ``optimizer.pt`` (plain runs) or ``dcp/`` (FSDP, sharded), ``trainer.pt``,
``rank_00000.pt`` ... (per-rank data position and RNG), ``meta.json`` and ``COMPLETE`` (written last).
A checkpoint is built as ``step_XXXXXXXX.tmp`` and renamed into place only once complete; one is
deleted by first renaming it to ``step_XXXXXXXX.deleting``. So a crash never leaves a ``step_*`` dir
that looks valid but is not. Every file is read without executing pickled code
(``torch.load(weights_only=True)``, safetensors, and a restricted unpickler for DCP metadata).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from gpt2.config import ModelConfig, UserError, from_dict
from gpt2.runtime.distributed import unwrap_model

FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
DCP_DIR = "dcp"
STEP_DIR = re.compile(r"^step_(\d{8,})(\.old)?$")
LEFTOVER = re.compile(r"^step_\d{8,}(\.old|\.tmp|\.old\.deleting|\.tmp\.deleting|\.deleting)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """Name of a rank's state file, e.g. rank_00003.pt."""
    return f"rank_{rank:05d}.pt"


def checkpoints_dir(root: str | Path) -> Path:
    """``root/checkpoints`` for a run dir; a dir already named checkpoints as is."""
    root = Path(root)
    return root if root.name == CHECKPOINTS_DIR else root / CHECKPOINTS_DIR


# ------------------------------------------------------------------ durable writes, safe reads


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def io_error(exc: BaseException | None) -> BaseException | None:
    """The OSError behind `exc` (torch.save reports ENOSPC as a RuntimeError raised while handling it)."""
    from safetensors import SafetensorError

    while exc is not None:
        if isinstance(exc, (OSError, SafetensorError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def torch_load(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path} is missing; the checkpoint is incomplete or not a gpt2 checkpoint.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign file, or a pickle that tries to run code
        raise UserError(
            f"could not read {path}: it is truncated, corrupt or contains objects other than tensors and "
            f"plain Python values ({short_error(e)}); use another checkpoint."
        ) from None


# ------------------------------------------------------------------ model state


def plain_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU contiguous copy of the bare state dict without aliased entries, and {alias: kept key}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in unwrap_model(model).state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    return tensors, aliases


# ------------------------------------------------------------------ discovery


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint; UserError when COMPLETE or a readable meta.json is missing."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"{ckpt} is not a checkpoint directory (expected a step_XXXXXXXX/ dir).")
    if not (ckpt / COMPLETE).is_file():
        raise UserError(f"{ckpt / COMPLETE} is missing: the save of {ckpt} never finished; use an earlier checkpoint.")
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {ckpt / META} ({short_error(e)}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("step"), int):
        raise UserError(f"{ckpt / META} is not a gpt2 checkpoint meta file (need format={FORMAT} and an int step).")
    return meta


def _is_valid(ckpt: Path) -> bool:
    try:
        read_meta(ckpt)
        return True
    except UserError:
        return False


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under a checkpoints/ dir, oldest first (a ``.old`` one only if its final is gone)."""
    found: dict[int, Path] = {}
    if not ckpt_dir.is_dir():
        return []
    for child in sorted(ckpt_dir.iterdir()):
        m = STEP_DIR.match(child.name)
        if not m or not child.is_dir() or not _is_valid(child):
            continue
        step = int(m.group(1))
        if m.group(2) is None or step not in found:
            found[step] = child
    return sorted(found.items())


def find_latest(path: str | Path) -> Path | None:
    """Newest complete checkpoint in a run dir, its checkpoints/ dir, or the checkpoint dir itself (or a file in it)."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        return None
    if (path / META).exists() or (path / COMPLETE).exists() or STEP_DIR.match(path.name):
        return path if _is_valid(path) else None
    found = step_dirs(path / CHECKPOINTS_DIR) or step_dirs(path)
    return found[-1][1] if found else None


RESUME_FIX = "Check the path or start without resume."


def resolve_checkpoint(path: str | Path, fix: str = RESUME_FIX) -> Path:
    """Like `find_latest`, but a UserError saying what is wrong (and `fix`, the caller's advice) when
    nothing valid is there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint path {p} does not exist; give a run dir, its checkpoints/ dir or a step_* dir.")
    found = find_latest(p)
    if found is not None:
        return found
    d = p.parent if p.is_file() else p
    if (d / META).exists() or (d / COMPLETE).exists() or STEP_DIR.match(d.name):
        read_meta(d)  # raises the precise reason
    raise UserError(
        f"no complete checkpoint under {p} (expected {p}/checkpoints/step_XXXXXXXX/ with a COMPLETE marker); "
        f"interrupted saves (*.tmp or no COMPLETE) are ignored. {fix}"
    )


# ------------------------------------------------------------------ weights without a process group


def read_model_config(ckpt: Path) -> ModelConfig:
    """The architecture a checkpoint was trained with (plan.model in its meta.json; config.model in
    checkpoints from before run plans)."""
    meta = read_meta(ckpt)
    try:
        return from_dict(ModelConfig, (meta.get("plan") or meta["config"])["model"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{Path(ckpt) / META} has no config.model section ({err}); is it a gpt2 checkpoint?") from err


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full plain state dict of the model from model.safetensors or dcp/, with no process group needed."""
    ckpt = Path(ckpt)
    path = ckpt / MODEL_FILE
    if (ckpt / DCP_DIR).is_dir() and not path.exists():
        from gpt2.checkpoint.dcp import load_full

        return load_full(ckpt / DCP_DIR, "model")
    if not path.is_file():
        raise UserError(f"{ckpt} has neither {MODEL_FILE} nor {DCP_DIR}/; it is not a gpt2 checkpoint.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:
        raise UserError(f"could not read {path}: it is truncated or corrupt ({short_error(e)}); "
                        f"use another checkpoint.") from None
    if not isinstance(aliases, dict):
        raise UserError(f"{path}: its metadata 'aliases' is not a mapping; the file is damaged, "
                        f"use another checkpoint.")
    for alias, key in aliases.items():
        if key not in sd:
            raise UserError(f"{path}: its metadata ties {alias!r} to {key!r}, but the file has no tensor {key!r}; "
                            f"the file is damaged, use another checkpoint.")
        sd[alias] = sd[key]  # re-tie (e.g. lm_head.weight -> transformer.wte.weight)
    return sd


def load_weights(path: str | Path, fix: str = RESUME_FIX) -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    """For inference and export: the checkpoint found at `path` (file, step dir, checkpoints/ or run
    dir), its model config and its full model state dict (from either format, no process group).
    `fix` is the advice given when no checkpoint is there."""
    ckpt = resolve_checkpoint(path, fix)
    return ckpt, read_model_config(ckpt), load_model_state(ckpt)


# ------------------------------------------------------------------ deletion


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint dir. One that discovery would accept (``step_X``, ``step_X.old``) is first
    retired atomically (renamed to ``<name>.deleting``, which discovery ignores), so a kill mid-way never
    leaves a ``step_*`` dir with COMPLETE but missing files; `remove_leftovers` finishes the job later."""
    if not path.exists():
        return
    if STEP_DIR.match(path.name):
        doomed = path.with_name(path.name + ".deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        fsync_path(path.parent)
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


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
