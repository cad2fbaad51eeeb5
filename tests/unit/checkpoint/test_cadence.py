"""The CheckpointManager's cadence: every N steps, every N minutes of wall time (counted from the last save of
any kind), both together, and with keep_last, written by a real manager into real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2.checkpoint.manager import CheckpointManager
from gpt2.config import CheckpointConfig
from gpt2.errors import ConfigError
from tests.helpers import DictState
from tests.workers.tiny_lm import make


class Clock:
    """Seconds that a test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def saved_steps(tmp_path: Path, cfg: CheckpointConfig, seconds_per_step: float, max_steps: int = 12) -> list[int]:
    """Train-loop calls of `save` at steps 1..max_steps (the final one included), each step `seconds_per_step`
    long; returns the steps that wrote a checkpoint."""
    model, opt = make(0)
    clock = Clock()
    mgr = CheckpointManager(tmp_path, cfg, max_steps=max_steps, model=model, optimizer=opt, trainer=DictState(),
                            rng=DictState(), record={"config": {}}, clock=clock)
    saved = []
    for step in range(1, max_steps + 1):
        clock.now += seconds_per_step
        if mgr.save(step) is not None:
            saved.append(step)
    if mgr.save(max_steps, final=True) is not None and max_steps not in saved:
        saved.append(max_steps)
    return saved


def on_disk(tmp_path: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())


def test_wall_time_cadence_alone(tmp_path: Path) -> None:
    # 25 s per step, every minute: the 3rd step after each save is the first at or past 60 s.
    cfg = CheckpointConfig(interval_minutes=1.0, keep_last=100)
    assert saved_steps(tmp_path, cfg, 25.0) == [3, 6, 9, 12]
    assert on_disk(tmp_path) == [3, 6, 9, 12]


def test_wall_time_composes_with_the_step_cadence_and_keep_last(tmp_path: Path) -> None:
    # Step saves at 5 and 10 restart the wall clock: 25 s per step, a minute -> 3, 5 (steps), 8, 10 (steps), then
    # 12 is the end (the final save).
    cfg = CheckpointConfig(interval=5, interval_minutes=1.0, keep_last=2, keep_best=False)
    assert saved_steps(tmp_path, cfg, 25.0) == [3, 5, 8, 10, 12]
    assert on_disk(tmp_path) == [10, 12]


def test_no_wall_time_saves_when_off_or_when_steps_are_fast(tmp_path: Path) -> None:
    assert saved_steps(tmp_path / "off", CheckpointConfig(interval=4), 1000.0) == [4, 8, 12]
    assert saved_steps(tmp_path / "fast", CheckpointConfig(interval_minutes=10.0), 1.0) == [12]


def test_a_negative_interval_minutes_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint.interval_minutes=-1.0 must be >= 0"):
        CheckpointConfig(interval_minutes=-1.0).check()
