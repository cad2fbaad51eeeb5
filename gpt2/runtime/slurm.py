"""SLURM support for jobs started by Hydra's submitit launcher (`hydra/launcher=slurm_gpu`).

One SLURM task per GPU: with `tasks_per_node=G`, submitit runs the Hydra task function once
per task, and `init_slurm_env()` (called at the start of `train`) turns submitit's view of the
job into the torch.distributed `env://` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so the rest of the code works exactly as under torchrun.

Preemption and time limits, end to end:

1. The launcher configs ask SLURM to send SIGUSR1 `signal_delay_s` seconds before the time
   limit (`additional_parameters.signal`); SLURM sends SIGTERM on preemption.
2. The trainer catches either signal, writes a checkpoint at the next step boundary and raises
   `TrainingInterrupted`; a plain `python run_train.py` then exits with code 75
   (`PREEMPTED_EXIT_CODE`, "checkpointed, requeue me" -- an sbatch script can do
   `srun python run_train.py ... resume=auto || { [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID; }`).
3. Inside a submitit job, `run_train.py` first calls `requeue_submitit_job()`: it spends one of
   the launcher's `max_num_timeout` retries and runs `scontrol requeue`. SLURM restarts the same
   pickled Hydra job with the same overrides in the same job dir (`multirun/<stamp>/<num>`), and
   with `resume=auto` training continues from the checkpoint it just wrote. The Hydra process that
   submitted the sweep keeps waiting for the requeued job. With no retries left the job fails
   with a UserError naming its overrides (the checkpoint stays for a manual `resume=`).

submitit is imported lazily: importing this module costs nothing outside SLURM jobs.
"""

from __future__ import annotations

import logging
import os
import subprocess

from gpt2.errors import UserError

log = logging.getLogger("gpt2")

_SUBMITIT_EXECUTORS = ("slurm", "local")


def in_submitit_job() -> bool:
    """True inside a job started by submitit (SLURM or its local executor)."""
    return os.environ.get("SUBMITIT_EXECUTOR", "") in _SUBMITIT_EXECUTORS and "SUBMITIT_FOLDER" in os.environ


def init_slurm_env() -> bool:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT when this process
    is one task of a multi-task submitit job; returns True if it did.

    Does nothing (returns False) outside submitit, for single-task jobs, and when a launcher such
    as torchrun already set RANK/WORLD_SIZE. CUDA_VISIBLE_DEVICES is left alone: SLURM may have
    already narrowed it per task, so the device is picked with `device_index` instead.
    """
    if not in_submitit_job() or "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return False
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return False
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    log.info("submitit job %s: rank %d/%d (local rank %d) on %s, master %s:%d", env.job_id, dist_env.rank,
             dist_env.world_size, dist_env.local_rank, env.hostname, dist_env.master_addr, dist_env.master_port)
    return True


def device_index(local_rank: int, n_visible: int) -> int:
    """The CUDA device index for a local rank: `local_rank` modulo the visible GPUs, so one task per
    GPU maps 1:1, and a task that SLURM restricted to a single GPU (n_visible=1) uses device 0."""
    if local_rank < 0:
        raise ValueError(f"local_rank={local_rank} must be >= 0.")
    if n_visible < 1:
        raise ValueError(f"n_visible={n_visible} must be >= 1; no GPU is visible to this process.")
    return local_rank % n_visible


def requeue_submitit_job() -> bool:
    """Requeue the current submitit SLURM job after the trainer checkpointed on a signal.

    Spends one of the launcher's `max_num_timeout` retries (the count lives in submitit's job
    pickle) and runs `scontrol requeue`. Only global rank 0 requeues. Returns True if the job was
    requeued; False outside a submitit SLURM job, on other ranks, or when `scontrol requeue` fails
    (logged; SLURM may be requeueing a preempted job itself). Raises UserError when no retries are left.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "SUBMITIT_FOLDER" not in os.environ:
        return False
    import submitit
    from submitit.core.utils import DelayedSubmission

    env = submitit.JobEnvironment()
    if env.global_rank != 0:
        return False
    pickle_path = env.paths.submitted_pickle
    delayed = DelayedSubmission.load(pickle_path)
    remaining = delayed._timeout_countdown - 1
    if remaining < 0:
        raise UserError(f"SLURM job {env.job_id} was not requeued: it already used its "
                        f"hydra.launcher.max_num_timeout requeues; raise it to allow more.")
    delayed.set_timeout(delayed._timeout_min, remaining)
    delayed.dump(pickle_path)
    try:
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("scontrol requeue %s failed: %s", env.job_id, str(detail).strip())
        return False
    log.warning("requeued SLURM job %s (%d retries left); it resumes with resume=auto", env.job_id, remaining)
    return True
