"""`Checkpoint`: a checkpoint argument (run dir, checkpoints/ dir, step dir or a file in one) opened once.
It holds the path and meta.json (read once, in the current format) and gives the model config, the training
config, the tokenizer and the weights on demand; generation, evaluation, export and resume all use it.
`load_for_inference` is the one way generation and evaluation get a model and its tokenizer, from a
checkpoint or a pretrained Hugging Face model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2.checkpoint.format import META, RESUME_FIX, load_model_state
from gpt2.checkpoint.store import resolve_checkpoint
from gpt2.config import ModelConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.model.gpt import GPT, model_from_state_dict
from gpt2.tokenizers.factory import AnyTokenizer, from_pretrained_dir, from_record
from gpt2.utils.serialize import from_dict


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint: where it is and what its meta.json says."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, where: str | Path, fix: str = RESUME_FIX) -> Checkpoint:
        """The newest complete checkpoint at `where`; UserError (ending with `fix`, the caller's advice) when
        there is none."""
        return cls(*resolve_checkpoint(where, fix))

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @functools.cached_property
    def model_config(self) -> ModelConfig:
        """The architecture the checkpoint was trained with (its run plan's model)."""
        try:
            return from_dict(ModelConfig, self.meta["plan"]["model"])
        except (KeyError, TypeError) as err:
            raise UserError(f"{self.path / META} has no plan.model section ({err}); is it a gpt2 checkpoint?") from err

    @functools.cached_property
    def train_config(self) -> TrainConfig:
        """The training config the run was launched with (as saved in meta.json)."""
        return from_dict(TrainConfig, self.meta.get("config") or {})

    @property
    def tokenizer_record(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    def tokenizer(self, vocab_path: str | None = None, cache_dir: str | None = None) -> AnyTokenizer:
        """The tokenizer the model's ids belong to: our BPE's tokenizer.json from the checkpoint, or GPT-2's
        (`vocab_path`, else the training run's vocabulary file, else found in the caches)."""
        data = self.train_config.data
        if self.tokenizer_record.get("kind") != "hf":
            vocab_path = vocab_path or self.train_config.tokenizer.path
        return from_record(self.tokenizer_record, self.path, vocab_path, cache_dir or data.cache_dir)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict from either format (model.safetensors or dcp/), no process group needed."""
        return load_model_state(self.path)

    def model(self) -> GPT:
        """A GPT with the checkpoint's architecture and weights, on the CPU."""
        return model_from_state_dict(self.model_config, self.state_dict(), source=str(self.path))


CHECKPOINT_FIX = ("Check the path: checkpoint= takes a training run dir, its checkpoints/ dir or a step_* dir; "
                  "for a Hugging Face model use pretrained=NAME|DIR instead.")


def load_for_inference(checkpoint: str | None, pretrained: str | None, vocab_path: str | None = None,
                       cache_dir: str | None = None) -> tuple[GPT, AnyTokenizer, Checkpoint | None]:
    """The model and tokenizer to generate or evaluate with: a training checkpoint's (and the opened
    checkpoint), or a pretrained Hugging Face name/directory's (and None)."""
    if checkpoint is not None:
        ckpt = Checkpoint.open(checkpoint, CHECKPOINT_FIX)
        tokenizer = ckpt.tokenizer(vocab_path, cache_dir)  # before the weights: a wrong vocabulary file fails at once
        return ckpt.model(), tokenizer, ckpt
    if pretrained is None:
        raise UserError("give checkpoint=PATH or pretrained=NAME|DIR.")
    from gpt2.model.hf import load_pretrained

    tokenizer = from_pretrained_dir(pretrained, vocab_path, cache_dir)
    return load_pretrained(pretrained), tokenizer, None
