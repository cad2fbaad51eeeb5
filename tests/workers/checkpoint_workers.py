"""Worker processes for tests/test_checkpoint.py: ``python tests/workers/checkpoint_workers.py MODE ARGS``.

save_loop ROOT: saves checkpoints forever (the test SIGKILLs it); fsdp OUT: a 2-rank FSDP2 (gloo, CPU)
save/load; signals: the preemption handler's first-signal / second-signal behaviour.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gpt2.checkpoint.handle import find_checkpoint  # noqa: E402
from gpt2.runtime.distributed import any_rank  # noqa: E402
from gpt2.train.preemption import PreemptionHandler  # noqa: E402
from tests.helpers import load_toy_checkpoint, save_toy_checkpoint  # noqa: E402
from tests.workers.tiny_lm import TinyLM, make, train_step  # noqa: E402


def _main_save_loop(root: str) -> None:
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])  # ~1.6 M params, ~25 MB with Adam state
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 512)).sum().backward()
    opt.step()
    latest = find_checkpoint(root, required=False)
    step = latest.step + 1 if latest else 1
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
                opt.state[p]["exp_avg"].fill_(float(step))
        save_toy_checkpoint(Path(root), step, model, opt, trainer_state={"step": step}, rank_state={"step": step},
                            keep_last=2, keep_best=False)
        print(f"saved {step}", flush=True)
        step += 1


def _fsdp_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)

    def build(seed: int) -> tuple[TinyLM, torch.optim.Optimizer]:
        model, _ = make(seed)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def full(m: nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    run = Path(out) / "run"
    model, opt = build(0)
    train_step(model, opt, 1)
    ref1 = full(model)
    save_toy_checkpoint(run, 1, model, opt, trainer_state={"step": 1}, rank_state={"rank": rank}, val_loss=1.0,
                        keep_last=2, sharded=True)
    train_step(model, opt, 2)
    ref2 = full(model)
    model2, opt2 = build(123)
    loaded = load_toy_checkpoint(run, model2, opt2, sharded=True)
    loaded1 = full(model2)
    train_step(model2, opt2, 2)
    got2 = full(model2)
    if rank == 0:
        torch.save({"ref1": ref1, "ref2": ref2, "loaded1": loaded1, "got2": got2}, Path(out) / "result.pt")
    torch.save(loaded.rank_state, Path(out) / f"rank_state{rank}.pt")
    dist.destroy_process_group()
    # Leave before interpreter shutdown destroys leftover gloo objects (it can SIGABRT; see run_train.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _main_fsdp(out: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, out), nprocs=2)


def _main_signals() -> None:
    handler = PreemptionHandler().install()
    assert signal.getsignal(signal.SIGTERM) == handler._handle
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)  # Python handlers run between bytecodes of the main thread
    anywhere = any_rank(handler.requested, torch.device("cpu"))
    print(f"requested={handler.requested} signal={handler.signal_name} any={anywhere}", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # second signal: die now
    time.sleep(5)
    print("still alive", flush=True)


if __name__ == "__main__":
    globals()[f"_main_{sys.argv[1]}"](*sys.argv[2:])
