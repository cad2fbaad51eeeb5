"""gpt2.runtime.distributed: distributed=ddp without torchrun warns and trains as one process."""

from __future__ import annotations

import logging
import re

import pytest


def test_ddp_without_torchrun_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from gpt2.config import DistributedConfig
    from gpt2.runtime.distributed import init_distributed

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with caplog.at_level(logging.WARNING, logger="gpt2"):
        dist = init_distributed(DistributedConfig(name="ddp"), "cpu")
    assert dist.world_size == 1
    assert re.search(r"distributed=ddp .* one plain process .* torchrun --nproc_per_node=N run_train.py "
                     r"distributed=ddp", caplog.text), caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: deliberate, no warning
    with caplog.at_level(logging.WARNING, logger="gpt2"):
        init_distributed(DistributedConfig(name="ddp"), "cpu")
    assert "torchrun" not in caplog.text
