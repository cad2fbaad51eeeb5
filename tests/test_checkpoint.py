"""Checkpoint save/load/discovery/retention, crash safety and preemption signals.

The processes these tests start (a save loop that gets SIGKILLed, a 2-rank FSDP2 save/load, a signal
self-test, a retention loop) are in tests/workers/.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpt2.checkpoint.format import load_model_state, read_meta  # noqa: E402
from gpt2.checkpoint.store import find_latest, resolve_checkpoint  # noqa: E402
from gpt2.errors import UserError  # noqa: E402
from gpt2.train.preemption import PreemptionHandler  # noqa: E402
from gpt2.train.rng import capture_rng_state, restore_rng_state  # noqa: E402
from tests.helpers import load_toy_checkpoint, save_toy_checkpoint  # noqa: E402
from tests.workers.tiny_lm import make, train_step  # noqa: E402

WORKERS = REPO / "tests" / "workers" / "checkpoint_workers.py"


def save(root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, config: dict | None = None,
         **kw) -> Path:
    args = dict(trainer_state={"step": step}, rank_state={"pos": step}, record={"config": config or {"seed": 1}})
    args.update(kw)
    return save_toy_checkpoint(root, step, model, opt, **args)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python tests/workers/checkpoint_workers.py MODE ...`"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(WORKERS), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


# ------------------------------------------------------------------ round trip


def test_round_trip_model_optimizer_trainer_rank_state(tmp_path: Path) -> None:
    model, opt = make(0)
    train_step(model, opt, 1)
    trainer_state = {"step": 7, "tokens_seen": 1234, "best_val_loss": 2.5, "wandb_run_id": "abc",
                     "scheduler": {"last_epoch": 7, "base_lrs": [0.01]}, "scaler": {"scale": torch.tensor(2.0)}}
    rank_state = {"data_pos": 42, "rng": capture_rng_state()}
    path = save(tmp_path, 7, model, opt, trainer_state=trainer_state, rank_state=rank_state, val_loss=2.5,
                config={"model": {"n_embd": 16}})
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE", "meta.json", "model.safetensors", "optimizer.pt", "rank_00000.pt", "trainer.pt"]
    meta = read_meta(path)
    assert meta["step"] == 7 and meta["val_loss"] == 2.5 and meta["world_size"] == 1 and meta["sharded"] is False
    assert meta["config"] == {"model": {"n_embd": 16}} and meta["format"] == 2 and "T" in meta["time"]

    model2, opt2 = make(99)
    loaded = load_toy_checkpoint(tmp_path, model2, opt2, sharded=False)
    assert loaded.step == 7 and loaded.path == path
    assert loaded.trainer_state["tokens_seen"] == 1234 and loaded.trainer_state["wandb_run_id"] == "abc"
    assert torch.equal(loaded.trainer_state["scaler"]["scale"], torch.tensor(2.0))
    assert loaded.rank_state is not None and loaded.rank_state["data_pos"] == 42
    assert_same_params(model, model2)
    assert model2.lm_head.weight is model2.transformer.wte.weight  # still tied after load
    # Optimizer state restored: the next step is bit-identical.
    assert train_step(model, opt, 2) == train_step(model2, opt2, 2)
    assert_same_params(model, model2)


def test_tied_weights_stored_once_and_retied(tmp_path: Path) -> None:
    from safetensors import safe_open

    model, opt = make(0)
    path = save(tmp_path, 1, model, opt)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    sd = load_model_state(path)
    assert set(sd) == set(model.state_dict())
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    assert read_meta(path)["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_rng_capture_restore_exact() -> None:
    def draw() -> tuple:
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))

    random.gauss(0, 1)
    np.random.randn()  # leave cached gaussians in both generators
    draw()
    state = capture_rng_state()
    first = draw()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)
    draw()
    restore_rng_state(restored)
    second = draw()
    assert first[:4] == second[:4] and torch.equal(first[4], second[4])


def test_wrappers_are_unwrapped(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, opt = make(0)
        ddp = DDP(model)
        wrapped = torch.compile(ddp)  # keys would be _orig_mod.module.*
        assert all(k.startswith("_orig_mod.module.") for k in wrapped.state_dict())
        path = save(tmp_path / "run", 3, wrapped, opt)
        keys = set(load_model_state(path))
        assert keys == set(model.state_dict())
        model2, opt2 = make(5)
        load_toy_checkpoint(path, DDP(model2), opt2, sharded=False)
        assert_same_params(model, model2)
        assert read_meta(path)["world_size"] == 1
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ atomicity


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    model, opt = make(0)
    first = save(tmp_path, 1, model, opt)
    with pytest.raises(Exception, match="lambda|pickle"):
        save(tmp_path, 2, model, opt, trainer_state={"bad": lambda: 0})
    assert find_latest(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    load_toy_checkpoint(tmp_path, make(1)[0], None, sharded=False)


def test_disk_full_on_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root or no CAP_SYS_ADMIN)")
    try:
        model, opt = make(0)
        first = save(mnt, 1, model, opt)
        big = {"blob": torch.zeros(512 * 1024)}  # 2 MiB: does not fit
        with pytest.raises(UserError, match=r"could not write checkpoint to .*step_00000002.*No space left.*intact"):
            save(mnt, 2, model, opt, rank_state=big)
        assert sorted(p.name for p in (mnt / "checkpoints").iterdir()) == ["step_00000001"]
        assert resolve_checkpoint(mnt)[0] == first
        load_toy_checkpoint(mnt, make(1)[0], make(1)[1], sharded=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_unwritable_root_is_user_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    model, opt = make(0)
    with pytest.raises(UserError, match=r"could not write checkpoint to .*afile.*earlier checkpoints are intact"):
        save(tmp_path / "afile" / "run", 1, model, opt)


def test_enospc_at_rename_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make(0)
    first = save(tmp_path, 1, model, opt)

    def no_space(src: object, dst: object) -> None:  # simulates the disk only
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert find_latest(tmp_path) == first


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    model, opt = make(0)
    save(tmp_path, 5, model, opt)
    model_b, opt_b = make(1)
    path = save(tmp_path, 5, model_b, opt_b, trainer_state={"step": 5, "second": True})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    model2, _ = make(2)
    loaded = load_toy_checkpoint(path, model2, None, sharded=False)
    assert loaded.trainer_state["second"] is True
    assert_same_params(model_b, model2)


def test_crash_between_renames_keeps_old_discoverable(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save(tmp_path, 5, model, opt)
    old = path.with_name(path.name + ".old")
    os.replace(path, old)  # state after "move old aside", before "move new in"
    (tmp_path / "checkpoints" / "step_00000005.tmp").mkdir()
    assert find_latest(tmp_path) == old
    save(tmp_path, 6, model, opt)  # the next save cleans the leftovers up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005.old", "step_00000006"]


# --------------------------------------------------------------- kill -9 loop


@pytest.mark.slow
def test_sigkill_during_save_never_corrupts(tmp_path: Path) -> None:
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steps, interrupted = [], 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(WORKERS), "save_loop", str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=REPO)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "save loop produced no checkpoint in 60 s"
            assert proc.stdout.readline().startswith(b"saved"), proc.stderr.read().decode()
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.kill()
            proc.wait()
        ckpt_dir = tmp_path / "checkpoints"
        interrupted += any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir())
        latest = find_latest(tmp_path)
        assert latest is not None
        step = read_meta(latest)["step"]
        model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
        opt = torch.optim.AdamW(model.parameters())
        loaded = load_toy_checkpoint(latest, model, opt, sharded=False)
        assert loaded.trainer_state == {"step": step} and loaded.rank_state == {"step": step}
        assert all(bool((p == step).all()) for p in model.parameters())  # every file from the same save
        assert all(bool((s["exp_avg"] == step).all()) for s in opt.state_dict()["state"].values())
        steps.append(step)
    assert steps == sorted(steps) and steps[-1] > steps[0]
    print(f"kill steps {steps}, {interrupted} kills left a partial .tmp")


# ------------------------------------------------------------------ retention


def test_retention_keeps_last_best_and_newest(tmp_path: Path) -> None:
    model, opt = make(0)
    ckpts = tmp_path / "checkpoints"
    stale = ckpts / "step_00000099.tmp"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    for step, loss in zip([1, 2, 3, 4, 5], [3.0, 1.0, 2.0, 4.0, float("nan")]):
        save(tmp_path, step, model, opt, val_loss=loss, keep_last=2, keep_best=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]
    assert read_meta(ckpts / "step_00000005")["val_loss"] is None  # NaN is stored as null, never "best"
    # Resumed from an older checkpoint: the fresh save is kept even though two newer steps exist.
    save(tmp_path, 3, model, opt, val_loss=5.0, keep_last=2, keep_best=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]
    save(tmp_path, 6, model, opt, keep_last=1, keep_best=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000006"]


# ------------------------------------------------------------------ discovery


def test_find_latest_and_resolve(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_latest(empty) is None and find_latest(tmp_path / "missing") is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_checkpoint(empty)
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    run = tmp_path / "run"
    model, opt = make(0)
    save(run, 1, model, opt)
    c2 = save(run, 2, model, opt)
    c3 = save(run, 3, model, opt)
    for p in (run, run / "checkpoints", c2, c2 / "model.safetensors", str(c3)):
        assert find_latest(p) == (c2 if "00000002" in str(p) else c3)
    (run / "checkpoints" / "step_00000009.tmp").mkdir()  # interrupted saves are ignored
    (c3 / "COMPLETE").unlink()  # incomplete
    assert find_latest(run) == c2 and find_latest(c3) is None
    with pytest.raises(UserError, match="COMPLETE is missing"):
        resolve_checkpoint(c3)
    (c2 / "meta.json").write_text("{not json")
    assert find_latest(run) == run / "checkpoints" / "step_00000001"
    with pytest.raises(UserError, match=r"could not read .*meta.json"):
        load_toy_checkpoint(c2, model, None, sharded=False)


# ------------------------------------------------------------------ safety and corrupt files


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_does_not_execute(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save(tmp_path, 1, model, opt)
    marker = tmp_path / "pwned"
    torch.save({"step": _Payload(marker)}, path / "trainer.pt")
    with pytest.raises(UserError, match=r"could not read .*trainer\.pt"):
        load_toy_checkpoint(path, model, opt, sharded=False)
    assert not marker.exists()
    torch.load(path / "trainer.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_malicious_dcp_metadata_does_not_execute(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save(tmp_path, 1, model, opt)
    (path / "model.safetensors").unlink()
    (path / "dcp").mkdir()
    marker = tmp_path / "pwned"
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match=r"could not read the sharded checkpoint .*\.metadata.*not allowed"):
        load_model_state(path)
    assert not marker.exists()


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save(tmp_path, 1, model, opt)
    good = {f.name: f.read_bytes() for f in path.iterdir()}

    st = path / "model.safetensors"
    st.write_bytes(good["model.safetensors"][: len(good["model.safetensors"]) // 2])
    with pytest.raises(UserError, match=r"could not read .*model\.safetensors: it is truncated or corrupt"):
        load_toy_checkpoint(path, model, opt, sharded=False)
    st.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match=r"model\.safetensors"):
        load_model_state(path)
    st.write_bytes(good["model.safetensors"])

    for name in ("optimizer.pt", "trainer.pt", "rank_00000.pt"):
        (path / name).write_bytes(good[name][:50])
        with pytest.raises(UserError, match=rf"could not read .*{name.replace('.', '[.]')}.*truncated"):
            load_toy_checkpoint(path, model, opt, sharded=False)
        (path / name).write_bytes(good[name])
    load_toy_checkpoint(path, model, opt, sharded=False)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_toy_checkpoint(foreign, model, None, sharded=False)
    (path / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a gpt2 checkpoint meta file"):
        read_meta(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    model, opt = make(0, n_embd=16)
    save(tmp_path, 1, model, opt)
    other, other_opt = make(0, n_embd=32)
    with pytest.raises(UserError, match=r"'transformer\.wte\.weight' has shape \(32, 16\) in the checkpoint but "
                                        r"\(32, 32\) in the model"):
        load_toy_checkpoint(tmp_path, other, other_opt, sharded=False)
    deeper, _ = make(0, n_layer=3)
    with pytest.raises(UserError, match=r"no tensor 'transformer\.h\.2\.weight'"):
        load_toy_checkpoint(tmp_path, deeper, None, sharded=False)


# ------------------------------------------------------------------ FSDP2


@pytest.mark.slow
def test_fsdp2_sharded_save_load_on_two_and_one_ranks(tmp_path: Path) -> None:
    proc = run_script("fsdp", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(tmp_path / "result.pt", weights_only=True)
    for k in res["ref1"]:  # world size 2 -> 2: weights and optimizer state
        torch.testing.assert_close(res["loaded1"][k], res["ref1"][k], rtol=0, atol=0)
        torch.testing.assert_close(res["got2"][k], res["ref2"][k])
    for r in (0, 1):
        assert torch.load(tmp_path / f"rank_state{r}.pt", weights_only=True) == {"rank": r}
    ckpt = find_latest(tmp_path / "run")
    assert ckpt is not None and (ckpt / "dcp").is_dir() and not (ckpt / "model.safetensors").exists()
    meta = read_meta(ckpt)
    assert meta["sharded"] is True and meta["world_size"] == 2

    # World size 1, no process group: the full state dict, and a resume into a plain model + optimizer.
    sd = load_model_state(ckpt)
    assert set(sd) == set(res["ref1"])
    for k in sd:
        torch.testing.assert_close(sd[k], res["ref1"][k], rtol=0, atol=0)
    model, opt = make(7)
    loaded = load_toy_checkpoint(ckpt, model, opt, sharded=True)
    assert loaded.step == 1 and loaded.rank_state is None  # saved at world size 2: per-rank state does not apply
    train_step(model, opt, 2)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, res["ref2"][k])
    wrong, _ = make(0, n_embd=32)
    with pytest.raises(UserError, match=r"'transformer\.wte\.weight' has shape \(32, 16\) in the checkpoint"):
        load_toy_checkpoint(ckpt, wrong, None, sharded=True)


# ------------------------------------------------------------------ preemption


def test_preemption_first_signal_requests_second_kills() -> None:
    proc = run_script("signals", timeout=60)
    assert "requested=True signal=SIGUSR1 any=True" in proc.stdout
    assert "still alive" not in proc.stdout
    assert proc.returncode == -signal.SIGTERM
    assert proc.stderr.count("SIGUSR1 received; will save a checkpoint") == 1
    assert "second SIGTERM received" in proc.stderr


def test_preemption_uninstall_restores_and_thread_is_noop() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGUSR1) == handler._handle
    assert signal.getsignal(signal.SIGTERM) == before and not handler.requested
    caught: list[Warning] = []

    def in_thread() -> None:
        import warnings

        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            PreemptionHandler().install()
        caught.extend(x.message for x in w)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert any("main thread" in str(m) for m in caught)
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------ retention under SIGKILL


CHECKPOINT_FILES = ("meta.json", "model.safetensors", "optimizer.pt", "trainer.pt", "rank_00000.pt")


@pytest.mark.slow
def test_sigkill_during_retention_never_leaves_a_complete_but_partial_checkpoint(tmp_path: Path) -> None:
    """Kill the save loop at random moments (mostly inside retention's slow deletion of the previous
    checkpoint): no ``step_*`` dir with COMPLETE may ever miss a file, and a manager started on the
    dir afterwards removes the half-deleted leftovers."""
    from gpt2.checkpoint.format import STEP_DIR
    from gpt2.checkpoint.manager import CheckpointManager
    from gpt2.config import CheckpointConfig
    from tests.helpers import DictState

    worker = REPO / "tests" / "workers" / "retention_loop.py"
    rng = random.Random(0)
    step, leftovers_seen = 1, 0
    for attempt in range(16):  # at least 4 kills, and on until one has landed inside a deletion (timing varies)
        if attempt >= 4 and leftovers_seen:
            break
        proc = subprocess.Popen([sys.executable, str(worker), str(tmp_path), str(step), "3000"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout is not None
        for _ in range(2):  # the second save deletes the first one's padded dir
            line = proc.stdout.readline()
            assert line.startswith("saved"), line
            step = int(line.split()[1]) + 1
        time.sleep(rng.uniform(0.0, 0.05))  # the next save + its deletion of 3000 files: ~40 ms when idle
        proc.kill()
        proc.wait()
        names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
        leftovers_seen += any(n.endswith(".deleting") for n in names)
        for p in (tmp_path / "checkpoints").iterdir():
            if STEP_DIR.match(p.name) and (p / "COMPLETE").exists():
                missing = [f for f in CHECKPOINT_FILES if not (p / f).exists()]
                assert not missing, f"{p.name} has COMPLETE but lacks {missing} (all: {sorted(names)})"
        assert find_latest(tmp_path) is not None
    assert leftovers_seen, "no kill landed inside a deletion; the test proved nothing"
    model, opt = make(0)
    CheckpointManager(tmp_path, CheckpointConfig(), max_steps=1, model=model, optimizer=opt, trainer=DictState(),
                      rank=DictState(), record={})
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith((".deleting", ".tmp"))]


def test_safetensors_alias_to_a_missing_key_is_a_user_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, opt = make(0)
    path = save(tmp_path, 1, model, opt)
    tensors = load_file(path / "model.safetensors")
    save_file(tensors, path / "model.safetensors",
              metadata={"format": "pt", "aliases": json.dumps({"lm_head.weight": "transformer.nope"})})
    with pytest.raises(UserError, match=r"ties 'lm_head\.weight' to 'transformer\.nope', but the file has no "
                                        r"tensor 'transformer\.nope'"):
        load_toy_checkpoint(tmp_path, make(1)[0], None, sharded=False)
