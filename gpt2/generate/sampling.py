"""Sampling: `generate` (KV-cached decoding with temperature, top-k and top-p) and `sample_next`.
gpt2.generate.command is the body of run_generate.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from gpt2.errors import UserError
from gpt2.generate.decoders import decoder_for, resolve_mode
from gpt2.model.gpt import GPT
from gpt2.runtime.distributed import unwrap_model


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token from logits (B, V): greedy when temperature == 0. Returns (B, 1) long."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # (B, V)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@contextlib.contextmanager
def _cpu_decode_layout(model: GPT) -> Iterator[None]:
    """On CPU, store every nn.Linear weight column-major while decoding (same shape and values, transposed
    strides), and restore the usual layout afterwards. F.linear then multiplies by a row-major (in, out)
    matrix, which CPU BLAS/oneDNN matrix-vector kernels read much faster than nn.Linear's (out, in): in
    benchmarks/generation.py bf16 decoding is several times faster and the fp32 lm_head about 2x. Other
    devices, and DTensor (FSDP) parameters, are left alone. Costs two copies of the weights per call."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    swap = [p for p in weights.values() if p.device.type == "cpu" and type(p.data) is torch.Tensor and p.dim() == 2
            and p.is_contiguous()]
    with torch.inference_mode(False), torch.no_grad():  # the parameters must not become inference tensors
        for p in swap:
            p.data = p.data.t().contiguous().t()  # (out, in) with strides (1, out)
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p in swap:
                p.data = p.data.contiguous()


def generate(model: GPT, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, eos_token: int | None = None,
             on_token: Callable[[Tensor], None] | None = None, decode_mode: str = "auto") -> Tensor:
    """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + n) with n <= max_new_tokens.

    The prompt is run once (prefill) into a KV cache, then one token per step. `on_token` gets each new
    (B, 1) column as it is sampled. With `eos_token`, a row that produced it keeps emitting it, and decoding
    stops once every row has (that check reads the GPU every step). A generator makes sampling reproducible
    (it must live on the model's device). `decode_mode` picks the decoder (see gpt2.generate.decoders):
    auto = CUDA graphs on CUDA, eager elsewhere; eager, static or graph. The total length must fit
    n_positions: the caller crops the prompt.
    """
    model = unwrap_model(model)  # decode eagerly even if the model was torch.compile'd or DDP-wrapped
    T = idx.size(1)
    total = T + max_new_tokens
    n_positions = model.cfg.n_positions
    if T == 0:
        raise UserError("the prompt is empty; give at least one token (e.g. the end-of-text token).")
    if total > n_positions:
        raise UserError(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} = {total} exceeds n_positions="
                        f"{n_positions}; crop the prompt to its last {max(n_positions - max_new_tokens, 0)} tokens "
                        f"or lower max_new_tokens.")
    mode = resolve_mode(decode_mode, model.transformer.wte.weight.device)
    if max_new_tokens <= 0:
        return idx
    with _cpu_decode_layout(model), torch.inference_mode():
        return _generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator, eos_token=eos_token, on_token=on_token, mode=mode)


def _generate(model: GPT, idx: Tensor, max_new_tokens: int, *, temperature: float, top_k: int | None,
              top_p: float | None, generator: torch.Generator | None, eos_token: int | None,
              on_token: Callable[[Tensor], None] | None, mode: str) -> Tensor:
    B, T = idx.shape
    total = T + max_new_tokens
    was_training = model.training
    model.eval()
    try:
        decoder = decoder_for(model, B, total, mode)
        out = torch.empty(B, total, dtype=torch.long, device=idx.device)  # (B, T + max_new_tokens)
        out[:, :T] = idx
        finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device) if eos_token is not None else None
        logits = decoder.prefill(idx)  # (B, V)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if finished is not None:
                nxt = nxt.masked_fill(finished, eos_token)
                finished |= nxt == eos_token
            out[:, T + i : T + i + 1] = nxt
            if on_token is not None:
                on_token(nxt)
            if finished is not None and bool(finished.all()):
                return out[:, : T + i + 1]
            if i + 1 < max_new_tokens:
                logits = decoder.step(nxt)  # (B, V)
        return out
    finally:
        model.train(was_training)
