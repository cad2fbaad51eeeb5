"""gpt2.data.loader: windows, epochs, ranks, and a global data position that resumes at any world size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data.loader import TokenLoader
from gpt2.data.shards import TokenStream, write_shard
from gpt2.errors import UserError


@pytest.fixture
def counting_file(tmp_path: Path) -> TokenStream:
    """Token i has value i % 50000, so a row's first token tells its window (one shard)."""
    path = tmp_path / "tokens.bin"
    write_shard(path, (np.arange(10_001) % 50_000).astype(np.uint16))
    return TokenStream([path])


def test_loader_shapes_and_shift(counting_file: TokenStream) -> None:
    loader = TokenLoader(counting_file, batch_size=8, block_size=16)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.all(x[:, 0] % 16 == 0)  # windows start at multiples of block_size


def test_loader_epoch_covers_every_window_once(counting_file: TokenStream) -> None:
    loader = TokenLoader(counting_file, batch_size=7, block_size=16, seed=3)
    n = loader.n_windows
    assert n == 10_000 // 16
    starts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(n // 7)]).tolist()
    assert len(set(starts)) == len(starts)
    ordered = TokenLoader(counting_file, batch_size=5, block_size=16, shuffle=False)
    assert ordered.next_batch()[0][:, 0].tolist() == [0, 16, 32, 48, 64]
    assert starts != sorted(starts)


def _windows(loader: TokenLoader, n_batches: int) -> list[int]:
    return [int(v) // 16 for _ in range(n_batches) for v in loader.next_batch()[0][:, 0]]


def test_loader_ranks_are_disjoint_and_the_global_sequence_ignores_the_world_size(counting_file: TokenStream) -> None:
    one = _windows(TokenLoader(counting_file, batch_size=12, block_size=16, seed=1), 60)  # 720 windows: > 1 epoch
    for world in (2, 3, 4):
        ranks = [TokenLoader(counting_file, batch_size=12 // world, block_size=16, rank=r, world_size=world, seed=1)
                 for r in range(world)]
        per_rank = [_windows(loader, 60) for loader in ranks]
        assert not set(per_rank[0][:100]) & set(per_rank[1][:100])  # disjoint within an epoch
        steps = [sorted(w for r in per_rank for w in r[12 // world * i: 12 // world * (i + 1)]) for i in range(60)]
        assert steps == [sorted(one[12 * i: 12 * (i + 1)]) for i in range(60)]  # the same global batches
        assert all(loader.consumed == 720 for loader in ranks)


def test_loader_resume_gives_identical_batches(counting_file: TokenStream) -> None:
    a = TokenLoader(counting_file, batch_size=32, block_size=16, rank=1, world_size=2, seed=7)
    for _ in range(9):  # 576 windows of 625: the next batches cross into epoch 1
        a.next_batch()
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [a.next_batch() for _ in range(4)]
    assert a.epoch == 1
    b = TokenLoader(counting_file, batch_size=32, block_size=16, rank=1, world_size=2, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))
    for (xe, ye), (xb, yb) in zip(expected, (b.next_batch() for _ in range(4))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    c = TokenLoader(counting_file, batch_size=32, block_size=8, rank=1, world_size=2, seed=7)
    with pytest.raises(UserError, match="block_size=16 but now block_size=8"):
        c.load_state_dict(state)


def test_loader_resumes_at_another_world_size_with_the_next_global_windows(counting_file: TokenStream) -> None:
    two = [TokenLoader(counting_file, batch_size=8, block_size=16, rank=r, world_size=2, seed=5) for r in range(2)]
    for loader in two:
        for _ in range(30):
            loader.next_batch()
    one = TokenLoader(counting_file, batch_size=16, block_size=16, seed=5)
    one.load_state_dict(two[0].state_dict())
    reference = TokenLoader(counting_file, batch_size=16, block_size=16, seed=5)
    _windows(reference, 30)
    assert _windows(one, 20) == _windows(reference, 20)


def test_loader_resumes_the_per_rank_position_of_an_older_checkpoint(counting_file: TokenStream,
                                                                     tmp_path: Path) -> None:
    """Format 1 saved (epoch, position) in each rank's share perm[rank::world] in the rank files; read through
    the checkpoint format's upgrade, the same windows follow."""
    from gpt2.checkpoint.format import rank_file, torch_save, upgrade_trainer_state

    torch_save({"train_loader": {"epoch": 0, "position": 100, "world_size": 2, "seed": 9, "shuffle": 1,
                                 "block_size": 16, "n_windows": 625}}, tmp_path / rank_file(0))
    state = upgrade_trainer_state({"step": 3}, tmp_path)
    loader = TokenLoader(counting_file, batch_size=4, block_size=16, rank=1, world_size=2, seed=9)
    loader.load_state_dict(state["train_loader"])
    perm = np.random.default_rng(9).permutation(625)
    assert _windows(loader, 1) == perm[1::2][100:104].tolist()


def test_loader_reset_repeats_validation_batches(counting_file: TokenStream) -> None:
    val = TokenLoader(counting_file, batch_size=4, block_size=16, shuffle=False)
    first = [val.next_batch()[0] for _ in range(3)]
    val.reset()
    assert all(torch.equal(a, val.next_batch()[0]) for a in first)


def test_loader_too_small(tmp_path: Path, counting_file: TokenStream) -> None:
    small = tmp_path / "small.bin"
    write_shard(small, np.arange(10, dtype=np.uint16))
    with pytest.raises(UserError, match=r"holds 10 tokens.*block_size \+ 1 = 17"):
        TokenLoader(TokenStream([small]), batch_size=2, block_size=16)
    with pytest.raises(UserError, match="world_size=1000"):
        TokenLoader(counting_file, batch_size=2, block_size=16, world_size=1000)
