"""Evaluate a trained or pretrained GPT-2: `python run_eval.py checkpoint=RUN_DIR tasks=[val_loss,hellaswag]` or
`python run_eval.py pretrained=gpt2 tasks=[hellaswag]` (see gpt2/conf/eval.yaml for every option); under `torchrun`
the items are split over the ranks.

A thin Hydra entry point: it converts the composed config to a typed `EvalRunConfig` and calls
`gpt2.evals.runner.run_evals`. It writes nothing to outputs/ (only `output_file=` when given).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from gpt2.cli import check_command_line, register_configs, reported_errors, run_main
from gpt2.config import EvalRunConfig

register_configs()


@hydra.main(version_base="1.3", config_path="gpt2/conf", config_name="eval")
def main(dcfg: DictConfig) -> None:
    with reported_errors():
        cfg: EvalRunConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        cfg.check()  # before importing torch: a config mistake is reported at once
        from gpt2.evals.runner import run_evals

        run_evals(cfg)


if __name__ == "__main__":
    check_command_line(EvalRunConfig)
    run_main(main)
