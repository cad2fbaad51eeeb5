"""The one accessor for where this process sits in a job: rank, local rank and world size.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for its workers, and gpt2.runtime.slurm exports the same
variables inside a multi-task SLURM job, so the launch environment is the source of truth; once a
process group is joined its rank and size are the same numbers, and they are read from it. Importing
this module costs nothing (no torch), so the entry points can ask before anything heavy is loaded.
"""

from __future__ import annotations

import os
import sys


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): the joined process group's, else the launcher's, else (0, 1)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index among the ranks on its node (torchrun's LOCAL_RANK), 0 for a single process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0, the one that writes shared files and logs."""
    return rank_and_world()[0] == 0


def launched_distributed() -> bool:
    """Whether a launcher (torchrun, SLURM) started this process as one rank of a job, even of one rank."""
    return "WORLD_SIZE" in os.environ
