"""`Checkpoint`: a checkpoint argument (run dir, checkpoints/ dir, step dir or a file in one) opened once.
It holds the path and meta.json (read once, in the current format) and gives the model config, the training
config, the saved run plan, the tokenizer and the weights on demand. `find_checkpoint` is the one function
that turns what a user typed into a `Checkpoint`; generation, evaluation, export and resume all use it.
`load_for_inference` is the one way generation and evaluation get a model and its tokenizer, from a
checkpoint or a pretrained Hugging Face model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch

from gpt2.checkpoint.format import CHECKPOINTS_DIR, META, RESUME_FIX, is_checkpoint_dir, load_model_state, read_meta
from gpt2.checkpoint.store import complete_checkpoints
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

    @property
    def plan(self) -> dict[str, Any]:
        """The run plan the checkpoint's run trained with (gpt2.train.plan.RunPlan as saved): the values derived
        at its start-up, e.g. the micro_batch_size that micro_batch_size=auto chose."""
        return self.meta["plan"]

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


def _newest(where: Path) -> Checkpoint | None:
    """The newest valid checkpoint in `where` (a run dir, its checkpoints/ dir or a checkpoint dir)."""
    if is_checkpoint_dir(where):
        try:
            return Checkpoint(where, read_meta(where))
        except UserError:
            return None
    for ckpt_dir in (where / CHECKPOINTS_DIR, where):
        found = next(complete_checkpoints(ckpt_dir), None)
        if found is not None:
            return Checkpoint(*found)
    return None


@overload
def find_checkpoint(where: str | Path, fix: str = ..., *, required: Literal[True] = ...) -> Checkpoint: ...


@overload
def find_checkpoint(where: str | Path, fix: str = ..., *, required: bool) -> Checkpoint | None: ...


def find_checkpoint(where: str | Path, fix: str = RESUME_FIX, *, required: bool = True) -> Checkpoint | None:
    """The newest complete checkpoint at what a user typed: a run dir, its checkpoints/ dir, a step_* dir or a
    file in one. When there is none: None if not `required`, else a UserError saying what is wrong and ending
    with `fix` (the caller's advice)."""
    path = Path(where).expanduser()
    folder = path.parent if path.is_file() else path
    found = _newest(folder) if folder.is_dir() else None
    if found is not None or not required:
        return found
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist; give a run dir, its checkpoints/ dir or a step_* "
                        f"dir.")
    if is_checkpoint_dir(folder):
        read_meta(folder)  # raises the precise reason
    raise UserError(
        f"no complete checkpoint under {path} (expected {path}/checkpoints/step_XXXXXXXX/ with a COMPLETE marker); "
        f"interrupted saves (*.tmp or no COMPLETE) are ignored. {fix}"
    )


CHECKPOINT_FIX = ("Check the path: checkpoint= takes a training run dir, its checkpoints/ dir or a step_* dir; "
                  "for a Hugging Face model use pretrained=NAME|DIR instead.")


def load_for_inference(checkpoint: str | None, pretrained: str | None, vocab_path: str | None = None,
                       cache_dir: str | None = None) -> tuple[GPT, AnyTokenizer, Checkpoint | None]:
    """The model and tokenizer to generate or evaluate with: a training checkpoint's (and the opened
    checkpoint), or a pretrained Hugging Face name/directory's (and None)."""
    if checkpoint is not None:
        ckpt = find_checkpoint(checkpoint, CHECKPOINT_FIX)
        tokenizer = ckpt.tokenizer(vocab_path, cache_dir)  # before the weights: a wrong vocabulary file fails at once
        return ckpt.model(), tokenizer, ckpt
    if pretrained is None:
        raise UserError("give checkpoint=PATH or pretrained=NAME|DIR.")
    from gpt2.model.hf import load_pretrained

    tokenizer = from_pretrained_dir(pretrained, vocab_path, cache_dir)
    return load_pretrained(pretrained), tokenizer, None
