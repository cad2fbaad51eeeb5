"""gpt2.checkpoint.export and run_export.py: a checkpoint exported for transformers (GPT-2 and our BPE),
whose tokenizer and greedy generation agree with ours."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.config import GenerateConfig, ModelConfig, VocabFileConfig
from gpt2.generate.command import generate_samples
from gpt2.model.gpt import GPT
from gpt2.tokenizers.bpe import TOKENIZER_FILE
from gpt2.train.launch import train
from tests.helpers import REPO, bpe_overrides, compose_train, hf_logits, save_model_checkpoint

EXPORT_STRINGS = ["ROMEO:\nWhat light through yonder window breaks?", "  two  spaces\tand a tab\r\n", "12345 3.14159",
                  "Unicode: héllo wörld — naïve, 日本語, emoji 🙂🚀", "", "\n\n\n", "def f(x):\n    return x ** 2\n"]


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_export_round_trip_with_transformers(kind: str, bpe_cache: Path, base_overrides: list[str],
                                             tmp_path: Path) -> None:
    import transformers

    from gpt2.checkpoint.export import export_checkpoint
    from gpt2.checkpoint.handle import find_checkpoint

    run = tmp_path / "run"
    steps = ["max_steps=2", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=4", "total_batch_tokens=256",
             "micro_batch_size=4", "block_size=64", "optimizer.lr=3e-3", "data.max_tokens=60000"]
    args = bpe_overrides(bpe_cache, *steps) if kind == "bpe" else [*base_overrides, *steps]
    train(compose_train(args), run)
    out = export_checkpoint(run, tmp_path / "hf")
    expected = {"gpt2": {"vocab.json", "merges.txt"}, "bpe": {TOKENIZER_FILE}}[kind]
    assert expected <= {p.name for p in out.iterdir()} and "tokenizer_config.json" in {p.name for p in out.iterdir()}
    vocab_file = next(a.split("=", 1)[1] for a in base_overrides if a.startswith("tokenizer.path="))
    vocab_file = vocab_file if kind == "gpt2" else None
    ours = find_checkpoint(run).tokenizer(vocab_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for s in EXPORT_STRINGS:
        assert hf_tok(s)["input_ids"] == ours.encode(s), s
        assert hf_tok.decode(ours.encode(s)) == s
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert model.config.eos_token_id == model.config.bos_token_id == ours.eot_token  # HF stops where we separate
    prompt = "ROMEO:"
    cfg = GenerateConfig(checkpoint=str(run), prompt=prompt, max_new_tokens=16, temperature=0, device="cpu",
                         dtype="fp32")
    [ours_text] = generate_samples(cfg, io.StringIO())
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=hf_tok.eos_token_id)
    assert hf_tok.decode(gen[0]) == ours_text
    # run_generate.py pretrained=OUT_DIR reads the export's own tokenizer too
    [from_export] = generate_samples(GenerateConfig(pretrained=str(out), prompt=prompt, max_new_tokens=16,
                                                    temperature=0, device="cpu", dtype="fp32",
                                                    tokenizer=VocabFileConfig(path=vocab_file)), io.StringIO())
    assert from_export == ours_text


@pytest.mark.slow
def test_export_cli_from_checkpoint(tmp_path: Path) -> None:

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=50257, pad_vocab_multiple=64)
    model = GPT(cfg).eval()
    run_dir = tmp_path / "run"
    save_model_checkpoint(run_dir, 7, model)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "run_export.py"), str(run_dir), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out / 'config.json'}" in proc.stdout
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, idx), model(idx).logits)

    proc = subprocess.run([sys.executable, str(REPO / "run_export.py"), str(tmp_path / "nope"), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
