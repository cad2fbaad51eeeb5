"""Hugging Face GPT-2 import and export: an explicit key map plus Conv1D transposes.

HF's GPT2LMHeadModel stores c_attn, c_proj and c_fc as Conv1D, whose weight is the transpose of
nn.Linear's; everything else maps one to one. The `attn.bias` / `attn.masked_bias` causal-mask
buffers of older transformers versions are ignored. transformers and huggingface_hub are imported
lazily, inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.model.gpt import GPT, StateDictMismatch, model_from_state_dict
from gpt2.model.presets import HUB_MODELS, preset_for

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _key_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """HF key -> (HF shape, transposed?) for every weight of a GPT2LMHeadModel with this config, lm_head excluded."""
    C, V = cfg.n_embd, cfg.vocab_size
    keys: dict[str, tuple[tuple[int, ...], bool]] = {
        "transformer.wte.weight": ((V, C), False),
        "transformer.wpe.weight": ((cfg.n_positions, C), False),
    }
    per_layer = {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
    }
    for i in range(cfg.n_layer):
        for name, shape in per_layer.items():
            if cfg.bias or not name.endswith("bias"):
                keys[f"transformer.h.{i}.{name}"] = (shape, name in _TRANSPOSED)
    keys["transformer.ln_f.weight"] = ((C,), False)
    if cfg.bias:
        keys["transformer.ln_f.bias"] = ((C,), False)
    return keys


def _check_shape(key: str, tensor: Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise StateDictMismatch(f"{key}: {what} has shape {tuple(tensor.shape)} but the model expects {expected}.")


def hf_to_gpt(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a GPT2LMHeadModel (or GPT2Model) state dict to ours: Conv1D weights transposed, lm_head tied
    (vocab_size rows, as GPT.state_dict() gives: the model pads its embedding itself when loading).
    ValueError naming the key on any mismatch."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key  # GPT2Model / the original hub files have no prefix
        state[key] = tensor
    expected = _key_shapes(cfg)
    lm_head = state.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the Hugging Face state dict ({len(missing)} keys missing).")
    if unexpected:
        raise ValueError(f"{unexpected[0]}: unexpected key in the Hugging Face state dict for a {cfg.n_layer}-layer "
                         f"model ({len(unexpected)} unexpected keys).")
    out: dict[str, Tensor] = {}
    for key, (shape, transposed) in expected.items():
        tensor = state[key]
        _check_shape(key, tensor, shape, "the Hugging Face tensor")
        out[key] = tensor.t().contiguous() if transposed else tensor
    wte = out["transformer.wte.weight"]
    if lm_head is not None:
        _check_shape("lm_head.weight", lm_head, tuple(wte.shape), "the Hugging Face tensor")
        if lm_head.data_ptr() != wte.data_ptr() and not torch.equal(lm_head, wte):
            raise ValueError("lm_head.weight differs from transformer.wte.weight; only tied embeddings are supported.")
    out["transformer.wte.weight"] = out["lm_head.weight"] = wte
    return out


def check_exportable(cfg: ModelConfig) -> None:
    """UserError naming the ModelConfig switches that GPT2LMHeadModel cannot represent, if any are set."""
    blocking = cfg.non_gpt2_switches(init=False)
    if blocking:
        raise UserError(f"cannot export a model with {', '.join(blocking)} as Hugging Face GPT-2: GPT2LMHeadModel "
                        f"has no such option; only models trained with the GPT-2 defaults of these switches export.")


def gpt_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> GPT2LMHeadModel's (the same map run backwards): padded vocabulary rows dropped,
    Conv1D weights transposed, lm_head.weight tied. Without biases (cfg.bias false), zero biases are
    written, which computes the same function. UserError for a model with non-GPT-2 switches."""
    check_exportable(cfg)
    state = dict(state)
    wte = state.pop("transformer.wte.weight", None)
    lm_head = state.pop("lm_head.weight", None)
    wte = wte if wte is not None else lm_head
    if wte is None:
        raise ValueError("transformer.wte.weight: missing from the state dict (and no lm_head.weight either).")
    if wte.size(0) != cfg.vocab_size:  # a padded embedding (older or FSDP checkpoints)
        _check_shape("transformer.wte.weight", wte, (cfg.padded_vocab_size, cfg.n_embd), "the state dict's tensor")
    full = ModelConfig(**{**cfg.__dict__, "bias": True})
    out: dict[str, Tensor] = {}
    for key, (shape, transposed) in _key_shapes(full).items():
        if key == "transformer.wte.weight":
            out[key] = wte[: cfg.vocab_size]
            continue
        ours = tuple(reversed(shape)) if transposed else shape
        if key not in state:
            if cfg.bias or not key.endswith("bias"):
                raise ValueError(f"{key}: missing from the state dict.")
            out[key] = torch.zeros(shape, dtype=wte.dtype, device=wte.device)
            continue
        tensor = state.pop(key)
        _check_shape(key, tensor, ours, "the state dict's tensor")
        out[key] = tensor.t() if transposed else tensor
    if state:
        raise ValueError(f"{next(iter(state))}: unexpected key in the state dict ({len(state)} unexpected keys).")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a GPT2Config dict (config.json); ValueError for GPT-2 variants this model cannot run."""
    n_embd = hf_config["n_embd"]
    if hf_config.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"n_inner={hf_config['n_inner']} is not supported (only 4 * n_embd = {4 * n_embd}).")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={act!r} is not supported (only gelu_new).")
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("reorder_and_upcast_attn", False), ("tie_word_embeddings", True)):
        if hf_config.get(flag, ok) != ok:
            raise ValueError(f"{flag}={hf_config[flag]} is not supported.")
    dims = dict(n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=n_embd)
    name = preset_for(**dims) or "hf"
    return ModelConfig(name=name, n_positions=hf_config.get("n_positions", 1024),
                       vocab_size=hf_config.get("vocab_size", 50257),
                       layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5), **dims)


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """The state dict of a HF model directory: model.safetensors (or its sharded index) or pytorch_model.bin."""
    from safetensors.torch import load_file

    try:
        if (directory / "model.safetensors").is_file():
            return load_file(directory / "model.safetensors")
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            state: dict[str, Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(directory / shard))
            return state
        if (directory / "pytorch_model.bin").is_file():
            return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt/truncated file, or a pickle with forbidden objects
        raise UserError(f"cannot read the weights in {directory}: {type(err).__name__}: {err}") from err
    raise UserError(f"{directory} has no model.safetensors or pytorch_model.bin; pass a directory written by "
                    f"save_pretrained (or gpt2.checkpoint.export).")


def _download(name: str) -> Path:
    """Fetch config.json + model.safetensors of a hub model into the HF cache; UserError when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "there is probably no network"
        raise UserError(
            f"cannot download {name!r} from the Hugging Face Hub ({why}: {type(err).__name__}). Without network, "
            f"fetch it elsewhere (e.g. `hf download {name} config.json model.safetensors --local-dir DIR`, or "
            f"GPT2LMHeadModel.from_pretrained({name!r}).save_pretrained(DIR)), copy DIR here and pass "
            f"pretrained=DIR instead of the name."
        ) from err


