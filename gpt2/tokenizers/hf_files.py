"""Tokenizer files for a Hugging Face export, so that ``AutoTokenizer.from_pretrained(out)`` gives the
ids the model was trained with.

GPT-2 (tiktoken): the standard ``vocab.json`` + ``merges.txt``, rebuilt from GPT-2's vocabulary file: each
token's bytes are written through GPT-2's byte-to-unicode table, and each merge is recovered by
running BPE on a token's bytes with only the lower ranks allowed (the two parts left are the merge).
Our BPE: its ``tokenizer.json`` as trained. Both get a ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2.tokenizers.bpe import TOKENIZER_FILE, HFTokenizer
from gpt2.tokenizers.byte_level import bytes_to_unicode
from gpt2.tokenizers.factory import AnyTokenizer
from gpt2.tokenizers.gpt2 import EOT

TOKENIZER_FILES = ("vocab.json", "merges.txt", TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
"""Every tokenizer file an export may hold (an earlier export's leftovers of another kind are removed)."""


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE on `token`'s bytes using only merges ranked below max_rank (tiktoken's algorithm)."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def gpt2_vocab_and_merges(ranks: dict[bytes, int], eot_id: int) -> tuple[dict[str, int], list[str]]:
    """vocab.json's mapping and merges.txt's lines (in rank order) from tiktoken's mergeable ranks."""
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT] = eot_id
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    return vocab, merges


def write_tokenizer_files(tok: AnyTokenizer, out: Path, model_max_length: int) -> list[str]:
    """Write `tok`'s Hugging Face files into `out`; returns their names."""
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config: dict[str, Any] = {**special, "model_max_length": model_max_length, "add_prefix_space": False,
                              "clean_up_tokenization_spaces": False}
    if isinstance(tok, HFTokenizer):
        (out / TOKENIZER_FILE).write_text(tok.json_text, encoding="utf-8")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        names = [TOKENIZER_FILE]
    else:
        vocab, merges = gpt2_vocab_and_merges(tok.encoding._mergeable_ranks, tok.eot_token)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        config["tokenizer_class"] = "GPT2Tokenizer"
        names = ["vocab.json", "merges.txt"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return [*names, "tokenizer_config.json", "special_tokens_map.json"]
