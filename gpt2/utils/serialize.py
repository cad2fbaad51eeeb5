"""Config dataclasses as plain dicts and back: what logs, meta.json files and W&B hold."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list copy of a config dataclass (for logging and checkpoints)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from `to_dict` output, ignoring unknown keys."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = f.default_factory() if callable(f.default_factory) else None
        if is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        kwargs[f.name] = value
    return cls(**kwargs)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: leaf value} of a nested dict (a list is one leaf)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
