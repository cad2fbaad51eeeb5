"""Export a training checkpoint for Hugging Face transformers: `python run_export.py CHECKPOINT OUT_DIR`.

CHECKPOINT is a run dir (its latest valid checkpoint), its checkpoints/ dir or a step_XXXXXXXX dir; OUT_DIR
receives config.json, model.safetensors and the tokenizer files, listed in OUT_DIR/export_manifest.json; files
of your own in OUT_DIR are kept, and one the export would replace is refused (see gpt2.checkpoint.export).
"""

from __future__ import annotations

import argparse
import sys

from gpt2.cli import fail
from gpt2.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python run_export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir (latest valid checkpoint), checkpoints/ dir or step_* dir")
    parser.add_argument("out_dir", help="directory to write config.json, model.safetensors and the tokenizer into")
    args = parser.parse_args(argv)
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
