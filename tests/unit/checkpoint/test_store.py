"""gpt2.checkpoint.store and handle.find_checkpoint: discovery of the newest complete checkpoint, retention,
and the leftovers of interrupted saves."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gpt2.checkpoint.format import read_meta
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.checkpoint.store import remove_interrupted
from gpt2.errors import UserError
from tests.helpers import DictState, load_toy_checkpoint, save_toy
from tests.workers.tiny_lm import make


def test_crash_between_renames_keeps_old_discoverable(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save_toy(tmp_path, 5, model, opt)
    old = path.with_name(path.name + ".old")
    os.replace(path, old)  # state after "move old aside", before "move new in"
    (tmp_path / "checkpoints" / "step_00000005.tmp").mkdir()
    assert find_checkpoint(tmp_path).path == old
    save_toy(tmp_path, 6, model, opt)  # the next save_toy cleans the leftovers up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005.old", "step_00000006"]


def test_a_new_manager_touches_no_files_and_the_start_up_clean_up_keeps_a_live_old_copy(tmp_path: Path) -> None:
    from gpt2.checkpoint.manager import CheckpointManager
    from gpt2.config import CheckpointConfig

    model, opt = make(0)
    path = save_toy(tmp_path, 5, model, opt)
    os.replace(path, path.with_name(path.name + ".old"))  # its replacement never arrived: the live copy
    ckpts = tmp_path / "checkpoints"
    for leftover in ("step_00000004.deleting", "step_00000006.tmp"):
        (ckpts / leftover).mkdir()
    before = sorted(p.name for p in ckpts.iterdir())
    CheckpointManager(tmp_path, CheckpointConfig(), max_steps=10, model=model, optimizer=opt, trainer=DictState(),
                      rng=DictState(), record={})
    assert sorted(p.name for p in ckpts.iterdir()) == before
    assert remove_interrupted(tmp_path) == [ckpts / "step_00000004.deleting", ckpts / "step_00000006.tmp"]
    assert [p.name for p in ckpts.iterdir()] == ["step_00000005.old"]
    assert find_checkpoint(tmp_path).step == 5


def test_retention_keeps_last_best_and_newest(tmp_path: Path) -> None:
    model, opt = make(0)
    ckpts = tmp_path / "checkpoints"
    stale = ckpts / "step_00000099.tmp"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    for step, loss in zip([1, 2, 3, 4, 5], [3.0, 1.0, 2.0, 4.0, float("nan")]):
        save_toy(tmp_path, step, model, opt, val_loss=loss, keep_last=2, keep_best=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]
    assert read_meta(ckpts / "step_00000005")["val_loss"] is None  # NaN is stored as null, never "best"
    # Resumed from an older checkpoint: the fresh save is kept even though two newer steps exist.
    save_toy(tmp_path, 3, model, opt, val_loss=5.0, keep_last=2, keep_best=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]
    save_toy(tmp_path, 6, model, opt, keep_last=1, keep_best=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000006"]


def test_find_checkpoint_from_what_a_user_typed(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_checkpoint(empty, required=False) is None
    assert find_checkpoint(tmp_path / "missing", required=False) is None
    with pytest.raises(UserError, match="no complete checkpoint.*Check the path or start without resume"):
        find_checkpoint(empty)
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")
    run = tmp_path / "run"
    model, opt = make(0)
    save_toy(run, 1, model, opt)
    c2 = save_toy(run, 2, model, opt)
    c3 = save_toy(run, 3, model, opt)
    for p in (run, run / "checkpoints", c2, c2 / "model.safetensors", str(c3)):
        found = find_checkpoint(p)
        assert found.path == (c2 if "00000002" in str(p) else c3) and found.meta == read_meta(found.path)
    (run / "checkpoints" / "step_00000009.tmp").mkdir()  # interrupted saves are ignored
    (c3 / "COMPLETE").unlink()  # incomplete
    assert find_checkpoint(run).path == c2 and find_checkpoint(c3, required=False) is None
    with pytest.raises(UserError, match="COMPLETE is missing"):
        find_checkpoint(c3)
    (c2 / "meta.json").write_text("{not json")
    assert find_checkpoint(run).path == run / "checkpoints" / "step_00000001"
    with pytest.raises(UserError, match=r"could not read .*meta.json"):
        load_toy_checkpoint(c2, model, None, sharded=False)
