"""gpt2.runtime.determinism: the switch that makes compiled CPU kernels repeat bit for bit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gpt2.runtime.determinism import set_deterministic


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Two CPU threads (the atomic adds of Inductor's parallel loops race only with more than one), and
    PyTorch's defaults back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    set_deterministic(False)


def test_compiled_embedding_backward_repeats_bit_for_bit_and_matches_eager(two_threads: None) -> None:
    """The token embedding's backward, `index_put(accumulate=True)` over repeated ids, compiled: Inductor's
    parallel atomic adds sum the rows of a repeated id in a different order from call to call (off, 14 of 20
    calls differed on a 2-core machine); with the switch on every call gives eager's bits."""
    set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled() and torch._inductor.config.deterministic

    def embedding_grad(ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros(64, 32).index_put_((ids,), grad, accumulate=True)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4096,), generator=gen)  # each id about 64 times
    grad = torch.randn(4096, 32, generator=gen)
    compiled = torch.compile(embedding_grad)
    eager = embedding_grad(ids, grad)
    for _ in range(20):
        assert torch.equal(compiled(ids, grad), eager)


def test_off_restores_pytorchs_defaults(two_threads: None) -> None:
    set_deterministic(True)
    assert not torch.utils.deterministic.fill_uninitialized_memory  # the NaN fill cost 20% of the tokens/s
    set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch._inductor.config.deterministic
    assert torch.utils.deterministic.fill_uninitialized_memory
