"""gpt2.generate.sampling: KV-cached sampling equals full recompute and HF's greedy generate; top-k/top-p sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2.errors import UserError
from gpt2.generate.sampling import generate, sample_next
from gpt2.model.gpt import GPT
from tests.helpers import tiny_model


def full_recompute(model: GPT, idx: torch.Tensor, n: int, generator: torch.Generator, **kw) -> torch.Tensor:
    """Reference sampler without a cache: re-run the whole sequence for every token."""
    with torch.no_grad():
        for _ in range(n):
            nxt = sample_next(model(idx).logits[:, -1], generator=generator, **kw)
            idx = torch.cat([idx, nxt], dim=1)
    return idx


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=10),
                                dict(temperature=1.3, top_p=0.9), dict(top_k=20, top_p=0.5)])
def test_cached_sampling_equals_full_recompute(kw: dict) -> None:
    model = tiny_model().double()  # fp64 so cache/no-cache rounding cannot flip a sample
    idx = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(0))
    got = generate(model, idx, 30, generator=torch.Generator().manual_seed(42), **kw)
    want = full_recompute(model, idx, 30, torch.Generator().manual_seed(42), **kw)
    assert got.shape == (3, 37)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_greedy_equals_hf_generate(tiny_hf_dir: Path) -> None:
    import transformers

    from gpt2.model.hf import load_pretrained

    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    ours = load_pretrained(str(tiny_hf_dir))
    prompt = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=50,
                           min_new_tokens=50, pad_token_id=50256)
    got = generate(ours, prompt, 50, temperature=0.0)
    assert got.shape == want.shape == (2, 59)
    assert got.tolist() == want.tolist()


def test_sample_next_top_k_and_top_p_sets() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_p=0.8, generator=g).unique().tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.81, generator=g).unique().tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_k=3, generator=g).unique().tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_p=0.01, generator=g).unique().tolist()) == {0}
    assert set(sample_next(logits, generator=g).unique().tolist()) == {0, 1, 2, 3}
    assert sample_next(logits[:1], temperature=0.0).tolist() == [[0]]


def test_eos_on_token_and_limits() -> None:
    model = tiny_model(n_positions=32)
    idx = torch.randint(0, 101, (2, 4))
    seen: list[torch.Tensor] = []
    out = generate(model, idx, 10, temperature=0.0, on_token=seen.append)
    assert len(seen) == 10 and torch.equal(torch.cat(seen, dim=1), out[:, 4:])
    eos = int(out[0, 6])  # the third greedy token of row 0 becomes "end of text"
    stopped = generate(model, idx, 10, temperature=0.0, eos_token=eos)
    assert stopped.size(1) <= 14 and stopped[0, 6] == eos
    assert (stopped[0, 6:] == eos).all()
    with pytest.raises(UserError, match=r"prompt of 4 tokens \+ max_new_tokens=29 = 33 exceeds n_positions=32"):
        generate(model, idx, 29)
    assert generate(model, idx, 28).shape == (2, 32)
    assert model.training is False
