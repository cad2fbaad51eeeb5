"""gpt2.model.gpt: parameter counts, init, causality, the KV cache, the loss, errors, and the padded vocabulary
(it never leaks into logits, sampling, state dicts or checkpoints; the loss equals the reference)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from gpt2.config import ModelConfig
from gpt2.errors import ConfigError, UserError
from gpt2.generate.sampling import generate
from gpt2.model.gpt import GPT, model_from_state_dict
from gpt2.model.hf import gpt_to_hf
from gpt2.model.presets import model_preset
from gpt2.runtime.device import autocast
from tests.helpers import save_model_checkpoint

V = 101


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=V), **kw})


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


def twins() -> tuple[GPT, GPT]:
    """A model with its vocabulary padded to 128 rows and an unpadded one holding the same weights."""
    torch.manual_seed(0)
    padded = GPT(tiny(pad_vocab_multiple=64))
    plain = GPT(tiny(pad_vocab_multiple=1))
    plain.load_state_dict(padded.state_dict())
    return padded, plain


def test_pad_default_resolves_per_device() -> None:
    cfg = ModelConfig(vocab_size=50257)
    assert cfg.pad_vocab_multiple is None and cfg.padded_vocab_size == 50257
    assert cfg.for_device("cuda").padded_vocab_size == 50304
    assert cfg.for_device("cpu").padded_vocab_size == 50257
    assert ModelConfig(vocab_size=50257, pad_vocab_multiple=1).for_device("cuda").padded_vocab_size == 50257
    with pytest.raises(ConfigError, match="model.pad_vocab_multiple=0 must be greater than 0"):
        ModelConfig(pad_vocab_multiple=0).check()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("pad", [1, 64])
def test_loss_matches_the_upcast_reference(precision: str, pad: int) -> None:
    """The loss on (B, T, Vp) logits, not upcast by us, equals the former F.cross_entropy(logits[..., :V].float())."""
    torch.manual_seed(0)
    model = GPT(tiny(pad_vocab_multiple=pad))
    idx = torch.randint(0, V, (3, 17))
    targets = torch.randint(0, V, (3, 17))
    targets[1, :5] = -1
    with autocast(torch.device("cpu"), precision):
        out = model(idx, targets)
    assert out.logits.shape == (3, 17, V)
    assert out.logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    reference = F.cross_entropy(out.logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-6)
    assert out.loss.dtype == torch.float32


def test_padded_vocab_never_leaks(tmp_path: Path) -> None:
    from gpt2.checkpoint.handle import find_checkpoint

    padded, plain = twins()
    assert padded.transformer.wte.weight.shape == (128, 64)
    assert torch.count_nonzero(padded.transformer.wte.weight[V:]) == 0
    state = padded.state_dict()
    assert state["transformer.wte.weight"].shape == (V, 64)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]  # still tied for checkpoint code
    assert gpt_to_hf(state, padded.cfg)["transformer.wte.weight"].shape == (V, 64)

    # Same logits, loss and gradients; the padded rows get no gradient.
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    a, b = padded(idx, idx), plain(idx, idx)
    assert a.logits.shape == b.logits.shape == (2, 12, V)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    grad = padded.transformer.wte.weight.grad
    assert torch.count_nonzero(grad[V:]) == 0
    torch.testing.assert_close(grad[:V], plain.transformer.wte.weight.grad)

    # Greedy and seeded sampling pick the same tokens (never a padded id).
    for temperature in (0.0, 1.5):
        outs = [generate(m.eval(), idx[:, :4], 20, temperature=temperature,
                         generator=torch.Generator().manual_seed(3)) for m in (padded, plain)]
        assert torch.equal(outs[0], outs[1]) and int(outs[0].max()) < V

    # A checkpoint holds vocab_size rows and loads into padded or unpadded models.
    save_model_checkpoint(tmp_path, 1, padded)
    with safe_open(tmp_path / "checkpoints" / "step_00000001" / "model.safetensors", framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["transformer.wte.weight"] == (V, 64) and "lm_head.weight" not in shapes
    ckpt = find_checkpoint(tmp_path)
    cfg, loaded = ckpt.model_config, ckpt.state_dict()
    assert cfg.pad_vocab_multiple == 64
    for pad in (64, 1):
        again = model_from_state_dict(tiny(pad_vocab_multiple=pad), loaded).eval()
        assert again.lm_head.weight is again.transformer.wte.weight
        torch.testing.assert_close(again(idx).logits, plain.eval()(idx).logits)
    # An older checkpoint with the padded rows still loads.
    old = {**loaded, "transformer.wte.weight": padded.transformer.wte.weight.detach()}
    torch.testing.assert_close(model_from_state_dict(padded.cfg, old).eval()(idx).logits, plain(idx).logits)
