"""gpt2.checkpoint.io and the manager's saves: round trips of model, optimizer, trainer and rank state, tied
weights, failed saves that keep earlier checkpoints, corrupt and malicious files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2.checkpoint.format import load_model_state, read_meta
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.errors import UserError
from gpt2.train.rng import capture_rng_state
from tests.helpers import MaliciousPickle, load_toy_checkpoint, save_toy
from tests.workers.tiny_lm import make, train_step


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_round_trip_model_optimizer_trainer_rank_state(tmp_path: Path) -> None:
    model, opt = make(0)
    train_step(model, opt, 1)
    trainer_state = {"step": 7, "tokens_seen": 1234, "best_val_loss": 2.5, "wandb_run_id": "abc",
                     "scheduler": {"last_epoch": 7, "base_lrs": [0.01]}, "scaler": {"scale": torch.tensor(2.0)}}
    rank_state = {"data_pos": 42, "rng": capture_rng_state()}
    path = save_toy(tmp_path, 7, model, opt, trainer_state=trainer_state, rank_state=rank_state, val_loss=2.5,
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
    path = save_toy(tmp_path, 1, model, opt)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    sd = load_model_state(path)
    assert set(sd) == set(model.state_dict())
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    assert read_meta(path)["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_wrappers_are_unwrapped(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, opt = make(0)
        ddp = DDP(model)
        wrapped = torch.compile(ddp)  # keys would be _orig_mod.module.*
        assert all(k.startswith("_orig_mod.module.") for k in wrapped.state_dict())
        path = save_toy(tmp_path / "run", 3, wrapped, opt)
        keys = set(load_model_state(path))
        assert keys == set(model.state_dict())
        model2, opt2 = make(5)
        load_toy_checkpoint(path, DDP(model2), opt2, sharded=False)
        assert_same_params(model, model2)
        assert read_meta(path)["world_size"] == 1
    finally:
        dist.destroy_process_group()


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    model, opt = make(0)
    first = save_toy(tmp_path, 1, model, opt)
    with pytest.raises(Exception, match="lambda|pickle"):
        save_toy(tmp_path, 2, model, opt, trainer_state={"bad": lambda: 0})
    assert find_checkpoint(tmp_path).path == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    load_toy_checkpoint(tmp_path, make(1)[0], None, sharded=False)


def test_disk_full_on_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root or no CAP_SYS_ADMIN)")
    try:
        model, opt = make(0)
        first = save_toy(mnt, 1, model, opt)
        big = {"blob": torch.zeros(512 * 1024)}  # 2 MiB: does not fit
        with pytest.raises(UserError, match=r"could not write checkpoint to .*step_00000002.*No space left.*intact"):
            save_toy(mnt, 2, model, opt, rank_state=big)
        assert sorted(p.name for p in (mnt / "checkpoints").iterdir()) == ["step_00000001"]
        assert find_checkpoint(mnt).path == first
        load_toy_checkpoint(mnt, make(1)[0], make(1)[1], sharded=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_unwritable_root_is_user_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    model, opt = make(0)
    with pytest.raises(UserError, match=r"could not write checkpoint to .*afile.*earlier checkpoints are intact"):
        save_toy(tmp_path / "afile" / "run", 1, model, opt)


def test_enospc_at_rename_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make(0)
    first = save_toy(tmp_path, 1, model, opt)

    def no_space(src: object, dst: object) -> None:  # simulates the disk only
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        save_toy(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert find_checkpoint(tmp_path).path == first


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    model, opt = make(0)
    save_toy(tmp_path, 5, model, opt)
    model_b, opt_b = make(1)
    path = save_toy(tmp_path, 5, model_b, opt_b, trainer_state={"step": 5, "second": True})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    model2, _ = make(2)
    loaded = load_toy_checkpoint(path, model2, None, sharded=False)
    assert loaded.trainer_state["second"] is True
    assert_same_params(model_b, model2)


def test_malicious_pickle_does_not_execute(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save_toy(tmp_path, 1, model, opt)
    marker = tmp_path / "pwned"
    torch.save({"step": MaliciousPickle(marker)}, path / "trainer.pt")
    with pytest.raises(UserError, match=r"could not read .*trainer\.pt"):
        load_toy_checkpoint(path, model, opt, sharded=False)
    assert not marker.exists()
    torch.load(path / "trainer.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save_toy(tmp_path, 1, model, opt)
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
    save_toy(tmp_path, 1, model, opt)
    other, other_opt = make(0, n_embd=32)
    with pytest.raises(UserError, match=r"'transformer\.wte\.weight' has shape \(32, 16\) in the checkpoint but "
                                        r"\(32, 32\) in the model"):
        load_toy_checkpoint(tmp_path, other, other_opt, sharded=False)
    deeper, _ = make(0, n_layer=3)
    with pytest.raises(UserError, match=r"no tensor 'transformer\.h\.2\.weight'"):
        load_toy_checkpoint(tmp_path, deeper, None, sharded=False)


def test_safetensors_alias_to_a_missing_key_is_a_user_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, opt = make(0)
    path = save_toy(tmp_path, 1, model, opt)
    tensors = load_file(path / "model.safetensors")
    save_file(tensors, path / "model.safetensors",
              metadata={"format": "pt", "aliases": json.dumps({"lm_head.weight": "transformer.nope"})})
    with pytest.raises(UserError, match=r"ties 'lm_head\.weight' to 'transformer\.nope', but the file has no "
                                        r"tensor 'transformer\.nope'"):
        load_toy_checkpoint(tmp_path, make(1)[0], None, sharded=False)
