"""Atomic checkpoints: save, discover, load, retain.

Layout of one checkpoint, ``<run_dir>/checkpoints/step_00000100/``:
``model.safetensors`` + ``optimizer.pt`` (plain runs) or ``dcp/`` (FSDP, sharded), ``trainer.pt``,
``rank_00000.pt`` ... (per-rank data position and RNG), ``meta.json`` and ``COMPLETE`` (written last).
A checkpoint is built as ``step_XXXXXXXX.tmp`` and renamed into place only once complete, so a crash
never leaves something that looks valid. Every file is read without executing pickled code
(``torch.load(weights_only=True)``, safetensors, and a restricted unpickler for DCP metadata).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gpt2.config import ModelConfig, UserError, from_dict
from gpt2.distributed import unwrap_model

FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
DCP_DIR = "dcp"
_STEP_DIR = re.compile(r"^step_(\d{8,})(\.old)?$")


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` returns besides the weights and optimizer state it loads in place."""

    path: Path
    step: int
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any] | None
    """This rank's ``rank_XXXXX.pt``; None when saved at another world size or no file exists for this rank."""
    meta: dict[str, Any]


# ------------------------------------------------------------------ helpers


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool) -> bool:
    """True when every rank passes ok=True (a collective, so also a barrier); plain `ok` without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _io_error(exc: BaseException | None) -> BaseException | None:
    """The OSError behind `exc` (torch.save reports ENOSPC as a RuntimeError raised while handling it)."""
    from safetensors import SafetensorError

    while exc is not None:
        if isinstance(exc, (OSError, SafetensorError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path} is missing; the checkpoint is incomplete or not a gpt2 checkpoint.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign file, or a pickle that tries to run code
        raise UserError(
            f"could not read {path}: it is truncated, corrupt or contains objects other than tensors and "
            f"plain Python values ({_short(e)}); use another checkpoint."
        ) from None


def rank_file(rank: int) -> str:
    """Name of a rank's state file, e.g. rank_00003.pt."""
    return f"rank_{rank:05d}.pt"


# ------------------------------------------------------------------ RNG


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types torch.load(weights_only=True) accepts."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored for the devices present in both."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for i, s in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ------------------------------------------------------------------ discovery


def _checkpoints_dir(root: Path) -> Path:
    root = Path(root)
    return root if root.name == CHECKPOINTS_DIR else root / CHECKPOINTS_DIR


