"""Training speed levers (#12), checked on CPU: the padded vocabulary never leaks (logits, sampling,
state dicts, checkpoints, export), the loss on padded logits equals the reference loss in fp32 and
bf16, and micro_batch_size=auto searches on CUDA and refuses other devices with one clear error."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from gpt2.config import ModelConfig, PrecisionConfig, TrainConfig, validate
from gpt2.errors import ConfigError, UserError
from gpt2.generate.sampling import generate
from gpt2.model.gpt import GPT, model_from_state_dict
from gpt2.model.hf import gpt_to_hf
from gpt2.runtime.device import autocast
from gpt2.train.autobatch import candidate_sizes, fits_in_memory, largest_fitting, resolve_micro_batch_size
from gpt2.train.train import train

from .helpers import compose_train, run_train_cli, save_model_checkpoint, tiny_trainer

V = 101


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=V), **kw})


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
    from gpt2.checkpoint.handle import Checkpoint

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
    ckpt = Checkpoint.open(tmp_path)
    cfg, loaded = ckpt.model_config, ckpt.state_dict()
    assert cfg.pad_vocab_multiple == 64
    for pad in (64, 1):
        again = model_from_state_dict(tiny(pad_vocab_multiple=pad), loaded).eval()
        assert again.lm_head.weight is again.transformer.wte.weight
        torch.testing.assert_close(again(idx).logits, plain.eval()(idx).logits)
    # An older checkpoint with the padded rows still loads.
    old = {**loaded, "transformer.wte.weight": padded.transformer.wte.weight.detach()}
    torch.testing.assert_close(model_from_state_dict(padded.cfg, old).eval()(idx).logits, plain(idx).logits)


@pytest.mark.slow
def test_training_losses_do_not_change_with_padding(tmp_path: Path, base_overrides: list[str]) -> None:
    """Trainer steps from the same weights with and without the padded vocabulary: the same loss curve."""
    cfg = compose_train([*base_overrides, "scheduler.warmup_steps=0", "optimizer.lr=3e-3", "total_batch_tokens=512",
                         "micro_batch_size=4", "block_size=64"])
    torch.manual_seed(0)
    padded = GPT(replace(cfg.model, vocab_size=50257, pad_vocab_multiple=64))
    plain = GPT(replace(cfg.model, vocab_size=50257, pad_vocab_multiple=1))
    plain.load_state_dict(padded.state_dict())
    curves = []
    for model in (padded, plain):
        trainer = tiny_trainer(cfg, tmp_path, model)
        curves.append([trainer.train_step()["train/loss"] for _ in range(3)])
    assert trainer.grad_accum == 2 and curves[1][-1] < curves[1][0] - 0.3
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(padded.transformer.wte.weight[50257:]) == 0  # untouched by AdamW too


# ------------------------------------------------------------------ micro_batch_size=auto


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


@pytest.mark.slow
def test_auto_micro_batch_cli_error_on_cpu(tmp_path: Path, base_overrides: list[str]) -> None:
    result = run_train_cli([*base_overrides, "micro_batch_size=auto", "total_batch_tokens=1024", "block_size=64",
                            "max_steps=1", "scheduler.warmup_steps=0"], tmp_path / "cli", check=False)
    assert result.proc.returncode == 2
    assert result.proc.stderr.startswith("error: micro_batch_size=auto needs a CUDA device")
    assert "Traceback" not in result.proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="micro_batch_size=auto measures CUDA memory")
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
