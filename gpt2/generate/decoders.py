"""Decoders: how `gpt2.generate.sampling.generate` runs the model for the prompt (prefill) and then one token per
step. Three modes, one interface (`prefill(idx) -> logits`, `step(token) -> logits`, logits (B, V)):

- eager: `KVCache` with a host-side position; the CPU default.
- static: `StaticKVCache` (fixed buffers, positions as a device tensor, attention over the whole cache
  with a mask). Runs anywhere; on CPU it is what the tests compare with the eager path and HF.
- graph: static, with the one-token step captured once in a CUDA graph per (model, batch, cache length,
  dtype) and replayed for every token (pytorch-labs/gpt-fast's recipe; the CUDA default). The graph
  returns the logits; sampling runs right after it on the GPU, with no host sync per token.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from gpt2.config import DECODE_MODES
from gpt2.errors import UserError
from gpt2.model.gpt import GPT, KVCache


def resolve_mode(mode: str, device: torch.device) -> str:
    """auto -> graph on CUDA (outside autocast, whose weight-cast cache does not mix with capture), else eager."""
    if mode not in DECODE_MODES:
        raise UserError(f"decode_mode={mode!r} is not supported; choose one of {', '.join(DECODE_MODES)}.")
    if mode == "graph" and device.type != "cuda":
        raise UserError(f"decode_mode=graph needs CUDA, but the model is on {device.type}; use decode_mode=static "
                        f"or eager.")
    if mode == "auto":
        graphable = device.type == "cuda" and not torch.is_autocast_enabled("cuda")
        return "graph" if graphable else "eager"
    return mode


class EagerDecoder:
    """The growing-cache path: the cache's host-side `pos` says where the next tokens go."""

    def __init__(self, model: GPT, batch_size: int, max_len: int) -> None:
        self.model = model
        self.cache: KVCache = model.new_kv_cache(batch_size, max_len)

    def prefill(self, idx: Tensor) -> Tensor:
        return self.model(idx, kv_cache=self.cache).logits[:, -1, :]  # (B, V)

    def step(self, token: Tensor) -> Tensor:
        return self.model(token, kv_cache=self.cache).logits[:, -1, :]  # (B, V)


class StaticDecoder:
    """The graph-ready path: a StaticKVCache, a static (B, 1) token buffer and a (1,) position tensor that
    is advanced in place. With `graph`, the step is captured on its first call and replayed afterwards;
    the captured buffers stay valid for later `generate` calls with the same shapes (see `decoder_for`)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int, graph: bool) -> None:
        self.model = model
        self.cache = model.new_static_kv_cache(batch_size, max_len)
        device = self.cache.k.device
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,): where the next token goes
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = torch.empty(0)  # the graph's output buffer (B, V), once captured

    def prefill(self, idx: Tensor) -> Tensor:
        T = idx.size(1)
        self.cache.input_pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        logits = self.model(idx, kv_cache=self.cache).logits[:, -1, :]  # (B, V)
        self.pos.fill_(T)
        self.cache.input_pos = self.pos  # from now on the one position being decoded
        return logits

    def _forward_step(self) -> Tensor:
        return self.model(self.token, kv_cache=self.cache).logits[:, -1, :]  # (B, V)

    def step(self, token: Tensor) -> Tensor:
        self.token.copy_(token)
        if not self.use_graph:
            logits = self._forward_step()
        else:
            if self.graph is None:
                self.graph, self.logits = self._capture()
            self.graph.replay()
            logits = self.logits
        self.pos.add_(1)
        return logits

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm up on a side stream (allocator, kernels), then capture one step. The warm-up steps write
        this same position's keys/values from this same token, so the cache ends up as if they never ran."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward_step()  # (B, V), rewritten in place by every replay
        return graph, logits


_graph_decoders: weakref.WeakKeyDictionary[GPT, dict[tuple, StaticDecoder]] = weakref.WeakKeyDictionary()


def decoder_for(model: GPT, batch_size: int, max_len: int, mode: str) -> EagerDecoder | StaticDecoder:
    """A decoder for `mode` (already resolved). Graph decoders are kept per model and reused for the same
    (batch, cache length, dtype, weights' storage), so a model is captured once per shape."""
    if mode == "eager":
        return EagerDecoder(model, batch_size, max_len)
    if mode == "static":
        return StaticDecoder(model, batch_size, max_len, graph=False)
    weight = model.transformer.wte.weight
    key = (batch_size, max_len, weight.dtype, weight.device, weight.data_ptr())
    decoders = _graph_decoders.setdefault(model, {})
    for stale in [k for k in decoders if k[2:] != key[2:]]:  # moved or cast model: old captures are useless
        del decoders[stale]
    if key not in decoders:
        decoders[key] = StaticDecoder(model, batch_size, max_len, graph=True)
    return decoders[key]


def release_graphs(model: GPT | None = None) -> None:
    """Free the captured graphs (and their caches) of `model`, or of every model."""
    if model is None:
        _graph_decoders.clear()
    else:
        _graph_decoders.pop(model, None)

