"""The ModelConfig switches (rotary positions, QK-norm, ReLU^2, RMSNorm, untied head, zero-init projections,
logit soft cap), each against an independent formula or torch's own op; their checks; checkpoints of switched
models; and the Hugging Face export's refusal of what GPT-2 cannot hold."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2.checkpoint.export import export_checkpoint
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.config import ModelConfig
from gpt2.errors import ConfigError, UserError
from gpt2.model.gpt import GPT, model_from_state_dict
from gpt2.model.hf import export_hf
from tests.helpers import compose_train, hf_logits, save_model_checkpoint

V = 101
ALL_ON = dict(position_embedding="rope", rope_base=500.0, qk_norm=True, mlp_activation="relu2", norm="rmsnorm",
              tie_embeddings=False, zero_init_proj=True, logit_softcap=3.0)
"""Every switch away from GPT-2."""


def tiny(**kw: object) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=V), **kw})


def switched_model(seed: int = 0, **kw: object) -> GPT:
    """A tiny model with every switch on, its zero-initialised projections given weights (else every block's
    output would be zero and attention, rotary included, would not reach the logits)."""
    torch.manual_seed(seed)
    model = GPT(tiny(**{**ALL_ON, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02)
    return model.eval()


# ------------------------------------------------------------------ rotary positions


def complex_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """The reference: pair j of each head, x[j] + i x[j + hs/2], times e^{i m theta_j}, theta_j = base^(-2j/hs)."""
    hs = x.size(-1)
    z = torch.view_as_complex(torch.stack(x.double().chunk(2, dim=-1), dim=-1).contiguous())  # (..., T, hs/2)
    theta = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    turned = z * torch.polar(torch.ones((), dtype=torch.float64), torch.outer(pos.double(), theta))  # (..., T, hs/2)
    return torch.cat([turned.real, turned.imag], dim=-1).to(x.dtype)  # (..., T, hs)


def reference_attention(attn: torch.nn.Module, x: torch.Tensor, pos: torch.Tensor, base: float,
                        qk_norm_eps: float | None) -> torch.Tensor:
    """Causal attention written out: q, k, v from c_attn, optional RMS norm of q and k per head, the complex
    rotation of q and k, softmax(q k^T / sqrt(hs)) with the future masked, c_proj."""
    B, T, C = x.shape
    nh = attn.n_head
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))  # (B, nh, T, hs)
    if qk_norm_eps is not None:
        q, k = (t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + qk_norm_eps) for t in (q, k))
    q, k = complex_rope(q, pos, base), complex_rope(k, pos, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // nh)  # (B, nh, T, T)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    return attn.c_proj(y)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_attention_matches_the_complex_formula(qk_norm: bool) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(position_embedding="rope", rope_base=100.0, qk_norm=qk_norm)).eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 9, 64)
    pos = torch.arange(5, 14)  # positions after 5 cached tokens
    with torch.no_grad():
        got = attn(x, model.rotary(pos))
        want = reference_attention(attn, x, pos, 100.0, 1e-5 if qk_norm else None)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # rotary sees only relative positions: shifting every position changes nothing, rotating fewer does
        torch.testing.assert_close(attn(x, model.rotary(pos - 5)), got, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(attn(x, None), got, atol=1e-4)


def test_rope_has_no_position_table_and_keeps_state_dicts_strict() -> None:
    torch.manual_seed(0)
    learned, rope = GPT(tiny()), GPT(tiny(position_embedding="rope"))
    assert "wpe" not in rope.transformer
    assert rope.num_params() == learned.num_params() - 64 * 64  # no (n_positions, C) table
    assert rope.rotary is not None and rope.rotary.cos.shape == (64, 16)  # (n_positions, hs/2)
    keys = set(rope.state_dict())
    assert keys == set(learned.state_dict()) - {"transformer.wpe.weight"}  # the tables are not saved
    copy = GPT(tiny(position_embedding="rope"))
    copy.load_state_dict(rope.state_dict(), strict=True)
    idx = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(copy.eval()(idx).logits, rope.eval()(idx).logits, rtol=0, atol=0)


# ------------------------------------------------------------------ norms, activation, head


def test_rmsnorm_matches_torch_rms_norm() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(norm="rmsnorm", layer_norm_epsilon=0.5))  # a large eps, so that using it shows
    assert not any(".ln_" in k and k.endswith("bias") for k in model.state_dict())  # RMSNorm: a weight only
    x = torch.randn(3, 5, 64) * 0.3
    for norm in (model.transformer.h[1].ln_2, model.transformer.ln_f):
        with torch.no_grad():
            norm.weight.normal_()
        want = F.rms_norm(x, (64,), weight=norm.weight, eps=0.5)
        torch.testing.assert_close(norm(x), want)
        formula = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.5) * norm.weight
        torch.testing.assert_close(norm(x), formula)


def test_relu2_matches_relu_squared() -> None:
    torch.manual_seed(0)
    mlp = GPT(tiny(mlp_activation="relu2")).transformer.h[0].mlp
    x = torch.randn(2, 7, 64)
    h = mlp.c_fc(x)
    torch.testing.assert_close(mlp.act(h), torch.relu(h) ** 2)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.relu(h) ** 2))


def test_logit_softcap_is_the_formula_on_the_logits_and_the_loss() -> None:
    torch.manual_seed(0)
    capped = GPT(tiny(logit_softcap=0.2, pad_vocab_multiple=64)).eval()  # small: the random logits reach it
    plain = GPT(tiny(pad_vocab_multiple=64)).eval()
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, V, (2, 11))
    out, ref = capped(idx, targets=idx), plain(idx)
    torch.testing.assert_close(out.logits, 0.2 * torch.tanh(ref.logits / 0.2))
    assert out.logits.abs().max() < 0.2 and ref.logits.abs().max() > 0.2
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, V), idx.reshape(-1)))


def test_qk_norm_gives_unit_rms_per_head() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(qk_norm=True, layer_norm_epsilon=1e-8)).eval()
    seen: list[torch.Tensor] = []
    for block in model.transformer.h:
        block.attn.qk_norm.register_forward_hook(lambda m, args, out: seen.append(out))
    model(torch.randint(0, V, (2, 13)))
    assert len(seen) == 4  # q and k of two blocks
    for t in seen:
        assert t.shape == (2, 2, 13, 32)  # (B, nh, T, hs)
        rms = t.pow(2).mean(-1).sqrt()  # (B, nh, T)
        torch.testing.assert_close(rms, torch.ones_like(rms))
    off = GPT(tiny()).transformer.h[0].attn.qk_norm
    x = torch.randn(2, 2, 3, 32)
    assert torch.equal(off(x), x)


def test_zero_init_proj_starts_at_zero_and_learns() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_proj=True))
    projections = {n: p for n, p in model.named_parameters() if n.endswith("c_proj.weight")}
    assert len(projections) == 4 and all(torch.count_nonzero(p) == 0 for p in projections.values())
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    idx = torch.randint(0, V, (2, 9))
    model(idx, targets=idx).loss.backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in projections.values())


def test_untied_head_is_its_own_parameter_and_training_moves_them_apart() -> None:
    torch.manual_seed(0)
    tied, untied = GPT(tiny(pad_vocab_multiple=64)), GPT(tiny(tie_embeddings=False, pad_vocab_multiple=64))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == tied.num_params() + 128 * 64  # a second (padded_vocab, C) matrix
    assert untied.num_params(exclude_embeddings=True) == tied.num_params(exclude_embeddings=True)  # same matmuls
    assert torch.count_nonzero(untied.lm_head.weight[V:]) == 0  # padded rows, as the embedding's
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.transformer.wte.weight)
    opt = torch.optim.SGD(untied.parameters(), lr=0.5)
    idx = torch.randint(0, V, (4, 16))
    for _ in range(3):
        opt.zero_grad()
        untied(idx, targets=idx).loss.backward()
        opt.step()
    gap = (untied.lm_head.weight - untied.transformer.wte.weight)[:V].abs().max()
    assert gap > 1e-3
    state = untied.state_dict()
    assert state["lm_head.weight"].shape == state["transformer.wte.weight"].shape == (V, 64)
    copy = model_from_state_dict(untied.cfg, state).eval()
    assert copy.lm_head.weight is not copy.transformer.wte.weight
    torch.testing.assert_close(copy(idx).logits, untied.eval()(idx).logits, rtol=0, atol=0)


def test_all_switches_compile_without_graph_breaks() -> None:
    model = switched_model(dropout=0.1, pad_vocab_multiple=64).train()  # padded: the loss masks soft-capped logits
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = torch.randint(0, V, (2, 8))
    compiled(idx, targets=idx).loss.backward()
    assert model.lm_head.weight.grad is not None and model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert torch.count_nonzero(model.lm_head.weight.grad[V:]) == 0


# ------------------------------------------------------------------ config: checks, names, Hydra


@pytest.mark.parametrize(("change", "message"), [
    (dict(position_embedding="alibi"), "model.position_embedding='alibi' is not supported; choose one of learned, "
                                       "rope"),
    (dict(mlp_activation="swiglu"), "model.mlp_activation='swiglu' is not supported; choose one of gelu, relu2"),
    (dict(norm="batchnorm"), "model.norm='batchnorm' is not supported; choose one of layernorm, rmsnorm"),
    (dict(logit_softcap=0.0), "model.logit_softcap=0.0 must be greater than 0"),
    (dict(rope_base=-1.0), "model.rope_base=-1.0 must be greater than 0"),
    (dict(position_embedding="rope", n_head=64), "rope needs an even head size, but n_embd/n_head = 64/64 = 1"),
])
def test_bad_switch_values_are_one_clear_line(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        tiny(**change).check()
    assert "\n" not in str(err.value)


def test_non_gpt2_switches_names_what_differs() -> None:
    assert ModelConfig().non_gpt2_switches() == []
    assert tiny(rope_base=1e6).non_gpt2_switches() == []  # no rotary: the base changes nothing
    assert tiny(**ALL_ON).non_gpt2_switches() == [
        "position_embedding=rope", "rope_base=500.0", "qk_norm=true", "mlp_activation=relu2", "norm=rmsnorm",
        "tie_embeddings=false", "logit_softcap=3.0", "zero_init_proj=true"]
    assert tiny(zero_init_proj=True).non_gpt2_switches() == ["zero_init_proj=true"]
    assert tiny(zero_init_proj=True).non_gpt2_switches(init=False) == []


def test_switches_compose_from_hydra_overrides() -> None:
    cfg = compose_train(["model=tiny", "model.position_embedding=rope", "model.qk_norm=true",
                         "model.mlp_activation=relu2", "model.norm=rmsnorm", "model.tie_embeddings=false",
                         "model.zero_init_proj=true", "model.logit_softcap=30", "model.rope_base=1000"])
    assert cfg.model.non_gpt2_switches() == [
        "position_embedding=rope", "rope_base=1000.0", "qk_norm=true", "mlp_activation=relu2", "norm=rmsnorm",
        "tie_embeddings=false", "logit_softcap=30.0", "zero_init_proj=true"]
    model = GPT(ModelConfig(**{**asdict(cfg.model), "vocab_size": V}))
    assert model.cfg.logit_softcap == 30.0 and model.rotary is not None


# ------------------------------------------------------------------ checkpoints and export


def test_switched_checkpoint_round_trips(tmp_path: Path) -> None:
    model = switched_model(pad_vocab_multiple=64)
    save_model_checkpoint(tmp_path, 1, model)
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.model_config == model.cfg
    loaded = ckpt.model().eval()
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    idx = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_old_checkpoint_without_switch_keys_loads_as_gpt2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    path = save_model_checkpoint(tmp_path, 1, model)
    meta_file = path / "meta.json"
    meta = json.loads(meta_file.read_text())
    new = {f.name for f in fields(ModelConfig)} - {"name", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size",
                                                   "pad_vocab_multiple", "dropout", "bias", "layer_norm_epsilon",
                                                   "init_std"}
    assert new <= set(meta["plan"]["model"])
    meta["plan"]["model"] = {k: v for k, v in meta["plan"]["model"].items() if k not in new}
    meta_file.write_text(json.dumps(meta))
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.model_config == model.cfg and ckpt.model_config.non_gpt2_switches() == []
    idx = torch.randint(0, V, (1, 9))
    torch.testing.assert_close(ckpt.model().eval()(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_export_refuses_switched_models_in_one_line(tmp_path: Path) -> None:
    model = switched_model(zero_init_proj=False)
    save_model_checkpoint(tmp_path / "run", 1, model)
    with pytest.raises(UserError) as err:
        export_checkpoint(tmp_path / "run", tmp_path / "hf")
    message = str(err.value)
    assert "\n" not in message and not (tmp_path / "hf").exists()
    assert message.startswith("cannot export a model with position_embedding=rope, rope_base=500.0, qk_norm=true, "
                              "mlp_activation=relu2, norm=rmsnorm, tie_embeddings=false, logit_softcap=3.0 as "
                              "Hugging Face GPT-2")
    with pytest.raises(UserError, match=r"cannot export a model with norm=rmsnorm as Hugging Face GPT-2"):
        export_hf(GPT(tiny(norm="rmsnorm")), tiny(norm="rmsnorm"), tmp_path / "hf")


def test_zero_init_proj_alone_still_exports(tmp_path: Path) -> None:
    """The switch changes only the initialisation: a trained model is GPT-2 and transformers computes its logits."""
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_proj=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02)
    export_hf(model, model.cfg, tmp_path)
    idx = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(hf_logits(tmp_path, idx), model(idx).logits)
