"""Export a training checkpoint as a Hugging Face GPT-2 directory (`python run_export.py CHECKPOINT OUT_DIR`).

OUT_DIR receives config.json + model.safetensors, loadable with transformers.GPT2LMHeadModel.from_pretrained
and with run_generate.py pretrained=OUT_DIR, and the checkpoint's tokenizer for
transformers.AutoTokenizer.from_pretrained: GPT-2's vocab.json + merges.txt (rebuilt from the tiktoken ranks
file) or our BPE's tokenizer.json, with tokenizer_config.json. OUT_DIR must not be, or lie inside, a
checkpoint (nor be a run dir that holds checkpoints/). The files are written into a temporary folder next to
OUT_DIR and moved into place, so a failed export (full disk, kill) leaves OUT_DIR as it was.

OUT_DIR may hold files of its own: an export touches only what it writes, and lists those names in
export_manifest.json. A re-export replaces the files of the earlier export and removes the ones it no longer
writes (a GPT-2 export's vocab.json after a BPE checkpoint); a file it would write that no export of its own
wrote (the user's tokenizer.json) is refused, untouched, with one error line.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpt2.checkpoint.format import CHECKPOINTS_DIR, is_checkpoint_dir
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.errors import UserError
from gpt2.model.hf import check_exportable, export_hf
from gpt2.tokenizers.hf_files import write_tokenizer_files
from gpt2.utils.fs import atomic_write, check_writable, make_temp_dir, move_into_place, remove_tree

CHECKPOINT_FIX = "Check the path: export takes a run dir, its checkpoints/ dir or a step_* dir."
MANIFEST = "export_manifest.json"
"""The file in an export folder that lists the names of the files the export wrote ({"files": [...]})."""


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


def read_manifest(out: Path) -> set[str]:
    """The names of the files an earlier export wrote into `out` (none without a manifest); UserError for a
    manifest that is not one (then nothing in `out` is known to be an export's)."""
    path = out / MANIFEST
    if not path.exists():
        return set()
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not (isinstance(files, list) and all(isinstance(f, str) and f not in ("", ".", "..") and Path(f).name == f
                                                for f in files)):
            raise ValueError("not a list of file names")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not an export manifest ({err}); the export cannot tell its own files from "
                        f"yours there. Give another folder, or delete {MANIFEST} and that export's files.") from None
    return set(files) - {MANIFEST}


def _write_manifest(out: Path, names: set[str]) -> None:
    atomic_write(out / MANIFEST, json.dumps({"files": sorted(names)}, indent=1) + "\n")


def _publish(tmp: Path, out: Path, out_dir: str | Path) -> None:
    """Move the export built in `tmp` into the existing folder `out`: refuse (before any change) a file it would
    replace that no earlier export wrote; then the manifest lists the earlier and the new files, the new files
    replace theirs (config.json last), the earlier export's files that are not written again are removed, and
    the manifest lists the new files only. At any point the manifest covers every file an export wrote."""
    ours = read_manifest(out)
    new = {p.name for p in tmp.iterdir()}
    clash = sorted(name for name in new if name not in ours and (out / name).exists())
    if clash:
        why = f"its {MANIFEST} does not list it" if (out / MANIFEST).exists() else f"the folder has no {MANIFEST}"
        them = "it" if len(clash) == 1 else "them"
        raise UserError(f"export target {out_dir} holds {', '.join(clash)}, which no earlier export wrote ({why}), "
                        f"and the export would replace {them}; move {them} away or give another folder.")
    _write_manifest(out, ours | new)
    for name in sorted(new - {"config.json"}):
        move_into_place(tmp / name, out / name)
    move_into_place(tmp / "config.json", out / "config.json")
    for name in ours - new:
        (out / name).unlink(missing_ok=True)
    _write_manifest(out, new)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export the checkpoint at `checkpoint` (checkpoint or run dir) to out_dir; returns out_dir."""
    out = check_out_dir(out_dir)  # before loading: a bad target fails at once
    if out.exists():
        read_manifest(out)
    ckpt = find_checkpoint(checkpoint, CHECKPOINT_FIX)
    check_exportable(ckpt.model_config)  # before the weights: a model HF GPT-2 cannot hold fails at once
    tokenizer = ckpt.tokenizer()
    state = ckpt.state_dict()
    tmp: Path | None = None
    try:
        tmp = make_temp_dir(out)
        export_hf(state, ckpt.model_config, tmp, eot_token=tokenizer.eot_token)
        write_tokenizer_files(tokenizer, tmp, ckpt.model_config.n_positions)
        if not out.exists():
            _write_manifest(tmp, {p.name for p in tmp.iterdir()})
            move_into_place(tmp, out)
        else:
            _publish(tmp, out, out_dir)
    except UserError:
        raise
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
