"""Export a training checkpoint as one GGUF file for llama.cpp (`python run_export.py CHECKPOINT OUT.gguf`).

The file holds llama.cpp's `gpt2` architecture (gpt2.model.gguf_tensors) and the checkpoint's tokenizer in its
metadata (gpt2.tokenizers.gguf_vocab), written with llama.cpp's own `gguf` package. Weights are fp32 (the logits
match ours to float rounding), or f16 for 2-D weights (`dtype="f16"`, half the size; norms and biases stay fp32).
The file is written under a temporary name beside OUT.gguf and moved into place, so a failed export leaves no
half-written file; OUT.gguf must not lie inside a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from gpt2.checkpoint.export import CHECKPOINT_FIX
from gpt2.checkpoint.format import CHECKPOINTS_DIR, is_checkpoint_dir
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.model.gguf_tensors import GGUF_ARCH, check_gguf_exportable, gguf_hparams, gguf_tensors
from gpt2.tokenizers.gguf_vocab import GGUFVocab, gguf_vocab
from gpt2.utils.fs import check_writable, move_into_place, temp_name

GGUF_DTYPES = ("f32", "f16")


def check_gguf_target(out_file: str | Path) -> Path:
    """The GGUF file to write, as an absolute path; UserError unless it ends with .gguf, lies outside every
    checkpoint, and its folder can be written (checked by writing)."""
    out = Path(out_file).expanduser().absolute()
    if out.suffix != ".gguf":
        raise UserError(f"{out_file} does not end with .gguf; name the GGUF file, e.g. {out.with_suffix('.gguf')}.")
    inside = next((d for d in out.parents if d.is_dir() and (d.name == CHECKPOINTS_DIR or is_checkpoint_dir(d))),
                  None)
    if inside is not None:
        raise UserError(f"export target {out_file} lies inside a training checkpoint ({inside}); write it outside "
                        f"checkpoints/, e.g. {Path(out_file).name}.")
    return check_writable("export target", out, fix="give a .gguf path in a writable folder")


def write_gguf(out: Path, cfg: ModelConfig, vocab: GGUFVocab, tensors: dict[str, Tensor], dtype: str,
               name: str) -> None:
    """Write the GGUF file `out` (through a temporary file moved into place)."""
    import gguf
    import numpy as np

    tmp = temp_name(out)
    try:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        writer.add_name(name)
        for key, value in gguf_hparams(cfg).items():
            getattr(writer, f"add_{key}")(value)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges)
        writer.add_bos_token_id(vocab.eot_token)
        writer.add_eos_token_id(vocab.eot_token)
        writer.add_add_bos_token(False)  # GPT-2 starts a text with its first token, not with a bos
        writer.add_add_eos_token(False)
        for tensor_name, tensor in tensors.items():
            array = tensor.numpy()
            writer.add_tensor(tensor_name, array.astype(np.float16) if dtype == "f16" and array.ndim == 2 else array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        move_into_place(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_gguf(checkpoint: str | Path, out_file: str | Path, dtype: str = "f32") -> Path:
    """Export the checkpoint at `checkpoint` (checkpoint or run dir) as the GGUF file `out_file`; returns its path."""
    if dtype not in GGUF_DTYPES:
        raise UserError(f"dtype={dtype!r} is not a GGUF export type; choose one of {', '.join(GGUF_DTYPES)}.")
    out = check_gguf_target(out_file)  # before loading: a bad target fails at once
    ckpt = find_checkpoint(checkpoint, CHECKPOINT_FIX)
    cfg = ckpt.model_config
    check_gguf_exportable(cfg)  # before the weights and the tokenizer
    vocab = gguf_vocab(ckpt.tokenizer(), cfg.vocab_size or 0)
    try:
        tensors = gguf_tensors(ckpt.state_dict(), cfg)
    except ValueError as err:
        raise UserError(f"{ckpt.path}: {err}") from err
    try:
        write_gguf(out, cfg, vocab, tensors, dtype, name=f"{cfg.name} step {ckpt.step}")
    except OSError as err:
        raise UserError(f"could not write {out_file}: {err.strerror or err}; nothing was written there. Free space "
                        f"or give another path.") from None
    return out
