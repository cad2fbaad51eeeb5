"""Model presets. gpt2/conf/model/<name>.yaml is the one source: Hydra composes it for training, and
everything else (generation, pretrained import, benchmarks, tests) reads the same files here."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import yaml

from gpt2.config import ModelConfig
from gpt2.errors import ConfigError
from gpt2.utils.serialize import from_dict

MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
"""Presets that load_pretrained can fetch from the Hugging Face Hub (their weights exist there)."""


@functools.cache
def _presets() -> dict[str, ModelConfig]:
    out: dict[str, ModelConfig] = {}
    for path in sorted(MODEL_DIR.glob("*.yaml"), key=lambda p: p.stem):
        raw = yaml.safe_load(path.read_text()) or {}
        raw.pop("defaults", None)
        out[path.stem] = from_dict(ModelConfig, raw)
    return out


def preset_names() -> list[str]:
    return list(_presets())


GPT2_VOCAB = 50257
"""The vocabulary a preset gets outside a training run (its YAML says null: follow the tokenizer)."""


def model_preset(name: str, vocab_size: int | None = GPT2_VOCAB) -> ModelConfig:
    """The ModelConfig of gpt2/conf/model/<name>.yaml (a fresh copy), its null vocab_size set to `vocab_size`
    (GPT-2's by default; None keeps it null, as Hydra composes it); ConfigError listing the presets on a miss."""
    presets = _presets()
    if name not in presets:
        raise ConfigError(f"{name!r} is not a known model; choose one of {', '.join(presets)}.")
    preset = presets[name]
    return replace(preset, vocab_size=preset.vocab_size if preset.vocab_size is not None else vocab_size)


def preset_for(n_layer: int, n_head: int, n_embd: int) -> str | None:
    """The name of the preset with this block count, head count and width, if any."""
    return next((name for name, p in _presets().items()
                 if (p.n_layer, p.n_head, p.n_embd) == (n_layer, n_head, n_embd)), None)
