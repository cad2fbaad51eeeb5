"""run_export.py OUT.gguf, proved by llama.cpp itself (llama-cpp-python, the `llamacpp` extra): it loads the file,
tokenizes text into our ids (GPT-2's tokenizer and our BPE), gives our logits within a stated tolerance, and greedy
generation gives our tokens; models and tokenizers llama.cpp cannot run are refused in one line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.checkpoint.gguf_export import export_gguf
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.generate.sampling import generate
from gpt2.model.gpt import GPT
from gpt2.tokenizers.bpe import HFTokenizer
from gpt2.tokenizers.gguf_vocab import gguf_vocab
from gpt2.train.launch import train
from tests.helpers import REPO, compose_train, save_model_checkpoint, subprocess_env

# max |llama.cpp logit - ours| / max |our logit| over every position and vocabulary entry of a 60-token text, with
# llama.cpp's defaults (an f16 KV cache; its GELU reads an fp16 table). Measured on the two models below: f32 files
# 2.9e-5 (GPT-2's vocabulary) and 3.5e-4 (BPE; 1.7e-4 with an f32 KV cache), f16 files 1.8e-4 and 4.9e-4. The
# bounds leave about 3x and 4x.
TOLERANCE = {"f32": 1e-3, "f16": 2e-3}

PASSAGE = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
           "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n"
           "That thou her maid art far more fair than she.\n\n")
TRICKY = ["ROMEO:\nWhat light through yonder window breaks?", "  two  spaces\tand a tab\r\n", "12345 3.14159",
          "Unicode: héllo wörld — naïve, 日本語, emoji 🙂🚀", "", "\n\n\n", "def f(x):\n    return x ** 2\n",
          "it's they're we've I'm you'll he'd IT'S", "a <|endoftext|> in text", "trailing spaces   ",
          "\u00a0nbsp\u3000"]
PIECES = list("abcXYZ019 '\t\n\r.,!?-_()[]{}:;\"") + [
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "  ", "   ", "\n\n", " \n", "\u00a0", "\u3000", "\u2003", "é",
    "ß", "日本", "語", "🙂", "🚀", "\u0301", "Ω", "٣", "²", "½", "\u200b", "\ufeff", "ｱ", "\x00", "\x7f", "\u2028",
    "\x0b", "\x0c", "\x85", "Ⅻ", "𝔘", "\u00ad", "<|endoftext|>"]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Strings built from the pieces a pre-tokenizer treats specially: letters, digits, contractions, whitespace
    kinds, punctuation, combining marks, CJK, emoji, control characters."""
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def passage_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("passage")
    for i in range(40):
        (root / f"d{i:02d}.txt").write_text(PASSAGE)
    return root


def trained_run(kind: str, corpus: Path, root: Path, tiktoken_file: str) -> Path:
    """A tiny model trained on the passage: the BPE's (371 ids: the passage has no more pairs) 100 steps, until
    greedy decoding recites it; GPT-2's vocabulary costs 30x more per step, so 8 steps."""
    args = ["debug=cpu", "data=text", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}", "data.num_proc=1",
            "optimizer.lr=1e-2", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0", "total_batch_tokens=256",
            "micro_batch_size=4", "block_size=64", "scheduler.warmup_steps=2", "log_interval=10"]
    if kind == "bpe":
        args += ["tokenizer=bpe", "tokenizer.vocab_size=400", "max_steps=100"]
    else:
        args += [f"tokenizer.path={tiktoken_file}", "max_steps=8"]
    train(compose_train(args), root / "run")
    return root / "run"


