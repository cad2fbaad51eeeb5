"""Run run_train.py with every optimizer step lasting at least GPT2_TEST_STEP_SLEEP seconds longer (a sleep
after the step, which changes no number), so that a test can kill or add a node while the run is training."""

import os
import runpy
import sys
import time
from pathlib import Path

from gpt2.train.trainer import Trainer

_step = Trainer.train_step
delay = float(os.environ.get("GPT2_TEST_STEP_SLEEP", "0"))


def paced_step(self: Trainer) -> dict[str, float]:
    metrics = _step(self)
    time.sleep(delay)
    return metrics


Trainer.train_step = paced_step  # type: ignore[method-assign]
script = Path(__file__).resolve().parents[2] / "run_train.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
