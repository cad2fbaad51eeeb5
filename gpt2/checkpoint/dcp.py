"""Sharded (FSDP2) checkpoints with torch.distributed.checkpoint, read without running pickled code.

DCP pickles its ``.metadata`` file and ``torch.load``s non-tensor values with ``weights_only=False``;
the reader and planners here replace both with allow-listed loading, so a planted file cannot execute code.
Used by gpt2.checkpoint.io and gpt2.checkpoint.format; the model passed in is the bare (FSDP-managed) module.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from gpt2.errors import UserError
from gpt2.model.gpt import check_state_shapes

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
              "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
     ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing any global outside DCP's own metadata classes and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with an allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeBytesMixin:
    """Non-tensor values (lr, betas, param names) loaded with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:  # type: ignore[attr-defined]
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)  # type: ignore
        else:
            self.state_dict[read_item.dest_index.fqn] = obj  # type: ignore[attr-defined]


class _SafeLoadPlanner(_SafeBytesMixin, DefaultLoadPlanner):
    pass


class _SafeEmptyPlanner(_SafeBytesMixin, _EmptyStateDictLoadPlanner):
    pass


def _fail(path: Path, exc: BaseException) -> UserError:
    lines = str(exc).strip().splitlines()
    detail = next((ln for ln in lines if "Error" in ln), lines[0] if lines else "")[:300]
    return UserError(f"could not read the sharded checkpoint {path}: it is truncated, corrupt or not a "
                     f"torch.distributed.checkpoint dir ({type(exc).__name__}: {detail}); use another checkpoint.")


def read_dcp_metadata(path: Path) -> Metadata:
    """The checkpoint's DCP metadata, read safely; UserError when missing or corrupt."""
    try:
        return SafeFileSystemReader(path).read_metadata()
    except Exception as e:
        raise _fail(path / ".metadata", e) from None


def tensor_shapes(md: Metadata, group: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the tensors stored under top-level `group` ("model" or "optim")."""
    out: dict[str, tuple[int, ...]] = {}
    for flat, meta in md.state_dict_metadata.items():
        where = (md.planner_data or {}).get(flat, (flat,))
        if where[0] == group and len(where) == 2 and isinstance(meta, TensorStorageMetadata):
            out[str(where[1])] = tuple(meta.size)
    return out


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of model + optimizer to `path`."""
    msd, osd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": msd, "optim": osd}, storage_writer=FileSystemWriter(path))
    except CheckpointException as e:  # a BaseException; turn it into the OSError the caller reports
        raise OSError(f"torch.distributed.checkpoint could not save: {str(e).strip()[:300]}") from None


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: load model (+ optimizer) shards, resharding to the current world size."""
    md = read_dcp_metadata(path)
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    check_state_shapes({k: tuple(v.shape) for k, v in state["model"].items()}, tensor_shapes(md, "model"),
                       str(path))
    try:
        with warnings.catch_warnings():  # no process group = a deliberate single-process load
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=_SafeLoadPlanner())
    except (Exception, CheckpointException) as e:
        raise _fail(path, e) from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full(path: Path, group: str = "model") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of `group` in this process only; no process group needed."""
    read_dcp_metadata(path)
    sd: dict[str, Any] = {}
    try:
        _load_state_dict(sd, storage_reader=SafeFileSystemReader(path), planner=_SafeEmptyPlanner(keys={group}),
                         no_dist=True)
    except (Exception, CheckpointException) as e:
        raise _fail(path, e) from None
    return sd.get(group, {})


def load_full_into_sharded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (present on every rank) into an FSDP-sharded model."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
