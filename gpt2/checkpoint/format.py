"""The on-disk checkpoint format: file names, meta.json, durable writes and safe reads of the files in a
checkpoint, the model weights read without a process group, and the one place that reads older formats
(`upgrade` for meta.json, `upgrade_trainer_state` for trainer.pt and the data position).

Layout of one checkpoint, ``<run_dir>/checkpoints/step_00000100/``: ``model.safetensors`` +
``optimizer.pt`` (plain runs) or ``dcp/`` (FSDP, sharded), ``trainer.pt`` (the global training state,
data position included), ``rank_00000.pt`` ... (each rank's RNG streams), extra files such as our BPE's
``tokenizer.json``, ``meta.json`` and ``COMPLETE`` (written last). Every file is read without executing
pickled code (``torch.load(weights_only=True)``, safetensors, and a restricted unpickler for DCP metadata).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from gpt2.config import MOVED_KEYS
from gpt2.errors import UserError
from gpt2.runtime.distributed import unwrap_model
from gpt2.tokenizers.factory import GPT2_RECORD

FORMAT = 2
"""2: meta.json always holds `plan.model` and `tokenizer`; trainer.pt holds the global data position.
Older formats are brought up to date when read (`upgrade`, `upgrade_trainer_state`)."""
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
DCP_DIR = "dcp"
STEP_DIR = re.compile(r"^step_(\d{8,})(\.old)?$")
LEFTOVER = re.compile(r"^step_\d{8,}(\.old|\.tmp|\.old\.deleting|\.tmp\.deleting|\.deleting)$")
RESUME_FIX = "Check the path or start without resume."


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """Name of a rank's state file, e.g. rank_00003.pt."""
    return f"rank_{rank:05d}.pt"


def is_checkpoint_dir(path: Path) -> bool:
    """`path` is (or was meant to be) one checkpoint: a step_* dir, or a dir holding meta.json or COMPLETE."""
    return (path / META).exists() or (path / COMPLETE).exists() or bool(STEP_DIR.match(path.name))


def checkpoints_dir(root: str | Path) -> Path:
    """``root/checkpoints`` for a run dir; a dir already named checkpoints as is."""
    root = Path(root)
    return root if root.name == CHECKPOINTS_DIR else root / CHECKPOINTS_DIR


# ------------------------------------------------------------------ files inside a checkpoint


def torch_save(obj: Any, path: Path) -> None:
    """torch.save to `path` inside a checkpoint being built, flushed to disk (the folder is published whole)."""
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


# ------------------------------------------------------------------ older formats (the one place that reads them)


def _moved_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A saved training config with the keys of earlier versions at their new places (config.MOVED_KEYS)."""
    config = copy.deepcopy(config)
    for old, new in MOVED_KEYS.items():
        *old_parents, old_leaf = old.split(".")
        parent = config
        for part in old_parents:
            parent = parent.get(part) if isinstance(parent.get(part), dict) else {}
        if old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        *new_parents, new_leaf = new.split(".")
        target = config
        for part in new_parents:
            target = target.setdefault(part, {})
        if target.get(new_leaf) is None:
            target[new_leaf] = value
    return config


def upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json of any earlier format in the current one. Format 1 could lack the run plan (the model was
    then `config.model`, the micro-batch `config.micro_batch_size` unless it was auto) and the tokenizer record
    (it was then GPT-2's). A saved config of any format has the keys that moved since (eval_interval ->
    eval.interval, ...) at their new places."""
    if meta.get("format") == 1:
        config = meta.get("config") or {}
        plan = dict(meta.get("plan") or {"model": config.get("model") or {}})
        micro = config.get("micro_batch_size")
        plan.setdefault("micro_batch_size", micro if isinstance(micro, int) else None)
        meta = {**meta, "format": 2, "plan": plan, "tokenizer": meta.get("tokenizer") or dict(GPT2_RECORD)}
    if isinstance(meta.get("config"), dict):
        meta = {**meta, "config": _moved_keys(meta["config"])}
    return meta


def upgrade_trainer_state(trainer_state: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """trainer.pt of an earlier format in the current one. Format 1 kept the data position in each rank's file,
    as (epoch, position) in that rank's share ``order[rank::world_size]`` of the epoch's windows (the same pair
    on every rank); it becomes the global position the loader resumes from: the windows all ranks consumed."""
    if "train_loader" not in trainer_state and (ckpt / rank_file(0)).is_file():
        rank0 = torch_load(ckpt / rank_file(0))
        if isinstance(rank0, dict) and "train_loader" in rank0:
            trainer_state = {**trainer_state, "train_loader": rank0["train_loader"]}
    loader = trainer_state.get("train_loader")
    if isinstance(loader, dict) and "consumed" not in loader and "position" in loader:
        try:
            consumed = int(loader["epoch"]) * int(loader["n_windows"]) + int(loader["position"]) * int(
                loader["world_size"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{ckpt / TRAINER_FILE}: the data position of this older checkpoint lacks {err}; it "
                            f"cannot be resumed exactly. Start a new run from its weights (init) instead.") from None
        trainer_state = {**trainer_state, "train_loader": {**loader, "consumed": consumed}}
    return trainer_state


# ------------------------------------------------------------------ meta.json


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint, in the current format; UserError when COMPLETE or a readable
    meta.json is missing."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"{ckpt} is not a checkpoint directory (expected a step_XXXXXXXX/ dir).")
    if not (ckpt / COMPLETE).is_file():
        raise UserError(f"{ckpt / COMPLETE} is missing: the save of {ckpt} never finished; use an earlier checkpoint.")
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {ckpt / META} ({short_error(e)}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT) or not isinstance(meta.get("step"), int):
        raise UserError(f"{ckpt / META} is not a gpt2 checkpoint meta file (need format <= {FORMAT} and an int "
                        f"step).")
    return upgrade(meta)


# ------------------------------------------------------------------ model weights


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