def _is_valid(ckpt: Path) -> bool:
    try:
        read_meta(ckpt)
        return True
    except UserError:
        return False


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under a checkpoints/ dir, oldest first (a ``.old`` one only if its final is gone)."""
    found: dict[int, Path] = {}
    if not ckpt_dir.is_dir():
        return []
    for child in sorted(ckpt_dir.iterdir()):
        m = _STEP_DIR.match(child.name)
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
    if (path / META).exists() or (path / COMPLETE).exists() or _STEP_DIR.match(path.name):
        return path if _is_valid(path) else None
    found = _step_dirs(path / CHECKPOINTS_DIR) or _step_dirs(path)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Like `find_latest`, but a UserError saying what is wrong when nothing valid is there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint path {p} does not exist; give a run dir, its checkpoints/ dir or a step_* dir.")
    found = find_latest(p)
    if found is not None:
        return found
    d = p.parent if p.is_file() else p
    if (d / META).exists() or (d / COMPLETE).exists() or _STEP_DIR.match(d.name):
        read_meta(d)  # raises the precise reason
    raise UserError(
        f"no complete checkpoint under {p} (expected {p}/checkpoints/step_XXXXXXXX/ with a COMPLETE marker); "
        f"interrupted saves (*.tmp or no COMPLETE) are ignored. Check the path or start without resume."
    )


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
        raise UserError(f"could not read {ckpt / META} ({_short(e)}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("step"), int):
        raise UserError(f"{ckpt / META} is not a gpt2 checkpoint meta file (need format={FORMAT} and an int step).")
    return meta


# ------------------------------------------------------------------ model state


def _plain_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def read_model_config(ckpt: Path) -> ModelConfig:
    """The architecture a checkpoint was trained with (config.model in its meta.json)."""
    try:
        return from_dict(ModelConfig, read_meta(ckpt)["config"]["model"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{Path(ckpt) / META} has no config.model section ({err}); is it a gpt2 checkpoint?") from err


def load_weights(path: str | Path) -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    """For inference and export: the checkpoint found at `path` (file, step dir, checkpoints/ or run
    dir), its model config and its full model state dict (from either format, no process group)."""
    ckpt = resolve_checkpoint(path)
    return ckpt, read_model_config(ckpt), load_model_state(ckpt)


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full plain state dict of the model from model.safetensors or dcp/, with no process group needed."""
    ckpt = Path(ckpt)
    path = ckpt / MODEL_FILE
    if (ckpt / DCP_DIR).is_dir() and not path.exists():
        from gpt2.checkpoint_dcp import load_full

        return load_full(ckpt / DCP_DIR, "model")
    if not path.is_file():
        raise UserError(f"{ckpt} has neither {MODEL_FILE} nor {DCP_DIR}/; it is not a gpt2 checkpoint.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:
        raise UserError(f"could not read {path}: it is truncated or corrupt ({_short(e)}); use another checkpoint.") \
            from None
    for alias, key in aliases.items():
        sd[alias] = sd[key]  # re-tie (e.g. lm_head.weight -> transformer.wte.weight)
    return sd


def check_compatible(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: Path) -> None:
    """UserError naming the first missing/unexpected key or shape mismatch between model and checkpoint."""
    for key, shape in expected.items():
        if key not in found:
            raise UserError(f"{source} has no tensor {key!r} that the model needs; was it saved by another model?")
        if tuple(found[key]) != tuple(shape):
            raise UserError(
                f"{source}: {key!r} has shape {tuple(found[key])} in the checkpoint but {tuple(shape)} in the model; "
                f"use the model config the checkpoint was trained with (see its meta.json)."
            )
    extra = [k for k in found if k not in expected]
    if extra:
        raise UserError(f"{source} has tensor {extra[0]!r} that the model does not have; "
                        f"was it saved by another model?")


# ------------------------------------------------------------------ save


def save_checkpoint(root: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, rank_state: dict, config: dict, val_loss: float | None,
                    keep_last: int, keep_best: bool, sharded: bool) -> Path:
    """Write checkpoint `step` under ``root/checkpoints/`` (root = run dir; a dir named checkpoints is used as is).

    Collective when torch.distributed is initialized: every rank calls it. Returns the final directory.
    On any failure the partial ``.tmp`` dir is removed and earlier checkpoints are untouched.
    """
    rank, world = _rank_world()
    started = time.time()
    ckpt_dir = _checkpoints_dir(root)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"{final.name}.tmp"
    loss = float(val_loss) if val_loss is not None and math.isfinite(val_loss) else None
    meta = {"format": FORMAT, "step": int(step), "val_loss": loss, "config": config, "world_size": world,
            "sharded": bool(sharded), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    error: BaseException | None = None

    def phase(fn) -> None:  # run fn, then agree across ranks; cleans up and raises on any failure
        nonlocal error
        if error is None:
            try:
                fn()
            except Exception as e:
                error = e
        if not _all_ok(error is None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            io_error = _io_error(error)
            if error is None or io_error is not None:
                why = _short(io_error) if io_error is not None else "another rank failed to write its part"
                raise UserError(f"could not write checkpoint to {final}: {why}; earlier checkpoints are intact.") \
                    from error
            raise error

    def prepare() -> None:
        json.dumps(meta)  # fail early on a config that is not JSON
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def write() -> None:
        if sharded:
            from gpt2.checkpoint_dcp import save_sharded

            save_sharded(tmp / DCP_DIR, model, optimizer)
        if rank == 0:
            if not sharded:
                tensors, aliases = _plain_state(model)
                meta["tied"] = aliases
                save_file(tensors, tmp / MODEL_FILE, metadata={"format": "pt", "aliases": json.dumps(aliases)})
                _fsync_path(tmp / MODEL_FILE)
                _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            _torch_save(trainer_state, tmp / TRAINER_FILE)
        _torch_save(rank_state, tmp / rank_file(rank))

    def publish() -> None:
        if rank != 0:
            return
        if sharded:
            _fsync_path(tmp / DCP_DIR)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _fsync_path(tmp / META)
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if final.exists():  # re-save of the same step: move the old one aside, never leave neither
            old = ckpt_dir / f"{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync_path(ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(ckpt_dir)

    phase(prepare)
    phase(write)
    phase(publish)
    if rank == 0:
        apply_retention(ckpt_dir, keep_last=keep_last, keep_best=keep_best, newest=final, older_than=started)
    return final


def apply_retention(ckpt_dir: Path, *, keep_last: int, keep_best: bool, newest: Path | None = None,
                    older_than: float | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (keeping the best by val_loss when keep_best,
    and `newest`), and interrupted ``*.tmp`` / ``*.old`` leftovers last modified before `older_than`."""
    found = _step_dirs(ckpt_dir)
    keep = {p for _, p in found[-max(keep_last, 1):]}
    if newest is not None:
        keep.add(newest)
    if keep_best:
        scored = [(read_meta(p)["val_loss"], s, p) for s, p in found]
        scored = [x for x in scored if isinstance(x[0], (int, float))]
        if scored:
            keep.add(min(scored, key=lambda x: (x[0], -x[1]))[2])
    removed = [p for _, p in found if p not in keep]
    for child in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        if child.name.endswith((".tmp", ".old")) and _STEP_DIR.match(child.name.removesuffix(".tmp")) \
                and child not in keep and (older_than is None or child.stat().st_mtime < older_than):
            removed.append(child)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ------------------------------------------------------------------ load


def load_checkpoint(ckpt: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    sharded: bool) -> LoadedCheckpoint:
    """Load weights (and optimizer state when given) in place; return step, trainer and this rank's state.

    ``rank_state`` is None when the checkpoint was written at another world size (per-rank data positions and
    RNG streams do not carry over) or has no file for this rank.

    Collective for sharded checkpoints (every rank calls it); plain checkpoints are read by each rank.
    """
    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    rank, world = _rank_world()
    bare = unwrap_model(model)
    if meta.get("sharded") and (ckpt / DCP_DIR).is_dir():
        from gpt2.checkpoint_dcp import load_sharded

        load_sharded(ckpt / DCP_DIR, bare, optimizer)
    else:
        state = load_model_state(ckpt)
        check_compatible({k: tuple(v.shape) for k, v in bare.state_dict().items()},
                         {k: tuple(v.shape) for k, v in state.items()}, ckpt / MODEL_FILE)
        if sharded:
            from gpt2.checkpoint_dcp import load_full_into_sharded

            load_full_into_sharded(bare, state)
        else:
            bare.load_state_dict(state)
        if optimizer is not None:
            if sharded:
                raise UserError(f"{ckpt} was saved without FSDP; its optimizer state cannot be resumed under "
                                f"distributed=fsdp. Resume with distributed=ddp or none, or load weights only.")
            opt_state = _torch_load(ckpt / OPTIMIZER_FILE)
            try:
                optimizer.load_state_dict(opt_state)
            except (ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"{ckpt / OPTIMIZER_FILE} does not match the optimizer ({_short(e)}); resume with "
                                f"the optimizer settings the checkpoint was trained with.") from None
    trainer_state = _torch_load(ckpt / TRAINER_FILE)
    if not isinstance(trainer_state, dict):
        raise UserError(f"{ckpt / TRAINER_FILE} holds a {type(trainer_state).__name__}, not a dict.")
    rpath = ckpt / rank_file(rank)
    same_world = meta.get("world_size") == world
    rank_state = _torch_load(rpath) if same_world and rpath.exists() else None
    return LoadedCheckpoint(path=ckpt, step=meta["step"], trainer_state=trainer_state, rank_state=rank_state,
                            meta=meta)

