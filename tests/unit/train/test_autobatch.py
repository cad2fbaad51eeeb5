"""gpt2.train.autobatch: micro_batch_size=auto searches on CUDA and refuses other devices with one error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2.config import ModelConfig, PrecisionConfig, TrainConfig, validate
from gpt2.errors import ConfigError, UserError
from gpt2.model.gpt import GPT
from gpt2.train.autobatch import candidate_sizes, fits_in_memory, largest_fitting, resolve_micro_batch_size
from gpt2.train.launch import train
from tests.helpers import compose_train

V = 101


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=V), **kw})


def test_auto_micro_batch_search() -> None:
    assert candidate_sizes(524288, 1024, 1) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert candidate_sizes(12 * 64, 64, 2) == [1, 2, 3, 6]
    probed: list[int] = []

    def fits(b: int) -> bool:
        probed.append(b)
        return b <= 48

    assert largest_fitting(candidate_sizes(524288, 1024, 1), fits) == 32
    assert len(probed) <= 4  # binary search, not one probe per candidate
    assert largest_fitting([1, 2, 4], lambda b: False) is None
    assert largest_fitting([1, 2, 4], lambda b: True) == 4


@pytest.mark.slow
def test_auto_micro_batch_config_and_cpu_error(tmp_path: Path, base_overrides: list[str]) -> None:
    cfg = compose_train([*base_overrides, "micro_batch_size=auto", "total_batch_tokens=1024", "block_size=64"])
    validate(cfg)  # auto passes start-up validation; the batch must still divide by block_size * world
    with pytest.raises(ConfigError, match="total_batch_tokens=1000 is not divisible by block_size"):
        validate(compose_train([*base_overrides, "micro_batch_size=auto", "total_batch_tokens=1000",
                                "block_size=64"]))
    with pytest.raises(ConfigError, match="micro_batch_size='many' must be a number greater than 0 or auto"):
        validate(compose_train([*base_overrides, "micro_batch_size=many"]))
    with pytest.raises(UserError, match="micro_batch_size=auto needs a CUDA device.*micro_batch_size=8"):
        train(cfg, tmp_path / "api")


@pytest.mark.cuda
def test_auto_micro_batch_on_cuda() -> None:
    device = torch.device("cuda")
    cfg = TrainConfig(model=tiny().for_device("cuda"), micro_batch_size="auto", total_batch_tokens=64 * 64,
                      block_size=64, precision=PrecisionConfig(name="bf16"))
    before = torch.cuda.get_rng_state(device)
    built: list[GPT] = []
    best = resolve_micro_batch_size(cfg, lambda: built.append(GPT(cfg.model)) or built[-1], device, world_size=1)
    assert best == 64  # a tiny model fits the whole step
    assert torch.equal(torch.cuda.get_rng_state(device), before)
    model = built[0]
    assert all(p.grad is None for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    assert not fits_in_memory(model, 1, 64, device, "bf16", reserve_bytes=total)  # nothing left: refused
