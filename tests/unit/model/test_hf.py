"""gpt2.model.hf and gpt2.checkpoint.export against a tiny random transformers.GPT2LMHeadModel (no download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.model.gpt import GPT
from gpt2.model.hf import export_hf, gpt_to_hf, hf_to_gpt, load_pretrained, model_config_from_hf
from tests.helpers import REPO, hf_logits


def tiny_hf(vocab_size: int = 50257) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=vocab_size)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_hf")
    tiny_hf().save_pretrained(path)
    return path


def test_load_pretrained_matches_hf_logits(hf_dir: Path) -> None:
    model = load_pretrained(str(hf_dir)).eval()
    assert model.cfg.n_layer == 2 and model.cfg.n_positions == 128 and model.cfg.vocab_size == 50257
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf_logits(hf_dir, idx))
        padded = load_pretrained(str(hf_dir), dropout=0.1, pad_vocab_multiple=64).eval()
        assert padded.cfg.dropout == 0.1 and padded.transformer.wte.weight.shape == (50304, 64)
        torch.testing.assert_close(padded(idx).logits, model(idx).logits)


def test_old_layout_with_mask_buffers_and_bin_file(hf_dir: Path, tmp_path: Path) -> None:
    """Old transformers files: no `transformer.` prefix, attn.bias/masked_bias buffers, pytorch_model.bin."""
    hf = tiny_hf()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(str(tmp_path)).eval()(idx).logits, hf(idx).logits)


def test_shape_mismatch_names_key_and_shapes() -> None:
    hf_state = tiny_hf(vocab_size=1000).state_dict()
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=1000)
    hf_to_gpt(hf_state, cfg)  # fits
    bad = dict(hf_state, **{"transformer.h.1.mlp.c_fc.weight": torch.zeros(256, 64)})  # not transposed
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*\(256, 64\).*\(64, 256\)"):
        hf_to_gpt(bad, cfg)
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight.*\(128, 64\).*\(256, 64\)"):
        hf_to_gpt(hf_state, ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=1000))
    missing = {k: v for k, v in hf_state.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.bias: missing"):
        hf_to_gpt(missing, cfg)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\..*unexpected key.*1-layer"):
        hf_to_gpt(hf_state, ModelConfig(n_layer=1, n_head=2, n_embd=64, n_positions=128, vocab_size=1000))
    state = hf_to_gpt(hf_state, cfg)
    state["transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 65)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj\.weight.*\(64, 65\).*\(64, 64\)"):
        gpt_to_hf(state, cfg)


def test_export_roundtrip_to_transformers(hf_dir: Path, tmp_path: Path) -> None:
    model = load_pretrained(str(hf_dir)).eval()
    out = export_hf(model, model.cfg, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert model_config_from_hf(config) == model.cfg
    idx = torch.randint(0, 50257, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, idx), model(idx).logits)


def test_export_padded_vocab_without_bias(tmp_path: Path) -> None:
    """Padded rows are dropped and missing biases become zeros: HF computes the same logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=1000, pad_vocab_multiple=64,
                      bias=False)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.transformer.wte.weight[1000:])  # padding must not leak into the export
    export_hf(model.state_dict(), cfg, tmp_path)
    idx = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path, idx), model(idx).logits)
    back = load_pretrained(str(tmp_path))
    assert back.cfg.vocab_size == 1000 and back.cfg.padded_vocab_size == 1000


def test_unsupported_hf_config_and_bad_names(tmp_path: Path) -> None:
    base = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64).to_dict()
    with pytest.raises(ValueError, match="n_inner=100"):
        model_config_from_hf({**base, "n_inner": 100})
    with pytest.raises(ValueError, match="activation_function='relu'"):
        model_config_from_hf({**base, "activation_function": "relu"})
    with pytest.raises(UserError, match="neither a directory nor a known model; choose one of gpt2, gpt2-medium"):
        load_pretrained("gpt3")
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(base))
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        load_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read the weights"):
        load_pretrained(str(tmp_path))


@pytest.mark.slow
def test_hub_name_offline_says_how_to_pass_a_directory(tmp_path: Path) -> None:
    code = ("from gpt2.errors import UserError\nfrom gpt2.model.hf import load_pretrained\n"
            "try:\n    load_pretrained('gpt2-medium')\nexcept UserError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cannot download 'gpt2-medium'" in proc.stdout
    assert "HF_HUB_OFFLINE is set" in proc.stdout and "pretrained=DIR" in proc.stdout
