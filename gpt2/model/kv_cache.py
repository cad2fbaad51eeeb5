"""Decoding caches: `KVCache` (a host-side position, the eager decoder's) and `StaticKVCache` (positions
as a device tensor and attention over the whole cache through a mask, so a step can be captured in a
CUDA graph). `GPT.forward` writes the new keys and values into them layer by layer."""

from __future__ import annotations

import torch
from torch import Tensor

from gpt2.config import ModelConfig
from gpt2.errors import UserError


def _cache_buffers(cfg: ModelConfig, batch_size: int, max_len: int, *, device: torch.device | str,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zeroed key and value buffers (L, B, nh, max_len, hs) for a decoding cache of max_len tokens."""
    if max_len > cfg.n_positions:
        raise UserError(f"KV cache length {max_len} exceeds n_positions={cfg.n_positions}; use at most "
                        f"{cfg.n_positions} tokens (prompt + new tokens).")
    hs = cfg.n_embd // cfg.n_head
    shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, hs)  # (L, B, nh, max_len, hs)
    return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


class KVCache:
    """Static key/value cache for decoding: one preallocated (B, nh, max_len, hs) tensor pair per layer.

    `pos` counts the tokens already cached; `GPT.forward` writes the new keys/values at
    [pos, pos + T) in every layer and then advances `pos` by T. Nothing is allocated per token.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.k, self.v = _cache_buffers(cfg, batch_size, max_len, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nh, T, hs) at [pos, pos + T) of `layer`; return all keys/values so far (B, nh, pos+T, hs)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def check(self, batch_size: int, seq_len: int) -> None:
        """Raise UserError if a forward of (batch_size, seq_len) does not fit the cache."""
        if batch_size != self.batch_size:
            raise UserError(f"batch size {batch_size} does not match the KV cache's batch size {self.batch_size}; "
                            f"make a new cache with GPT.new_kv_cache({batch_size}, ...).")
        if self.pos + seq_len > self.max_len:
            raise UserError(f"Cannot cache {seq_len} more tokens after {self.pos}: the KV cache holds only "
                            f"{self.max_len}; make a larger cache or crop the input.")

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are reused)."""
        self.pos = 0


class StaticKVCache:
    """Graph-ready decoding cache (gpt-fast style): fixed (L, B, nh, max_len, hs) buffers, and the positions
    being written as a device tensor, `input_pos` (T,). `GPT.forward` writes the new keys/values at those
    positions with index_copy_ and every query attends over the whole cache through a boolean mask (row
    `input_pos` of a causal table), so one decoding step has the same shapes and addresses every time and
    can be captured in a CUDA graph. Nothing on the host tracks the position: the caller advances
    `input_pos` in place (or assigns a new tensor for a prefill)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.k, self.v = _cache_buffers(cfg, batch_size, max_len, device=device, dtype=dtype)
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()  # (max_len, max_len)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # (T,)
        self.attn_mask = self.causal[self.input_pos]  # (T, max_len), set by GPT.forward
        self.batch_size = batch_size
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nh, T, hs) at input_pos of `layer`; return the whole layer cache (B, nh, max_len, hs)."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, self.input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, self.input_pos, v.to(v_all.dtype))
        return k_all, v_all
