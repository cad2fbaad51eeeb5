"""Worker for test_checkpoint.py's retention kill test: saves checkpoints forever with keep_last=1.
Each saved checkpoint is padded with many small files so that retention's deletion of it takes long
enough to be hit by the SIGKILL the test sends. Prints ``saved N`` after each save.

    python tests/workers/retention_loop.py ROOT START_STEP N_PAD_FILES
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.helpers import save_toy_checkpoint  # noqa: E402


def main(root: Path, step: int, n_pad: int) -> None:
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    while True:
        path = save_toy_checkpoint(root, step, model, opt, keep_last=1, keep_best=False)
        for i in range(n_pad):
            (path / f"pad_{i:05d}").write_bytes(b"x")
        print(f"saved {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
