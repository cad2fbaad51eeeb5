"""The GPT-2 model: small modules (norms, rotary positions, attention, MLP, Block), then GPT (read top to
bottom); decoding caches are in gpt2.model.kv_cache.

Module names mirror nanoGPT and Hugging Face's GPT2LMHeadModel (`transformer.h[i].attn.c_attn`, ...)
so that `gpt2.model.hf` maps weights with an explicit key list. Linear layers are `nn.Linear`
(HF uses Conv1D, whose weights are the transpose). The ModelConfig switches (rotary positions, QK-norm,
ReLU^2, RMSNorm, an untied head, a logit soft cap) pick modules once in `__init__`; their defaults build
GPT-2 exactly. The model prints nothing and imports no trainer, Hydra or distributed code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.model.kv_cache import KVCache, StaticKVCache


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The block and final norm over the residual stream: LayerNorm (GPT-2) or RMSNorm with a weight."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)


class HeadRMSNorm(nn.Module):
    """QK-norm: RMS normalisation over the last (head) dimension, with no weight."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=self.eps)


class Rotary(nn.Module):
    """Rotary position tables: the angle of pair j at position m is m * base^(-2j/hs), j < hs/2. Their cos and
    sin for every position < n_positions are non-persistent buffers, so state dicts hold nothing of them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hs = cfg.n_embd // cfg.n_head
        # Real tables even when the model is built on the meta device (model_from_state_dict loads only weights).
        device = "cpu" if torch.get_default_device().type == "meta" else None
        inv_freq = cfg.rope_base ** (-torch.arange(0, hs, 2, dtype=torch.float64, device=device) / hs)  # (hs/2,)
        pos = torch.arange(cfg.n_positions, dtype=torch.float64, device=device)  # (n_positions,)
        angles = torch.outer(pos, inv_freq)  # (n_positions, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles at positions pos (T,): 2 x (T, hs/2). A gather, so pos may live on the device."""
        return self.cos[pos], self.sin[pos]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (B, nh, T, hs): pair j, the complex number x[j] + i x[j + hs/2], times e^{i angle}."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.qk_norm = HeadRMSNorm(cfg.layer_norm_epsilon) if cfg.qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.layer_idx = layer_idx

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                kv_cache: KVCache | StaticKVCache | None = None) -> Tensor:
        """x (B, T, C); rope: cos and sin (T, hs/2) of the tokens' positions, or None (learned positions)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k = self.qk_norm(q), self.qk_norm(k)
        if rope is not None:  # keys are cached already turned to their positions
            q, k = rotate(q, *rope), rotate(k, *rope)
        if kv_cache is None:  # training / full recompute
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif isinstance(kv_cache, StaticKVCache):  # every query over the whole cache, future positions masked
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, max_len, hs)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=kv_cache.attn_mask)
        else:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, start+T, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if T == 1:  # one new token attends to everything cached
                y = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:  # prefill
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # a chunk after cached tokens: query i sees keys <= start + i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x)^2 (modded-nanogpt's MLP activation)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> activation (GELU with the tanh approximation, HF's gelu_new,
    or ReLU^2) -> C."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.act = ReLUSquared() if cfg.mlp_activation == "relu2" else nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                kv_cache: KVCache | StaticKVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class SoftCap(nn.Module):
    """Logit soft cap: cap * tanh(logits / cap), smooth and bounded by +-cap."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, logits: Tensor) -> Tensor:
        return self.cap * torch.tanh(logits / self.cap)


@dataclass
class GPTOutput:
    """What `GPT.forward` returns."""

    logits: Tensor
    """(B, T, vocab_size); with a KV cache only the last position: (B, 1, vocab_size)."""
    loss: Tensor | None = None
    """Mean cross-entropy over targets != -1, when targets were given."""


