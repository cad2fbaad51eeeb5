"""The body of run_generate.py: load a checkpoint's or a pretrained model with its tokenizer, encode the
prompt, sample, print (streaming when asked) and optionally write the samples to a file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import torch
from torch import Tensor

from gpt2.checkpoint.handle import load_for_inference
from gpt2.config import GenerateConfig
from gpt2.errors import UserError
from gpt2.generate.sampling import generate
from gpt2.runtime.device import resolve_device, resolve_dtype
from gpt2.utils.fs import atomic_write, check_writable


def _prompt_tokens(tokens: list[int], cfg: GenerateConfig, n_positions: int, eot: int) -> list[int]:
    """The prompt ids (the end-of-text token when empty), cropped or refused when too long."""
    tokens = tokens or [eot]
    limit = n_positions - cfg.max_new_tokens
    if limit < 1:
        raise UserError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in n_positions="
                        f"{n_positions}; lower max_new_tokens to at most {n_positions - 1}.")
    if len(tokens) > limit:
        if not cfg.crop_prompt:
            raise UserError(f"the prompt is {len(tokens)} tokens but only n_positions - max_new_tokens = "
                            f"{n_positions} - {cfg.max_new_tokens} = {limit} fit; shorten the prompt, lower "
                            f"max_new_tokens, or set crop_prompt=true to keep its last {limit} tokens.")
        print(f"note: prompt cropped to its last {limit} of {len(tokens)} tokens.", file=sys.stderr)
        tokens = tokens[-limit:]
    return tokens


class _Streamer:
    """Prints tokens as they arrive. It decodes the whole running sequence and prints the new suffix,
    holding back a trailing partial UTF-8 character (decoded as U+FFFD) until it is complete."""

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO) -> None:
        self.decode, self.out = decode, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: Tensor) -> None:
        self.ids.append(int(token[0, 0]))
        self._emit(self.decode(self.ids).rstrip("\ufffd"))

    def finish(self) -> None:
        self._emit(self.decode(self.ids))

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def generate_samples(cfg: GenerateConfig, out: TextIO = sys.stdout) -> list[str]:
    """Load the model and tokenizer named by cfg, draw cfg.num_samples continuations of cfg.prompt,
    print them to `out` (streaming when cfg.stream) and return them (prompt + completion)."""
    cfg.check()
    output_file = check_writable("output_file", cfg.output_file) if cfg.output_file else None  # before loading
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer, _ = load_for_inference(cfg.checkpoint, cfg.pretrained, cfg.tokenizer.path)
    model = model.to(device=device, dtype=dtype).eval()
    prompt = _prompt_tokens(tokenizer.encode(cfg.prompt), cfg, model.cfg.n_positions, tokenizer.eot_token)
    if max(prompt) >= model.cfg.vocab_size:
        raise UserError(f"the prompt has token id {max(prompt)} but the model's vocab_size is only "
                        f"{model.cfg.vocab_size}; this model was not trained with this tokenizer ({tokenizer.id}).")
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)  # (num_samples, T): one batch
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    streamer = None
    if cfg.stream:  # the first sample is printed as it is decoded, the others when the batch is done
        streamer = _Streamer(tokenizer.decode, out)
        out.write(tokenizer.decode(prompt))
        out.flush()
    ids = generate(model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                   top_p=cfg.top_p, generator=generator, on_token=streamer, decode_mode=cfg.decode_mode)
    samples = [tokenizer.decode(row) for row in ids.tolist()]
    for i, text in enumerate(samples):
        if i > 0:
            out.write("\n---------------\n")
        if i == 0 and streamer is not None:
            streamer.finish()
        else:
            out.write(text)
    out.write("\n")
    out.flush()
    if output_file is not None:
        try:
            atomic_write(output_file, "\n---------------\n".join(samples) + "\n")
        except OSError as err:
            raise UserError(f"could not write output_file={cfg.output_file}: {err.strerror or err}; the "
                            f"{len(samples)} sample(s) were printed above.") from None
    return samples
