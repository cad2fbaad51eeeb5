"""gpt2.generate.sampling and run_generate.py: KV-cached sampling vs full recompute and HF, the CLI in a subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.config import GenerateConfig, ModelConfig
from gpt2.errors import UserError
from gpt2.generate.samples import _Streamer, generate_samples
from gpt2.generate.sampling import generate, sample_next
from gpt2.model.gpt import GPT
from tests.helpers import save_model_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tiny_model(vocab_size: int = 101, n_positions: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=n_positions, vocab_size=vocab_size)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def ranks_file(tiktoken_file: str) -> str:
    """The GPT-2 ranks file from conftest's shared fixture (skips when it cannot be had offline)."""
    return tiktoken_file


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_hf")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def full_recompute(model: GPT, idx: torch.Tensor, n: int, generator: torch.Generator, **kw) -> torch.Tensor:
    """Reference sampler without a cache: re-run the whole sequence for every token."""
    with torch.no_grad():
        for _ in range(n):
            nxt = sample_next(model(idx).logits[:, -1], generator=generator, **kw)
            idx = torch.cat([idx, nxt], dim=1)
    return idx


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=10),
                                dict(temperature=1.3, top_p=0.9), dict(top_k=20, top_p=0.5)])
def test_cached_sampling_equals_full_recompute(kw: dict) -> None:
    model = tiny_model().double()  # fp64 so cache/no-cache rounding cannot flip a sample
    idx = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(0))
    got = generate(model, idx, 30, generator=torch.Generator().manual_seed(42), **kw)
    want = full_recompute(model, idx, 30, torch.Generator().manual_seed(42), **kw)
    assert got.shape == (3, 37)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_greedy_equals_hf_generate(hf_dir: Path) -> None:
    import transformers

    from gpt2.model.hf import load_pretrained

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = load_pretrained(str(hf_dir))
    prompt = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=50,
                           min_new_tokens=50, pad_token_id=50256)
    got = generate(ours, prompt, 50, temperature=0.0)
    assert got.shape == want.shape == (2, 59)
    assert got.tolist() == want.tolist()


def test_sample_next_top_k_and_top_p_sets() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_p=0.8, generator=g).unique().tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.81, generator=g).unique().tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_k=3, generator=g).unique().tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_p=0.01, generator=g).unique().tolist()) == {0}
    assert set(sample_next(logits, generator=g).unique().tolist()) == {0, 1, 2, 3}
    assert sample_next(logits[:1], temperature=0.0).tolist() == [[0]]


def test_eos_on_token_and_limits() -> None:
    model = tiny_model(n_positions=32)
    idx = torch.randint(0, 101, (2, 4))
    seen: list[torch.Tensor] = []
    out = generate(model, idx, 10, temperature=0.0, on_token=seen.append)
    assert len(seen) == 10 and torch.equal(torch.cat(seen, dim=1), out[:, 4:])
    eos = int(out[0, 6])  # the third greedy token of row 0 becomes "end of text"
    stopped = generate(model, idx, 10, temperature=0.0, eos_token=eos)
    assert stopped.size(1) <= 14 and stopped[0, 6] == eos
    assert (stopped[0, 6:] == eos).all()
    with pytest.raises(UserError, match=r"prompt of 4 tokens \+ max_new_tokens=29 = 33 exceeds n_positions=32"):
        generate(model, idx, 29)
    assert generate(model, idx, 28).shape == (2, 32)
    assert model.training is False


def test_streamer_holds_partial_utf8(ranks_file: str) -> None:
    from gpt2.tokenizers.gpt2 import get_tokenizer

    tok = get_tokenizer(ranks_file)
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


def run_generate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "run_generate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_generate_samples_seed_stream_and_crop(hf_dir: Path, ranks_file: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The body of run_generate.py, called in-process."""
    def run(**kw) -> tuple[list[str], str]:
        kw = {"prompt": "Hello world", "max_new_tokens": 24, **kw}
        cfg = GenerateConfig(pretrained=str(hf_dir), tokenizer_path=ranks_file, device="cpu", num_samples=2, **kw)
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


@pytest.mark.slow
def test_run_generate_cli(hf_dir: Path, ranks_file: str, tmp_path: Path) -> None:
    ok = run_generate([f"pretrained={hf_dir}", f"tokenizer_path={ranks_file}", "prompt=Hello world",
                       "max_new_tokens=24", "device=cpu", "seed=1", "num_samples=2"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    cfg = GenerateConfig(pretrained=str(hf_dir), tokenizer_path=ranks_file, prompt="Hello world",
                         max_new_tokens=24, device="cpu", seed=1, num_samples=2)
    assert ok.stdout == "\n---------------\n".join(generate_samples(cfg, io.StringIO())) + "\n"
    long_prompt = "prompt=" + "word " * 120
    bad = run_generate([f"pretrained={hf_dir}", f"tokenizer_path={ranks_file}", long_prompt, "max_new_tokens=20",
                        "crop_prompt=false"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: the prompt is 120 tokens") and "crop_prompt=true" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file


@pytest.mark.slow
def test_run_generate_from_checkpoint_and_errors(ranks_file: str, tmp_path: Path) -> None:

    model = tiny_model(vocab_size=50257)
    run_dir = tmp_path / "run"
    save_model_checkpoint(run_dir, 3, model)
    work = tmp_path / "cwd"
    work.mkdir()
    ok = run_generate([f"checkpoint={run_dir}", f"tokenizer_path={ranks_file}", "prompt=ROMEO:", "max_new_tokens=8",
                       "temperature=0"], work)
    assert ok.returncode == 0, ok.stderr
    from gpt2.tokenizers.gpt2 import get_tokenizer

    tok = get_tokenizer(ranks_file)
    ids = generate(model, torch.tensor([tok.encode("ROMEO:")]), 8, temperature=0.0)
    assert ok.stdout == tok.decode(ids[0].tolist()) + "\n"

    bad = run_generate([f"checkpoint={tmp_path / 'missing'}", f"tokenizer_path={ranks_file}"], work)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    both = run_generate([f"checkpoint={run_dir}", "pretrained=gpt2"], work)
    assert both.returncode == 2 and "exactly one of checkpoint" in both.stderr and "Traceback" not in both.stderr
    assert sorted(p.name for p in work.iterdir()) == []
