"""gpt2.generate.command (run_generate.py's body): streaming that holds partial UTF-8, seeds, prompt cropping."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from gpt2.config import GenerateConfig, VocabFileConfig
from gpt2.errors import UserError
from gpt2.generate.command import _Streamer, generate_samples


def test_streamer_holds_partial_utf8(tiktoken_file: str) -> None:
    from gpt2.tokenizers.gpt2 import get_tokenizer

    tok = get_tokenizer(tiktoken_file)
    text = "naïve 🤖 says 你好!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    out = io.StringIO()
    streamer = _Streamer(tok.decode, out)
    pieces = []
    for i in ids:
        before = out.getvalue()
        streamer(torch.tensor([[i]]))
        pieces.append(out.getvalue()[len(before):])
    streamer.finish()
    assert out.getvalue() == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_generate_samples_seed_stream_and_crop(tiny_hf_dir: Path, tiktoken_file: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The body of run_generate.py, called in-process."""
    def run(**kw) -> tuple[list[str], str]:
        kw = {"prompt": "Hello world", "max_new_tokens": 24, **kw}
        cfg = GenerateConfig(pretrained=str(tiny_hf_dir), tokenizer=VocabFileConfig(path=tiktoken_file), device="cpu",
                             num_samples=2, **kw)
        out = io.StringIO()
        return generate_samples(cfg, out), out.getvalue()

    a_samples, a_text = run(seed=1)
    assert len(a_samples) == 2 and all(s.startswith("Hello world") and len(s) > 20 for s in a_samples)
    assert a_samples[0] != a_samples[1]
    assert a_text == "\n---------------\n".join(a_samples) + "\n"
    assert run(seed=1, stream=True) == (a_samples, a_text)  # same seed, same text, streamed or not
    assert run(seed=2)[0] != a_samples
    long_prompt = "word" + " word" * 119  # 120 tokens
    cropped, _ = run(prompt=long_prompt, max_new_tokens=20, temperature=0.0)
    assert "prompt cropped to its last 108 of 120 tokens" in capsys.readouterr().err
    assert cropped[0].startswith(" word" * 108) and not cropped[0].startswith(" word" * 109)
    with pytest.raises(UserError, match="the prompt is 120 tokens but only n_positions - max_new_tokens"):
        run(prompt=long_prompt, max_new_tokens=20, crop_prompt=False)
