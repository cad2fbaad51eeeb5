"""Export a training checkpoint as a Hugging Face GPT-2 directory.

    python -m gpt2.export CHECKPOINT OUT_DIR

CHECKPOINT is a checkpoint dir (checkpoints/step_XXXXXXXX) or a run dir (its latest valid checkpoint).
OUT_DIR receives config.json + model.safetensors, loadable with
transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR) and with run_generate.py pretrained=OUT_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2.config import UserError


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export the checkpoint at `checkpoint` (checkpoint or run dir) to out_dir; returns out_dir."""
    from gpt2.checkpoint_store import load_weights
    from gpt2.pretrained import export_hf

    ckpt, cfg, state = load_weights(checkpoint)
    try:
        return export_hf(state, cfg, out_dir)
    except ValueError as err:
        raise UserError(f"{ckpt}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint dir (checkpoints/step_XXXXXXXX) or run dir (latest valid)")
    parser.add_argument("out_dir", help="directory to write config.json and model.safetensors into")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
