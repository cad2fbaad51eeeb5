"""Export a training checkpoint for Hugging Face transformers: `python run_export.py CHECKPOINT OUT_DIR`, or for
llama.cpp: `python run_export.py CHECKPOINT OUT.gguf [--dtype f16]`.

CHECKPOINT is a run dir (its latest valid checkpoint), its checkpoints/ dir or a step_XXXXXXXX dir; OUT_DIR
receives config.json, model.safetensors and the tokenizer files, listed in OUT_DIR/export_manifest.json (files
of your own in OUT_DIR are kept, and one the export would replace is refused; see gpt2.checkpoint.export); a path
ending in .gguf becomes one GGUF file with the tokenizer in its metadata (see gpt2.checkpoint.gguf_export).
"""

from __future__ import annotations

import argparse
import sys

from gpt2.cli import fail
from gpt2.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python run_export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir (latest valid checkpoint), checkpoints/ dir or step_* dir")
    parser.add_argument("out_dir", help="directory to write config.json, model.safetensors and the tokenizer into; "
                                        "or a file ending in .gguf to write for llama.cpp")
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f32",
                        help="GGUF only: weight type of the 2-D tensors (default f32; f16 halves the file)")
    args = parser.parse_args(argv)
    if args.out_dir.endswith(".gguf"):
        from gpt2.checkpoint.gguf_export import export_gguf

        try:
            path = export_gguf(args.checkpoint, args.out_dir, args.dtype)
        except UserError as err:
            fail(str(err))
        print(f"wrote {path}")
        return 0
    if args.dtype != "f32":
        fail(f"--dtype {args.dtype} applies to a GGUF export only; name the output file OUT.gguf, or drop --dtype.")
    from gpt2.checkpoint.export import MANIFEST, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except UserError as err:
        fail(str(err))
    print(f"wrote {out / 'config.json'}, {out / 'model.safetensors'} and the tokenizer files (listed in "
          f"{out / MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