def local_pretrained_dir(name_or_dir: str) -> Path | None:
    """The local Hugging Face directory `name_or_dir` names (one holding config.json), or None for a hub name
    (gpt2, gpt2-medium, gpt2-large, gpt2-xl) to download. A folder named like a hub model but without
    config.json (this repository's own gpt2/ package, say) is not taken for a model."""
    path = Path(name_or_dir).expanduser()
    if (path / "config.json").is_file():
        return path
    if name_or_dir in HUB_MODELS:
        return None
    if path.is_dir():
        raise UserError(f"{path} has no config.json; pass a directory written by save_pretrained.")
    raise UserError(f"pretrained={name_or_dir!r} is neither a directory nor a known model; choose one of "
                    f"{', '.join(HUB_MODELS)} or pass a directory holding config.json and model.safetensors.")


def load_pretrained(name_or_dir: str, *, dropout: float = 0.0, pad_vocab_multiple: int | None = None) -> GPT:
    """A GPT with Hugging Face GPT-2 weights: a local HF directory (config.json + model.safetensors or
    pytorch_model.bin) or a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl). fp32 on the CPU.
    dropout and pad_vocab_multiple are not part of the weights: pass them for fine-tuning."""
    directory = local_pretrained_dir(name_or_dir) or _download(name_or_dir)
    config_file = directory / "config.json"
    try:
        cfg = model_config_from_hf(json.loads(config_file.read_text()))
        cfg.dropout, cfg.pad_vocab_multiple = dropout, pad_vocab_multiple
        cfg.check()
        state = hf_to_gpt(_read_weights(directory), cfg)
    except (ValueError, KeyError) as err:
        raise UserError(f"{directory}: {err}") from err
    state = {k: v.float() for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return model_from_state_dict(cfg, state)


def hf_config_dict(cfg: ModelConfig, eot_token: int = 50256) -> dict[str, Any]:
    """A transformers GPT2Config dict for cfg (architectures ["GPT2LMHeadModel"]); eot_token: bos/eos id."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.layer_norm_epsilon,
        initializer_range=cfg.init_std, bos_token_id=eot_token, eos_token_id=eot_token, tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    ).to_dict()


def export_hf(model_or_state: nn.Module | dict[str, Tensor], cfg: ModelConfig, out_dir: str | Path,
              eot_token: int = 50256) -> Path:
    """Write config.json + model.safetensors into out_dir so that transformers.GPT2LMHeadModel.from_pretrained
    loads it with no missing or unexpected weights (eot_token: the tokenizer's bos/eos id). Returns out_dir."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    hf = gpt_to_hf(state, cfg)
    hf.pop("lm_head.weight")  # tied: transformers re-ties it on load (as save_pretrained does)
    hf = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in hf.items()}
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, eot_token), indent=2, sort_keys=True) + "\n")
    return out
