"""gpt2.train.trainer: accumulation equals one big batch, mixed precision on CPU, fp16's skipped steps, the
evaluation sample's settings, and the same losses with or without the padded vocabulary."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt2.config import TrainConfig
from gpt2.generate.sampling import generate
from gpt2.model.gpt import GPT
from gpt2.runtime.device import DTYPES
from gpt2.train.trainer import Trainer
from tests.helpers import (
    TINY_RUN,
    compose_train,
    tiny_trainer,
)


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


def make_trainer(cfg: TrainConfig, tmp_path: Path) -> Trainer:
    return tiny_trainer(cfg, tmp_path)


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, base_overrides: list[str]) -> None:
    common = [*base_overrides, "total_batch_tokens=512", "block_size=64", "optimizer.grad_clip=0",
              "model.dropout=0.0", "scheduler.warmup_steps=0"]
    big = make_trainer(compose_train([*common, "micro_batch_size=8"]), tmp_path / "a")
    accum = make_trainer(compose_train([*common, "micro_batch_size=2"]), tmp_path / "b")
    assert (big.grad_accum, accum.grad_accum) == (1, 4)
    # The gradient of one step: one batch of 8 sequences vs 4 accumulated micro-batches of 2.
    big.forward_backward_step(*big.train_loader.next_batch(), sync=True)
    for micro in range(4):
        accum.forward_backward_step(*accum.train_loader.next_batch(), sync=micro == 3)
    for (name, p_big), (_, p_acc) in zip(big.model.named_parameters(), accum.model.named_parameters()):
        torch.testing.assert_close(p_big.grad, p_acc.grad, rtol=1e-4, atol=1e-7, msg=name)
    # And whole optimizer steps report the same loss.
    for trainer in (big, accum):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.train_loader.reset()
    for _ in range(2):
        m_big, m_acc = big.train_step(), accum.train_step()
        assert m_big["train/loss"] == pytest.approx(m_acc["train/loss"], rel=1e-5)
        assert m_big["train/grad_norm"] == pytest.approx(m_acc["train/grad_norm"], rel=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path: Path, base_overrides: list[str], precision: str) -> None:
    cfg = compose_train([*base_overrides, *TINY_RUN, "micro_batch_size=4", "total_batch_tokens=256",
                         f"precision={precision}"])  # accumulation 2; CPU fp16 is slow, keep the batch small
    trainer = make_trainer(cfg, tmp_path)
    seen: list[torch.dtype] = []
    trainer.raw_model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    records = [trainer.train_step() for _ in range(3)]
    assert len(seen) == 3 * trainer.grad_accum and set(seen) == {DTYPES[precision]}  # autocast ran in that dtype
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert trainer.state.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":  # every skipped step halved the scale (no growth within 2000 steps)
        assert trainer.state.scaler.get_scale() == 65536.0 * 0.5 ** trainer.state.skipped_steps
        assert records[-1]["train/skipped_steps"] == trainer.state.skipped_steps < 3


@pytest.mark.slow  # CPU fp16 is emulated: ~10 s
def test_fp16_stops_after_max_skipped_steps(tmp_path: Path, base_overrides: list[str]) -> None:
    from gpt2.train.trainer import TrainingDiverged

    cfg = compose_train([*base_overrides, *TINY_RUN, "micro_batch_size=8", "total_batch_tokens=256",
                         "precision=fp16", "optimizer.lr=1e30", "scheduler.warmup_steps=0",
                         "precision.max_skipped_steps=3"])
    trainer = make_trainer(cfg, tmp_path)
    with pytest.raises(TrainingDiverged, match=r"fp16: 3 optimizer steps in a row were skipped for non-finite "
                                                r"gradients .* reaching precision\.max_skipped_steps=3"):
        for _ in range(6):
            trainer.train_step()
    assert trainer.state.consecutive_skipped == 3 and trainer.state.step <= 4


def test_eval_sample_uses_the_configured_temperature_and_top_k(tmp_path: Path, base_overrides: list[str],
                                                               tiktoken_file: str) -> None:
    from gpt2.tokenizers.gpt2 import get_tokenizer

    tok = get_tokenizer(tiktoken_file)
    texts = {}
    for name, args in {"greedy": ["eval.sample_temperature=0"],
                       "top1": ["eval.sample_temperature=5.0", "eval.sample_top_k=1"], "default": []}.items():
        cfg = compose_train([*base_overrides, *TINY_RUN, "micro_batch_size=8", "eval.sample_tokens=12", *args])
        trainer = make_trainer(cfg, tmp_path / name)
        texts[name] = trainer.evaluator.sample()
    idx = torch.tensor([tok.encode("ROMEO:")])
    greedy = tok.decode(generate(trainer.raw_model, idx, 12, temperature=0.0)[0].tolist())
    assert texts["greedy"] == texts["top1"] == greedy != texts["default"]
