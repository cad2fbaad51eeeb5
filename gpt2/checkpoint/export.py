"""Export a training checkpoint as a Hugging Face GPT-2 directory (`python run_export.py CHECKPOINT OUT_DIR`).

OUT_DIR receives config.json + model.safetensors, loadable with transformers.GPT2LMHeadModel.from_pretrained
and with run_generate.py pretrained=OUT_DIR, and the checkpoint's tokenizer for
transformers.AutoTokenizer.from_pretrained: GPT-2's vocab.json + merges.txt (rebuilt from the tiktoken ranks
file) or our BPE's tokenizer.json, with tokenizer_config.json. OUT_DIR must not be, or lie inside, a
checkpoint (nor be a run dir that holds checkpoints/). The files are written into a temporary folder next to
OUT_DIR and moved into place, so a failed export (full disk, kill) leaves OUT_DIR as it was.
"""

from __future__ import annotations

from pathlib import Path

from gpt2.checkpoint.format import CHECKPOINTS_DIR, is_checkpoint_dir
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.errors import UserError
from gpt2.model.hf import check_exportable, export_hf
from gpt2.tokenizers.hf_files import TOKENIZER_FILES, write_tokenizer_files
from gpt2.utils.fs import check_writable, make_temp_dir, move_into_place, remove_tree

CHECKPOINT_FIX = "Check the path: export takes a run dir, its checkpoints/ dir or a step_* dir."


def check_out_dir(out_dir: str | Path) -> Path:
    """The export target as an absolute path; UserError when it is a file, is or lies inside a checkpoint,
    holds checkpoints (a run dir), or cannot be written (checked by writing)."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"export target {out_dir} is an existing file; give a directory (new, or holding an "
                        f"earlier export), e.g. {out.parent / 'hf-export'}.")
    inside = next((d for d in (out, *out.parents)
                   if d.is_dir() and (d.name == CHECKPOINTS_DIR or is_checkpoint_dir(d))), None)
    if inside is None and (out / CHECKPOINTS_DIR).exists():
        inside = out / CHECKPOINTS_DIR
    if inside is not None:
        raise UserError(f"export target {out_dir} is or lies inside a training checkpoint ({inside}); exporting "
                        f"there would overwrite the checkpoint's own files. Give a folder outside checkpoints/, "
                        f"e.g. hf-export/.")
    return check_writable("export target", out, is_dir=True)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export the checkpoint at `checkpoint` (checkpoint or run dir) to out_dir; returns out_dir."""
    out = check_out_dir(out_dir)  # before loading: a bad target fails at once
    ckpt = find_checkpoint(checkpoint, CHECKPOINT_FIX)
    check_exportable(ckpt.model_config)  # before the weights: a model HF GPT-2 cannot hold fails at once
    tokenizer = ckpt.tokenizer()
    state = ckpt.state_dict()
    tmp: Path | None = None
    try:
        tmp = make_temp_dir(out)
        export_hf(state, ckpt.model_config, tmp, eot_token=tokenizer.eot_token)
        written = write_tokenizer_files(tokenizer, tmp, ckpt.model_config.n_positions)
        if not out.exists():
            move_into_place(tmp, out)
        else:  # an earlier export (maybe with other files): replace ours file by file, config.json last
            for name in sorted(p.name for p in tmp.iterdir()):
                if name != "config.json":
                    move_into_place(tmp / name, out / name)
            move_into_place(tmp / "config.json", out / "config.json")
            for name in set(TOKENIZER_FILES) - set(written):  # another tokenizer's files from an earlier export
                (out / name).unlink(missing_ok=True)
    except ValueError as err:
        raise UserError(f"{ckpt.path}: {err}") from err
    except Exception as err:  # OSError, or safetensors' own error wrapping one (full disk, read-only)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise UserError(f"could not write the export to {out_dir}: {reason}; nothing was changed there. Free "
                        f"space or give another folder.") from None
    finally:
        if tmp is not None:
            remove_tree(tmp)
    return out
