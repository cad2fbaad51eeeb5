"""Our GPT as llama.cpp's `gpt2` architecture: an explicit map from our state dict to GGUF tensor names, and the
architecture's hyperparameters.

No weight is transposed: nn.Linear's (out, in) weight is the layout llama.cpp's gpt2 graph multiplies by (its
convert_hf_to_gguf.py gets there by transposing Hugging Face's Conv1D weights). c_attn keeps q, k, v stacked in
that order, as llama.cpp splits attn_qkv. The output head is the token embedding (GPT-2 ties them; llama.cpp uses
token_embd when a file has no output.weight). A model whose switches llama.cpp's gpt2 cannot represent is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpt2.config import ModelConfig
from gpt2.errors import UserError

GGUF_ARCH = "gpt2"
"""llama.cpp's architecture name (general.architecture)."""
_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
"""Our module in block i -> llama.cpp's tensor in blk.i (each with .weight and .bias)."""


def check_gguf_exportable(cfg: ModelConfig) -> None:
    """UserError naming the ModelConfig switches that llama.cpp's gpt2 architecture cannot represent, if any."""
    blocking = cfg.non_gpt2_switches(init=False)
    if blocking:
        raise UserError(f"cannot export a model with {', '.join(blocking)} to GGUF: llama.cpp's gpt2 architecture "
                        f"has no such option; only models trained with the GPT-2 defaults of these switches export.")


def _key_shapes(cfg: ModelConfig, V: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Our key -> (GGUF name, shape) for every tensor of the file, for a vocabulary of V tokens."""
    C = cfg.n_embd
    keys = {"transformer.wte.weight": ("token_embd.weight", (V, C)),
            "transformer.wpe.weight": ("position_embd.weight", (cfg.n_positions, C))}
    shapes = {"ln_1": (C,), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "ln_2": (C,), "mlp.c_fc": (4 * C, C),
              "mlp.c_proj": (C, 4 * C)}
    for i in range(cfg.n_layer):
        for ours, theirs in _BLOCK.items():
            shape = shapes[ours]
            keys[f"transformer.h.{i}.{ours}.weight"] = (f"blk.{i}.{theirs}.weight", shape)
            keys[f"transformer.h.{i}.{ours}.bias"] = (f"blk.{i}.{theirs}.bias", (shape[0],))
    keys["transformer.ln_f.weight"] = ("output_norm.weight", (C,))
    keys["transformer.ln_f.bias"] = ("output_norm.bias", (C,))
    return keys


def gguf_tensors(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """GGUF name -> tensor (fp32, CPU) for our state dict: padded vocabulary rows dropped, zero biases written for a
    model without biases (cfg.bias false: llama.cpp's gpt2 needs them; zeros compute the same function).
    UserError for a model with non-GPT-2 switches; ValueError naming the key on a missing, unexpected or misshapen
    tensor."""
    check_gguf_exportable(cfg)
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is null; export the model config of a run plan (it follows the tokenizer).")
    state = dict(state)
    head = state.pop("lm_head.weight", None)
    wte = state.get("transformer.wte.weight", head)
    if wte is None:
        raise ValueError("transformer.wte.weight: missing from the state dict (and no lm_head.weight either).")
    if head is not None and head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte):
        raise ValueError("lm_head.weight differs from transformer.wte.weight; only tied embeddings export.")
    state["transformer.wte.weight"] = wte[: cfg.vocab_size]  # an embedding padded to a multiple keeps its own rows
    out: dict[str, Tensor] = {}
    for key, (name, shape) in _key_shapes(cfg, cfg.vocab_size).items():
        tensor = state.pop(key, None)
        if tensor is None:
            if cfg.bias or not key.endswith("bias"):
                raise ValueError(f"{key}: missing from the state dict.")
            tensor = torch.zeros(shape)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: the state dict's tensor has shape {tuple(tensor.shape)}, {name} needs {shape}.")
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    if state:
        raise ValueError(f"{next(iter(state))}: unexpected key in the state dict ({len(state)} unexpected keys).")
    return out


def gguf_hparams(cfg: ModelConfig) -> dict[str, int | float]:
    """The gpt2 architecture's hyperparameters, by the GGUFWriter method that writes each (add_<name>)."""
    return {"block_count": cfg.n_layer, "context_length": cfg.n_positions, "embedding_length": cfg.n_embd,
            "feed_forward_length": 4 * cfg.n_embd, "head_count": cfg.n_head,
            "layer_norm_eps": cfg.layer_norm_epsilon}
