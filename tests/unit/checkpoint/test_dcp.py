"""gpt2.checkpoint.dcp: sharded (FSDP2) checkpoints saved on two ranks and loaded on two and on one, and DCP
metadata read without executing pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from gpt2.checkpoint.format import load_model_state, read_meta
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.errors import UserError
from tests.helpers import MaliciousPickle, load_toy_checkpoint, run_checkpoint_worker, save_toy
from tests.workers.tiny_lm import make, train_step


def test_malicious_dcp_metadata_does_not_execute(tmp_path: Path) -> None:
    model, opt = make(0)
    path = save_toy(tmp_path, 1, model, opt)
    (path / "model.safetensors").unlink()
    (path / "dcp").mkdir()
    marker = tmp_path / "pwned"
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(MaliciousPickle(marker)))
    with pytest.raises(UserError, match=r"could not read the sharded checkpoint .*\.metadata.*not allowed"):
        load_model_state(path)
    assert not marker.exists()


@pytest.mark.slow
def test_fsdp2_sharded_save_load_on_two_and_one_ranks(tmp_path: Path) -> None:
    proc = run_checkpoint_worker("fsdp", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(tmp_path / "result.pt", weights_only=True)
    for k in res["ref1"]:  # world size 2 -> 2: weights and optimizer state
        torch.testing.assert_close(res["loaded1"][k], res["ref1"][k], rtol=0, atol=0)
        torch.testing.assert_close(res["got2"][k], res["ref2"][k])
    for r in (0, 1):
        assert torch.load(tmp_path / f"rank_state{r}.pt", weights_only=True) == {"rank": r}
    ckpt = find_checkpoint(tmp_path / "run").path
    assert (ckpt / "dcp").is_dir() and not (ckpt / "model.safetensors").exists()
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
