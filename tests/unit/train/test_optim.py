"""gpt2.train.optim: optimizers and the learning-rate schedule."""

from __future__ import annotations

import pytest

from gpt2.config import SchedulerConfig, validate
from gpt2.errors import ConfigError
from tests.helpers import compose_train


def test_default_warmup_follows_the_run_length() -> None:
    from gpt2.train.optim import lr_multiplier

    sched = SchedulerConfig()
    assert [sched.warmup_for(n) for n in (1, 5, 50, 300, 1000, 20000)] == [0, 0, 5, 30, 100, 100]
    assert lr_multiplier(0, sched, 50) == pytest.approx(1 / 5) and lr_multiplier(5, sched, 50) == pytest.approx(1.0)
    validate(compose_train(["model=tiny", "max_steps=5"]))  # was: warmup_steps=100 exceeds max_steps=5
    with pytest.raises(ConfigError, match="warmup_steps=10 exceeds max_steps=5"):  # an explicit value is kept
        validate(compose_train(["model=tiny", "max_steps=5", "scheduler.warmup_steps=10"]))
