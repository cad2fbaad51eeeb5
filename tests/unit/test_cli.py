"""gpt2.cli: override keys checked against the schema before Hydra composes."""

from __future__ import annotations

import pytest

from gpt2.cli import check_override_keys
from gpt2.config import TrainConfig
from gpt2.errors import ConfigError


def test_known_keys_and_group_choices_pass() -> None:
    check_override_keys(TrainConfig, ["model=tiny", "+experiment=shakespeare_cpu", "optimizer.lr=1e-3",
                                      "data.data_files=[a.jsonl]", "hydra.run.dir=x", "-m", "logger.tags=[a]"],
                        {"model", "experiment"})
    with pytest.raises(ConfigError, match=r"did you mean eval\.val_tokens\?"):
        check_override_keys(TrainConfig, ["eval.val_token=5"], {"model"})
