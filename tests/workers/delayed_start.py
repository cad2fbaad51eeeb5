"""Run run_train.py as torchrun's worker, with rank 1 starting late (GPT2_TEST_DELAY_RANK1
seconds) so that the ranks resolve Hydra's run-dir timestamp at different times."""

import os
import runpy
import sys
import time
from pathlib import Path

if os.environ.get("RANK") == "1":
    time.sleep(float(os.environ.get("GPT2_TEST_DELAY_RANK1", "0")))
script = Path(__file__).resolve().parents[2] / "run_train.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
