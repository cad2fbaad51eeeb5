"""Evaluate a trained or pretrained GPT-2: `python run_eval.py checkpoint=RUN_DIR tasks=[val_loss,hellaswag]`
or `python run_eval.py pretrained=gpt2 tasks=[hellaswag]` (see conf/eval.yaml for every option); under
`torchrun` the items are split over the ranks.

A thin Hydra entry point: it converts the composed config to a typed `EvalRunConfig` and calls
`gpt2.evals.runner.run_evals`. It writes nothing to outputs/ (only `output_file=` when given).
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2.cli import check_command_line
from gpt2.config import EvalRunConfig, UserError
from run_train import register_configs

register_configs()


def _exit(code: int) -> None:
    """Exit; under torchrun with os._exit after flushing (gloo can abort during interpreter shutdown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)
    sys.exit(code)


def fail(message: str) -> None:
    """Print a user-facing error and exit 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    _exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(dcfg: DictConfig) -> None:
    try:
        cfg: EvalRunConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        cfg.check()  # before importing torch: a config mistake is reported at once
        from gpt2.evals.runner import run_evals

        run_evals(cfg)
    except (UserError, ValueError, OmegaConfBaseException) as err:
        fail(str(err))
    except KeyboardInterrupt:
        _exit(130)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit(0)


if __name__ == "__main__":
    check_command_line(EvalRunConfig)
    main()
