"""Evaluate a trained or pretrained GPT-2: `python run_eval.py checkpoint=RUN_DIR tasks=[val_loss,hellaswag]` or
`python run_eval.py pretrained=gpt2 tasks=[hellaswag]` (see conf/eval.yaml for every option); under `torchrun`
the items are split over the ranks.

A thin Hydra entry point: it converts the composed config to a typed `EvalRunConfig` and calls
`gpt2.evals.runner.run_evals`. It writes nothing to outputs/ (only `output_file=` when given).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2.cli import check_command_line, fail, register_configs, run_main
from gpt2.config import EvalRunConfig
from gpt2.errors import UserError

register_configs()


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
        sys.exit(130)


if __name__ == "__main__":
    check_command_line(EvalRunConfig)
    run_main(main)