class GPT(nn.Module):
    """GPT-2 language model (tied input/output embeddings, learned positions), or a variant of it chosen by
    the ModelConfig switches."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        modules: dict[str, nn.Module] = dict(wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd))
        if cfg.position_embedding == "learned":
            modules["wpe"] = nn.Embedding(cfg.n_positions, cfg.n_embd)
        modules.update(
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        )
        self.transformer = nn.ModuleDict(modules)
        self.rotary = Rotary(cfg) if cfg.position_embedding == "rope" else None
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.softcap = SoftCap(cfg.logit_softcap) if cfg.logit_softcap is not None else nn.Identity()
        # The padded embedding rows are an internal detail: state dicts (checkpoints, export) hold vocab_size rows.
        self.register_state_dict_post_hook(_drop_padded_rows)
        self.register_load_state_dict_pre_hook(_pad_rows)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: normal(0, init_std) weights, zero biases, residual projections (c_proj) scaled
        by 1/sqrt(2 * n_layer) (zero with zero_init_proj), norms at weight 1 and bias 0."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("c_proj") and self.cfg.zero_init_proj:
                    nn.init.zeros_(module.weight)
                else:
                    scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj") else 1.0
                    nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for weight in (self.transformer.wte.weight, self.lm_head.weight):  # the same tensor when tied
            if self.cfg.padded_vocab_size > self.cfg.vocab_size and type(weight.data) is torch.Tensor:
                weight[self.cfg.vocab_size:].zero_()  # padded rows: never looked up, their logits are masked

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once (padded vocab rows included). `exclude_embeddings` drops the
        tables that are only looked up: the position embedding, and the token embedding when lm_head has
        its own weight (a tied token embedding doubles as lm_head, whose matmul is real compute)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at this sequence length (PaLM appendix B):
        6 N for the matmuls with N = num_params(exclude_embeddings=True), plus 12 L H Q T for attention."""
        cfg = self.cfg
        N = self.num_params(exclude_embeddings=True)
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len
        return float(6 * N + 12 * L * H * Q * T)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on this model's device (dtype defaults to the parameters')."""
        weight = self.transformer.wte.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.n_positions, device=weight.device,
                       dtype=dtype or weight.dtype)

    def new_static_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> StaticKVCache:
        """An empty graph-ready cache on this model's device (dtype defaults to the parameters')."""
        weight = self.transformer.wte.weight
        return StaticKVCache(self.cfg, batch_size, max_len, device=weight.device, dtype=dtype or weight.dtype)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                kv_cache: KVCache | StaticKVCache | None = None) -> GPTOutput:
        """idx, targets: (B, T) token ids. Without a cache: logits for every position (and the loss).
        With a cache: the tokens continue the cached sequence, and only the last position's logits come back.
        A StaticKVCache takes the tokens' positions from its `input_pos` tensor (no host-side checks, so
        that a decoding step can be captured in a CUDA graph; the caller keeps them in range)."""
        B, T = idx.size()
        if isinstance(kv_cache, StaticKVCache):
            pos = kv_cache.input_pos  # (T,)
            kv_cache.attn_mask = kv_cache.causal[pos]  # (T, max_len): query at p sees keys <= p
        else:
            start = 0 if kv_cache is None else kv_cache.pos
            if start + T > self.cfg.n_positions:
                raise UserError(f"Cannot forward sequence of length {start + T}, n_positions is only "
                                f"{self.cfg.n_positions}; crop the input to the last {self.cfg.n_positions} tokens.")
            if kv_cache is not None:
                kv_cache.check(B, T)
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(pos)  # 2 x (T, hs/2): cos and sin of these positions' angles
        else:
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if isinstance(kv_cache, KVCache):
            kv_cache.pos += T
        if kv_cache is not None:
            x = x[:, -1:, :]  # (B, 1, C): generation needs only the next-token distribution
        logits = self.softcap(self.lm_head(x))  # (B, T, Vp) with Vp = padded_vocab_size
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets, self.cfg.vocab_size)
        return GPTOutput(logits=logits[..., : self.cfg.vocab_size], loss=loss)  # (B, T, V): a view, never padded


def cross_entropy(logits: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """Mean cross-entropy over targets != -1 of (B, T, Vp) logits whose last Vp - vocab_size columns are
    padding. The padded columns are set to -inf in place (a (B, T, Vp - V) write; neither the matmul nor the
    soft cap that made the logits needs them for its backward), so the softmax is exactly the one over
    vocab_size classes and no (B, T, V) slice is copied. The logits are not upcast here: under autocast
    cross_entropy runs in fp32 (autocast's policy), and torch.compile fuses that cast into the softmax kernel
    instead of materializing an fp32 (B, T, V) copy."""
    if logits.size(-1) > vocab_size:
        logits[..., vocab_size:] = float("-inf")
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def _vocab_groups(cfg: ModelConfig, state: dict[str, Tensor], prefix: str) -> list[tuple[list[str], Tensor | None]]:
    """The vocabulary-sized weights of a state dict: (keys, tensor) pairs, one pair holding both keys when
    lm_head is tied to the token embedding (the tensor is either key's), else one pair per key."""
    wte_key, head_key = prefix + "transformer.wte.weight", prefix + "lm_head.weight"
    if cfg.tie_embeddings:
        return [([wte_key, head_key], state.get(wte_key, state.get(head_key)))]
    return [([wte_key], state.get(wte_key)), ([head_key], state.get(head_key))]


def _drop_padded_rows(module: GPT, state: dict[str, Tensor], prefix: str, local_metadata: dict) -> None:
    """state_dict() post-hook: the token embedding and lm_head with vocab_size rows. Tied, they are one shared
    view, so checkpoint code still sees the two keys as tied. DTensor (FSDP2) shards are left padded."""
    V = module.cfg.vocab_size
    for keys, weight in _vocab_groups(module.cfg, state, prefix):
        if weight is None or weight.size(0) == V or type(weight) is not torch.Tensor:
            continue
        rows = weight[:V]  # (V, C)
        for key in keys:
            if key in state:
                state[key] = rows


def _pad_rows(module: GPT, state: dict[str, Tensor], prefix: str, *args: object) -> None:
    """load_state_dict() pre-hook: pad a vocab_size-row token embedding and lm_head with zero rows."""
    cfg = module.cfg
    pad = cfg.padded_vocab_size - cfg.vocab_size
    for keys, weight in _vocab_groups(cfg, state, prefix):
        if not pad or weight is None or weight.dim() != 2 or weight.size(0) != cfg.vocab_size:
            continue
        padded = torch.cat([weight, weight.new_zeros(pad, weight.size(1))])  # (padded_vocab_size, C)
        for key in keys:
            if key in state:
                state[key] = padded


class StateDictMismatch(UserError, ValueError):
    """Weights whose keys or shapes do not fit the model (a UserError: the wrong checkpoint or model config)."""


def check_state_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """The one key/shape check for weights from anywhere (checkpoint, DCP shards, state dict): raises
    StateDictMismatch naming the first missing or unexpected key, or the key and both shapes."""
    for key, shape in expected.items():
        if key not in found:
            raise StateDictMismatch(f"{source} has no tensor {key!r} that the model needs; "
                                    f"was it saved by another model?")
        if tuple(found[key]) != tuple(shape):
            raise StateDictMismatch(
                f"{source}: {key!r} has shape {tuple(found[key])} in the checkpoint but {tuple(shape)} in the model; "
                f"use the model config the checkpoint was trained with (see its meta.json)."
            )
    extra = [k for k in found if k not in expected]
    if extra:
        raise StateDictMismatch(f"{source} has tensor {extra[0]!r} that the model does not have; "
                                f"was it saved by another model?")


def model_from_state_dict(cfg: ModelConfig, state: dict[str, Tensor], source: str = "the state dict") -> GPT:
    """A GPT holding `state` (our key names; with tied embeddings `lm_head.weight` may be missing since it is
    `transformer.wte.weight`). The token embedding and lm_head may have vocab_size rows (what state_dict() gives)
    or, from older or FSDP checkpoints, padded_vocab_size rows. Built on the meta device and filled by
    assignment, so no time is spent on a random init."""
    state = dict(state)
    for keys, weight in _vocab_groups(cfg, state, prefix=""):
        if weight is None:
            continue
        if weight.dim() == 2 and weight.size(0) == cfg.padded_vocab_size:
            weight = weight[: cfg.vocab_size]  # (V, C)
        for key in keys:
            state[key] = weight
    with torch.device("meta"):
        model = GPT(cfg)
    check_state_shapes({k: tuple(t.shape) for k, t in model.state_dict().items()},
                       {k: tuple(t.shape) for k, t in state.items()}, source)
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # re-tie: assignment created two Parameters
    if model.rotary is not None:  # its tables are not in the state dict: move them to where the weights are
        model.rotary.to(model.transformer.wte.weight.device)
    return model
