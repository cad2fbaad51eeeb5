"""Run run_train.py (or run_prepare.py with GPT2_TEST_SCRIPT=run_prepare.py) with data preparation
slowed down on purpose: every append to a shard sleeps GPT2_TEST_PREPARE_SLEEP seconds (rank 0
only under torchrun), so tests can signal a preparation in progress or outlast a timeout."""

import os
import runpy
import sys
import time
from pathlib import Path

from gpt2.data.shard_writer import ShardWriter

if os.environ.get("RANK", "0") == "0":
    _add = ShardWriter.add
    delay = float(os.environ.get("GPT2_TEST_PREPARE_SLEEP", "0"))

    def slow_add(self, tokens):  # type: ignore[no-untyped-def]
        time.sleep(delay)
        _add(self, tokens)

    ShardWriter.add = slow_add  # type: ignore[method-assign]
script = Path(__file__).resolve().parents[2] / os.environ.get("GPT2_TEST_SCRIPT", "run_train.py")
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
