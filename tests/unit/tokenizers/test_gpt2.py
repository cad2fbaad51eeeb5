"""GPT-2 tokenizer: tiktoken-identical ids, offline resolution, clear errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import tiktoken

from gpt2.errors import UserError
from gpt2.tokenizers.gpt2 import PAT_STR, R50K_URL, get_tokenizer

TEXTS = [
    "Hello world",
    "héllo wörld — naïve café, 日本語のテキスト 🙂🚀 Ελληνικά",
    "  multiple   spaces\n\n\nnewlines\r\nand tabs\t\tend  ",
    "It's they're we've I'll don't 1234567 3.14 $$$ <|endoftext|> <html>",
    "",
]


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No GPT2_TIKTOKEN_FILE and an empty tiktoken cache, so resolution sees only what a test puts there."""
    monkeypatch.delenv("GPT2_TIKTOKEN_FILE", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def test_pat_str_is_tiktokens() -> None:
    from tiktoken_ext.openai_public import r50k_pat_str

    assert PAT_STR == r50k_pat_str


def test_known_ids(tiktoken_file: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_token == 50256
    assert tok.n_vocab == 50257
    assert tok.decode([50256]) == "<|endoftext|>"
    assert 50256 not in tok.encode("<|endoftext|>")  # ordinary encoding: specials are plain text
    assert get_tokenizer(tiktoken_file) is tok  # cached per path


def test_round_trip_and_batch(tiktoken_file: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS, num_threads=2) == [tok.encode(t) for t in TEXTS]


def test_matches_tiktoken_and_uses_its_cache(tiktoken_file: str, isolated_env: Path, tmp_path: Path) -> None:
    # Put GPT-2's vocabulary file where tiktoken caches r50k_base: tiktoken then loads it offline, and
    # get_tokenizer must find it there too (source b) without pip.
    cached = isolated_env / hashlib.sha1(R50K_URL.encode()).hexdigest()
    shutil.copyfile(tiktoken_file, cached)
    tok = get_tokenizer(cache_dir=str(tmp_path / "no-whisper-copy"))
    assert tok.source == str(cached)
    ref = tiktoken.get_encoding("r50k_base")
    for text in TEXTS + [Path(__file__).read_text()]:
        assert tok.encode(text) == ref.encode_ordinary(text)
    assert tok.n_vocab == ref.n_vocab and tok.eot_token == ref.eot_token


def test_env_var_and_whisper_copy(tiktoken_file: str, isolated_env: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # (c) a previously extracted copy under <cache_dir>/tokenizer/ is used without pip
    cache_dir = tmp_path / "gpt2-cache"
    (cache_dir / "tokenizer").mkdir(parents=True)
    shutil.copyfile(tiktoken_file, cache_dir / "tokenizer" / "gpt2.tiktoken")
    tok = get_tokenizer(cache_dir=str(cache_dir))
    assert tok.source == str(cache_dir / "tokenizer" / "gpt2.tiktoken")
    assert tok.encode("Hello world") == [15496, 995]
    # (a) the environment variable wins over the cache
    other = tmp_path / "mine.tiktoken"
    shutil.copyfile(tiktoken_file, other)
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(other))
    assert get_tokenizer(cache_dir=str(cache_dir)).source == str(other)


def test_bad_explicit_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does-not-exist.*not a file"):
        get_tokenizer(str(tmp_path / "does-not-exist.tiktoken"))
    wrong = tmp_path / "wrong.tiktoken"
    wrong.write_text("SGVsbG8= 0\n")
    with pytest.raises(UserError, match=r"wrong.tiktoken.*sha256"):
        get_tokenizer(str(wrong))


def test_nothing_available_explains_the_three_ways(isolated_env: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # pip and tiktoken's download both go through a dead proxy: fails fast, no real network used.
    dead = "http://127.0.0.1:9"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.invalid/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    with pytest.raises(UserError) as info:
        get_tokenizer(cache_dir=str(tmp_path / "empty-cache"))
    msg = str(info.value)
    assert "tokenizer.path" in msg and "GPT2_TIKTOKEN_FILE" in msg
    assert "pip download --no-deps --no-binary :all: openai-whisper==20250625" in msg
    assert "network" in msg
    assert not (tmp_path / "empty-cache" / "tokenizer" / "gpt2.tiktoken").exists()
