"""Export a training checkpoint as a Hugging Face GPT-2 directory.

    python -m gpt2.checkpoint.export CHECKPOINT OUT_DIR

CHECKPOINT is a checkpoint dir (checkpoints/step_XXXXXXXX) or a run dir (its latest valid checkpoint).
OUT_DIR receives config.json + model.safetensors, loadable with
transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR) and with run_generate.py pretrained=OUT_DIR, and the
checkpoint's tokenizer for transformers.AutoTokenizer.from_pretrained(OUT_DIR): GPT-2's vocab.json +
merges.txt (rebuilt from the tiktoken ranks file) or our BPE's tokenizer.json, with tokenizer_config.json.
OUT_DIR must not be, or lie inside, a checkpoint (nor be a run dir that holds checkpoints/). The files
are written into a temporary folder next to OUT_DIR and moved into place, so a failed export (full
disk, kill) leaves OUT_DIR as it was.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gpt2.config import UserError

CHECKPOINT_FIX = "Check the path: export takes a run dir, its checkpoints/ dir or a step_* dir."


def _is_checkpoint_dir(d: Path) -> bool:
    from gpt2.checkpoint.format import CHECKPOINTS_DIR, COMPLETE, META, STEP_DIR

    return d.name == CHECKPOINTS_DIR or bool(STEP_DIR.match(d.name)) or (d / META).exists() or (d / COMPLETE).exists()


def check_out_dir(out_dir: str | Path) -> Path:
    """The export target as an absolute path; UserError when it is a file, is or lies inside a checkpoint,
    holds checkpoints (a run dir), or cannot be written."""
    from gpt2.checkpoint.format import CHECKPOINTS_DIR

    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"export target {out_dir} is an existing file; give a directory (new, or holding an "
                        f"earlier export), e.g. {out.parent / 'hf-export'}.")
    inside = next((d for d in (out, *out.parents) if d.is_dir() and _is_checkpoint_dir(d)), None)
    if inside is None and (out / CHECKPOINTS_DIR).exists():
        inside = out / CHECKPOINTS_DIR
    if inside is not None:
        raise UserError(f"export target {out_dir} is or lies inside a training checkpoint ({inside}); exporting "
                        f"there would overwrite the checkpoint's own files. Give a folder outside checkpoints/, "
                        f"e.g. hf-export/.")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"export target {out_dir} cannot be written ({existing} is read-only or not a folder); "
                        f"give a writable folder.")
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export the checkpoint at `checkpoint` (checkpoint or run dir) to out_dir; returns out_dir."""
    from gpt2.checkpoint.format import load_weights, read_meta
    from gpt2.model.hf import export_hf
    from gpt2.tokenizers.bpe import from_checkpoint
    from gpt2.tokenizers.hf_files import TOKENIZER_FILES, write_tokenizer_files

    out = check_out_dir(out_dir)  # before loading: a bad target fails at once
    ckpt, cfg, state = load_weights(checkpoint, fix=CHECKPOINT_FIX)
    meta = read_meta(ckpt)
    saved = meta.get("config") or {}
    ranks = (saved.get("tokenizer") or {}).get("path") or (saved.get("data") or {}).get("tokenizer_path")
    tokenizer = from_checkpoint(ckpt, meta, ranks, (saved.get("data") or {}).get("cache_dir"))
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        export_hf(state, cfg, tmp, eot_token=tokenizer.eot_token)
        written = write_tokenizer_files(tokenizer, tmp, cfg.n_positions)
        if not out.exists():
            os.rename(tmp, out)
        else:  # an earlier export (maybe with other files): replace ours file by file, config.json last
            for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
                os.replace(tmp / name, out / name)
            for name in set(TOKENIZER_FILES) - set(written):  # another tokenizer's files from an earlier export
                (out / name).unlink(missing_ok=True)
    except ValueError as err:
        raise UserError(f"{ckpt}: {err}") from err
    except Exception as err:  # OSError, or safetensors' own error wrapping one (full disk, read-only)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise UserError(f"could not write the export to {out_dir}: {reason}; nothing was changed there. Free "
                        f"space or give another folder.") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2.checkpoint.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint dir (checkpoints/step_XXXXXXXX) or run dir (latest valid)")
    parser.add_argument("out_dir", help="directory to write config.json and model.safetensors into")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'config.json'}, {out / 'model.safetensors'} and the tokenizer files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