def relative_error(llm, model: GPT, ids: list[int]) -> float:
    """max |llama.cpp's logits - ours| / max |ours| over every position of `ids`."""
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0, :, : model.cfg.vocab_size].numpy()
    return float(np.abs(theirs - ours).max() / np.abs(ours).max())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_llama_cpp_runs_the_gguf_file_with_our_ids_logits_and_greedy_tokens(
        kind: str, passage_corpus: Path, tiktoken_file: str, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra (pip install -e '.[llamacpp]')")
    run = trained_run(kind, passage_corpus, tmp_path, tiktoken_file)
    out = tmp_path / "model.gguf"
    proc = subprocess.run([sys.executable, str(REPO / "run_export.py"), str(run), str(out)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == f"wrote {out}\n", proc.stdout + proc.stderr
    ckpt = find_checkpoint(run)
    model, tok = ckpt.model().eval(), ckpt.tokenizer(tiktoken_file if kind == "gpt2" else None)
    assert isinstance(tok, HFTokenizer) == (kind == "bpe")
    llm = llama_cpp.Llama(str(out), n_ctx=model.cfg.n_positions, logits_all=True, verbose=False, n_threads=1)
    try:
        assert llm.n_vocab() == tok.n_vocab and llm.token_eos() == llm.token_bos() == tok.eot_token
        for text in TRICKY + random_strings(2000):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), repr(text)
        ids = tok.encode(PASSAGE)[:60]
        assert relative_error(llm, model, ids) <= TOLERANCE["f32"]
        prompt = tok.encode("ROMEO:\nBut")
        with torch.no_grad():
            ours = generate(model, torch.tensor([prompt]), 48, temperature=0.0)[0]
            top2 = model(ours[None, :-1]).logits[0, len(prompt) - 1 :, : tok.n_vocab].topk(2).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        # each greedy choice is clear by more than the logits may differ: llama.cpp owes us the same tokens
        assert margin > 2 * TOLERANCE["f32"] * float(top2[:, 0].abs().max()), margin
        theirs = [t for _, t in zip(range(48), llm.generate(prompt, temp=0.0, top_k=1, reset=True))]
        assert theirs == ours[len(prompt):].tolist()
        if kind == "bpe":  # the memorised passage: a real continuation, not one repeated token
            assert tok.decode(theirs).startswith(", soft! what light through yonder window breaks?")
    finally:
        llm.close()
    half = export_gguf(run, tmp_path / "model-f16.gguf", dtype="f16")
    assert half.stat().st_size < 0.6 * out.stat().st_size
    llm = llama_cpp.Llama(str(half), n_ctx=model.cfg.n_positions, logits_all=True, verbose=False, n_threads=1)
    try:
        assert relative_error(llm, model, ids) <= TOLERANCE["f16"]
    finally:
        llm.close()


def test_a_model_with_non_gpt2_switches_is_refused_in_one_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=50257,
                      position_embedding="rope", mlp_activation="relu2")
    save_model_checkpoint(tmp_path / "run", 1, GPT(cfg))
    proc = subprocess.run([sys.executable, str(REPO / "run_export.py"), str(tmp_path / "run"),
                           str(tmp_path / "m.gguf")], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == ("error: cannot export a model with position_embedding=rope, mlp_activation=relu2 to GGUF: "
                           "llama.cpp's gpt2 architecture has no such option; only models trained with the GPT-2 "
                           "defaults of these switches export.\n")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(UserError, match=r"lies inside a training checkpoint"):
        export_gguf(tmp_path / "run", tmp_path / "run" / "checkpoints" / "m.gguf")


@pytest.mark.parametrize(("change", "reason"), [
    (lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True), r"its pre-tokenizer is .* not ByteLevel"),
    (lambda spec: spec.update(normalizer={"type": "NFC"}), r"it has a normalizer"),
    (lambda spec: spec["added_tokens"].append({**spec["added_tokens"][0], "id": 4096, "content": "<user>",
                                               "special": False}), r"added token '<user>' is not special"),
    (lambda spec: spec["model"].update(ignore_merges=True), r"its BPE has ignore_merges=true"),
])
def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(bpe_tok: HFTokenizer, change, reason: str) -> None:
    spec = json.loads(bpe_tok.json_text)
    change(spec)
    tok = HFTokenizer.from_json(json.dumps(spec), "changed.json", encoder="tokenizers")
    with pytest.raises(UserError, match=r"cannot write tokenizer changed.json into a GGUF file: " + reason):
        gguf_vocab(tok, tok.n_vocab)
    assert gguf_vocab(bpe_tok, bpe_tok.n_vocab).tokens[bpe_tok.eot_token] == "<|endoftext|>"  # the trained one passes
