"""Sample from a trained or pretrained GPT-2: `python run_generate.py checkpoint=RUN_DIR prompt="..."` or
`python run_generate.py pretrained=gpt2` (see gpt2/conf/generate.yaml for every option).

A thin Hydra entry point: it converts the composed config to a typed `GenerateConfig` and calls
`gpt2.generate.command.generate_samples`. It writes nothing to disk (no outputs/ run dir, no .hydra/, no log).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from gpt2.cli import check_command_line, register_configs, reported_errors, run_main
from gpt2.config import GenerateConfig

register_configs()


@hydra.main(version_base="1.3", config_path="gpt2/conf", config_name="generate")
def main(dcfg: DictConfig) -> None:
    with reported_errors():
        cfg: GenerateConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        cfg.check()  # before importing torch: a config mistake is reported at once
        from gpt2.generate.command import generate_samples

        generate_samples(cfg)


if __name__ == "__main__":
    check_command_line(GenerateConfig)
    run_main(main)
