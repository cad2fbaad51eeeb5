"""Tokenize a corpus into token shards before training: `python run_prepare.py data=... [data.*=...]`.

Takes the same config (gpt2/conf/train.yaml, the same `data=` and `experiment=` overrides) as
run_train.py, which would prepare the same shards itself when they are missing; running this
first lets a long preparation (e.g. `experiment=gpt2_124m_fineweb`) happen once, on a CPU node,
resumably (kill it and rerun: it continues at the last saved document). Writes nothing but the
cache (no run directory). Prints the prepared folder and its token counts.
"""

from __future__ import annotations

import logging
import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt2 import config as C
from gpt2.cli import CONF_DIR, check_command_line, fail, register_configs, reported_errors
from gpt2.errors import UserError


def main(overrides: list[str]) -> None:
    register_configs()
    with reported_errors():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="prepare"):
            dcfg = compose(config_name="train", overrides=overrides)
        cfg: C.TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        cfg.data.check()
        cfg.tokenizer.check()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from gpt2.data.mixture import prepare_mixture
    from gpt2.data.preprocess import prepare_data

    try:
        if cfg.data.name == C.MIX:
            parts = [(f"{part.name}: ", part.prepared) for part in prepare_mixture(cfg.data, cfg.tokenizer).parts]
        else:
            parts = [("", prepare_data(cfg.data, tokenizer=cfg.tokenizer))]
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume the preparation", file=sys.stderr)
        sys.exit(130)
    for name, prepared in parts:
        print(f"prepared {name}{prepared.folder}: {prepared.n_train_tokens:,} train + {prepared.n_val_tokens:,} val "
              f"tokens in {len(prepared.train.paths)} train shard(s)")


if __name__ == "__main__":
    check_command_line(C.TrainConfig)
    main(sys.argv[1:])
