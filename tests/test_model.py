"""gpt2.model.gpt: parameter counts, init, causality, KV cache, loss, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.model.gpt import GPT, model_from_state_dict
from gpt2.model.presets import model_preset


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=101), **kw})


@pytest.mark.parametrize("name,expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_param_counts_match_hf(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = GPT(model_preset(name))
    assert model.num_params() == expected  # = transformers GPT2LMHeadModel(...).num_parameters()
    cfg = model.cfg
    non_embedding = expected - cfg.n_positions * cfg.n_embd
    assert model.num_params(exclude_embeddings=True) == non_embedding
    hs = cfg.n_embd // cfg.n_head
    assert model.flops_per_token(1024) == 6 * non_embedding + 12 * cfg.n_layer * cfg.n_head * hs * 1024


def test_structure_init_and_tying() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=256, n_positions=128, vocab_size=1000)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    keys = set(model.state_dict())
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.bias", "lm_head.weight",
                "transformer.h.3.ln_1.weight", "transformer.h.3.attn.c_attn.weight", "transformer.h.3.attn.c_proj.bias",
                "transformer.h.3.ln_2.bias", "transformer.h.3.mlp.c_fc.weight", "transformer.h.3.mlp.c_proj.weight"):
        assert key in keys
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in keys)  # no causal-mask buffers
    h = model.transformer.h[0]
    assert h.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert h.attn.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert h.mlp.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert h.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(h.attn.c_attn.bias) == 0 and torch.count_nonzero(h.ln_1.bias) == 0
    assert torch.equal(h.ln_1.weight, torch.ones(cfg.n_embd))


def test_no_bias_model() -> None:
    model = GPT(tiny(bias=False))
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    assert model(torch.randint(0, 101, (1, 5))).logits.shape == (1, 5, 101)


def test_padded_vocab_logits_and_loss() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(pad_vocab_multiple=64))
    assert model.transformer.wte.weight.shape == (128, 64)
    idx = torch.randint(0, 101, (2, 9))
    out = model(idx, targets=idx)
    assert out.logits.shape == (2, 9, 101)  # padded rows are never returned, so never sampled
    assert out.loss is not None and torch.isfinite(out.loss)


def test_loss_ignores_minus_one() -> None:
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 101, (2, 8))
    targets = torch.randint(0, 101, (2, 8))
    targets[0, :3] = -1
    out = model(idx, targets=targets)
    keep = targets != -1
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    assert model(idx).loss is None


def test_causality() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 101, (1, 16))
    changed = idx.clone()
    t = 9
    changed[0, t] = (idx[0, t] + 1) % 101
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_kv_cache_matches_full_recompute() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 101, (3, 20))
    full = model(idx).logits  # (3, 20, V)
    with torch.no_grad():
        # prefill 8, then one token at a time
        cache = model.new_kv_cache(3, 20)
        got = [model(idx[:, :8], kv_cache=cache).logits[:, -1]]
        for t in range(8, 20):
            got.append(model(idx[:, t : t + 1], kv_cache=cache).logits[:, -1])
        assert cache.pos == 20
        torch.testing.assert_close(torch.stack(got, dim=1), full[:, 7:], rtol=1e-5, atol=1e-5)
        # chunks after cached tokens (explicit mask path)
        cache.reset()
        model(idx[:, :5], kv_cache=cache)
        chunk = model(idx[:, 5:12], kv_cache=cache).logits
        torch.testing.assert_close(chunk[:, -1], full[:, 11], rtol=1e-5, atol=1e-5)
        last = model(idx[:, 12:20], kv_cache=cache).logits
        torch.testing.assert_close(last[:, -1], full[:, 19], rtol=1e-5, atol=1e-5)
        with pytest.raises(UserError, match="KV cache holds only 20"):
            model(idx[:, :1], kv_cache=cache)
        with pytest.raises(UserError, match="batch size 2"):
            model(idx[:2, :1], kv_cache=model.new_kv_cache(3, 20))


def test_too_long_sequence_is_refused() -> None:
    model = GPT(tiny(n_positions=16))
    with pytest.raises(UserError, match="Cannot forward sequence of length 17, n_positions is only 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="exceeds n_positions=16"):
        model.new_kv_cache(1, 17)


def test_training_forward_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.1))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = torch.randint(0, 101, (2, 8))
    out = compiled(idx, targets=idx)
    out.loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_model_from_state_dict_roundtrip_and_errors() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # as a checkpoint may store it
    copy = model_from_state_dict(model.cfg, state).eval()
    assert copy.lm_head.weight is copy.transformer.wte.weight
    idx = torch.randint(0, 101, (1, 10))
    torch.testing.assert_close(copy(idx).logits, model(idx).logits, rtol=0, atol=0)
    bad = dict(state, **{"transformer.wpe.weight": torch.zeros(32, 64)})
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight.*\(32, 64\).*\(64, 64\)"):
        model_from_state_dict(model.cfg, bad)
