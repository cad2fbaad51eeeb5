"""A tokenizer as GGUF metadata for llama.cpp (`tokenizer.ggml.*`): the tokens in GPT-2's byte-level spelling,
their types, the BPE merges in rank order, the end-of-text id, and the pre-tokenizer llama.cpp splits text with.

llama.cpp's BPE (tokenizer model `gpt2`) splits text with a named pre-tokenizer, then merges the adjacent pair of
lowest merge rank, as Hugging Face `tokenizers` does. Its `gpt-2` pre-tokenizer is GPT-2's regex, the one of
tokenizers' ByteLevel pre-tokenizer and of tiktoken's GPT-2 encoding, so both our tokenizers map onto it:

- GPT-2's: vocab and merges rebuilt from its vocabulary file, as for a Hugging Face export (gpt2.tokenizers.hf_files);
- our byte-level BPE, when its tokenizer.json is exactly that pipeline: no normalizer, ByteLevel pre-tokenizer with
  ``add_prefix_space=false`` and ``use_regex=true``, a ByteLevel decoder, a BPE without dropout, subword prefix,
  word suffix or ``ignore_merges``, every token spelled in byte-level characters, all 256 bytes present, every added
  token special. Any other tokenizer.json is refused, naming the first difference: llama.cpp has no pre-tokenizer
  that would split its text the same way.

Special tokens are CONTROL tokens, which llama.cpp treats as plain text unless told to parse them (as our `encode`
does). tests/unit/checkpoint/test_gguf.py checks llama.cpp's ids against ours on tricky and on random strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gpt2.errors import UserError
from gpt2.tokenizers.bpe import HFTokenizer
from gpt2.tokenizers.bpe_tiktoken import NotExact, check_pipeline
from gpt2.tokenizers.byte_level import bytes_to_unicode
from gpt2.tokenizers.factory import AnyTokenizer
from gpt2.tokenizers.hf_files import gpt2_vocab_and_merges

LLAMA_CPP_PRE = "gpt-2"
"""llama.cpp's name for GPT-2's pre-tokenizer regex (tokenizer.ggml.pre)."""
NORMAL, CONTROL, UNUSED = 1, 3, 5
"""llama.cpp's token types (gguf.TokenType) of a vocabulary token, a special token, and an id no token has."""


@dataclass(frozen=True)
class GGUFVocab:
    """What GGUF's tokenizer.ggml.* keys hold for one tokenizer."""

    tokens: list[str]
    """Token of each id, in GPT-2's byte-to-unicode spelling (special tokens as written)."""
    token_types: list[int]
    merges: list[str]
    """"left right" per merge, in rank order."""
    eot_token: int
    """The end-of-text id: llama.cpp's bos and eos."""
    pre: str = LLAMA_CPP_PRE


def _refuse(tok: HFTokenizer, reason: str) -> UserError:
    return UserError(f"cannot write tokenizer {tok.source or tok.id} into a GGUF file: {reason}. llama.cpp's BPE "
                     f"splits text with GPT-2's byte-level pre-tokenizer only, so it would encode other ids; export "
                     f"a model trained with tokenizer=gpt2 or tokenizer=bpe.")


def _bpe_tables(tok: HFTokenizer) -> tuple[dict[int, str], set[int], list[str]]:
    """(id -> token, special ids, merges) of our byte-level BPE; UserError naming what llama.cpp cannot run."""
    spec = json.loads(tok.json_text)
    try:
        model = check_pipeline(spec)
    except NotExact as err:
        raise _refuse(tok, str(err)) from None
    if model.get("ignore_merges"):
        raise _refuse(tok, "its BPE has ignore_merges=true (a word in the vocabulary is taken whole)")
    added = spec.get("added_tokens") or []
    plain = [t.get("content") for t in added if not t.get("special")]
    if plain:
        raise _refuse(tok, f"added token {plain[0]!r} is not special (tokenizers matches it in text)")
    byte_chars = set(bytes_to_unicode().values())
    by_id: dict[int, str] = {}
    for token, i in (model.get("vocab") or {}).items():
        by_id[int(i)] = token
    special = {int(t["id"]) for t in added}
    for t in added:
        by_id[int(t["id"])] = t["content"]
    for i, token in by_id.items():
        if i not in special and not set(token) <= byte_chars:
            raise _refuse(tok, f"vocabulary token {token!r} (id {i}) is not spelled in byte-level characters")
    missing = byte_chars - set(by_id.values())
    if missing:
        raise _refuse(tok, f"{len(missing)} of the 256 byte tokens are missing")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return by_id, special, merges


def gguf_vocab(tok: AnyTokenizer, n_vocab: int) -> GGUFVocab:
    """The GGUF tokenizer metadata of `tok`, for a model with `n_vocab` token ids; UserError when llama.cpp cannot
    encode text into `tok`'s ids."""
    if tok.n_vocab != n_vocab:
        raise UserError(f"the tokenizer has {tok.n_vocab} ids but the model's vocab_size is {n_vocab}; llama.cpp needs "
                        f"one token per embedding row. Export a checkpoint whose model follows its tokenizer.")
    if isinstance(tok, HFTokenizer):
        by_id, special, merges = _bpe_tables(tok)
    else:
        vocab, merges = gpt2_vocab_and_merges(tok.encoding._mergeable_ranks, tok.eot_token)
        by_id, special = {i: token for token, i in vocab.items()}, {tok.eot_token}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [CONTROL if i in special else NORMAL if i in by_id else UNUSED for i in range(n_vocab)]
    return GGUFVocab(tokens, types, merges, tok.eot_token)
