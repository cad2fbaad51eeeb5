"""A byte-level BPE's tokenizer.json as a ``tiktoken.Encoding`` that gives the same ids as ``tokenizers``.

A BPE trained by ``tokenizers`` with GPT-2's byte-level pre-tokenizer is what GPT-2's vocab.json and
merges.txt are to its tiktoken vocabulary file (gpt2.tiktoken): every token's characters stand for bytes
(GPT-2's byte-to-unicode table), and tiktoken's mergeable ranks are the token ids. `tiktoken_encoding` builds
that encoding only when it is exact, and raises `NotExact` naming the first reason otherwise. Exact means:

- the pipeline adds or changes nothing tiktoken cannot: no normalizer; the pre-tokenizer is ByteLevel with
  ``add_prefix_space=false`` and ``use_regex=true``, whose regex (GPT-2's original pattern) tiktoken runs
  verbatim as `BYTE_LEVEL_PAT_STR`; a ByteLevel decoder; no post-processor but ByteLevel's (offsets only);
  no truncation or padding;
- the model is BPE without dropout, subword prefix or word suffix; all 256 bytes are tokens (so ``unk_token``
  and ``byte_fallback`` never apply), and every other token is spelled in byte-level characters;
- every added token is special (``encode`` treats special tokens in text as text, as tiktoken's
  ``encode_ordinary`` does; a non-special added token is matched in text by ``tokenizers`` only) and is no
  byte, no merge result, and no whole-word match for ``ignore_merges``;
- every token of two or more bytes is made by exactly one merge, and the ids of merged tokens rise in
  merge order (tiktoken merges the adjacent pair whose concatenation has the lowest id; ``tokenizers`` the
  pair with the lowest merge rank);
- ``tokenizers`` merges each merged token's own bytes back into that token. With the points above, this is
  what makes the two merge rules agree: tiktoken merges any adjacent pair (X, Y) whose bytes spell a token T,
  also when T's merge is another pair; were such X and Y ever adjacent in some text, the merges would also
  leave T's bytes alone as [X, Y] (a piece's bytes evolve the same with or without neighbours while no merge
  crosses its ends), and the check would fail. It also covers tiktoken taking a piece that is a token as that
  token without merging.
"""

from __future__ import annotations

import json
from typing import Any

import tiktoken

from gpt2.tokenizers.byte_level import bytes_to_unicode

BYTE_LEVEL_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The regex of ``tokenizers``' ByteLevel pre-tokenizer (GPT-2's original pattern), verbatim; tests check that
tiktoken splits text into the same pieces."""


class NotExact(ValueError):
    """A tokenizer.json that tiktoken cannot encode exactly as ``tokenizers`` does; the message says why."""


def _kind(component: dict[str, Any] | None) -> str:
    return "none" if component is None else json.dumps(component, sort_keys=True)[:120]


def check_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """The BPE model of `spec`, a parsed tokenizer.json, after checking it and everything around it."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotExact(f"its model is {model.get('type')!r}, not BPE")
    if spec.get("normalizer") is not None:
        raise NotExact(f"it has a normalizer ({_kind(spec['normalizer'])})")
    pre = spec.get("pre_tokenizer")
    if (pre or {}).get("type") != "ByteLevel" or pre.get("add_prefix_space", True) or not pre.get("use_regex", True):
        raise NotExact(f"its pre-tokenizer is {_kind(pre)}, not ByteLevel with add_prefix_space=false, use_regex=true")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotExact(f"its decoder is {_kind(spec.get('decoder'))}, not ByteLevel")
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        raise NotExact(f"its post-processor is {_kind(post)}, not none or ByteLevel")
    for key in ("truncation", "padding"):
        if spec.get(key) is not None:
            raise NotExact(f"it sets {key} ({_kind(spec[key])})")
    if model.get("dropout"):
        raise NotExact(f"its BPE has dropout={model['dropout']} (random merges)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise NotExact(f"its BPE has {key}={model[key]!r}")
    return model


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    """A merge as two token strings (tokenizer.json holds ["a", "b"], or "a b" in older files)."""
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    return a, b


def _check_self_encoding(vocab: dict[str, int], merges: list[tuple[str, str]], merged: list[str]) -> None:
    """NotExact unless the BPE merges turn each merged token's characters back into that token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    # byte-level characters are never whitespace, so WhitespaceSplit hands the model one token per word
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if tok.encode(" ".join(merged), add_special_tokens=False).ids == [vocab[t] for t in merged]:
        return
    for token, enc in zip(merged, tok.encode_batch(merged, add_special_tokens=False)):
        if enc.ids != [vocab[token]]:
            raise NotExact(f"its merges turn the bytes of token {token!r} (id {vocab[token]}) into ids {enc.ids}, "
                           f"so tiktoken, which merges by the bytes a pair spells, would differ")
    raise NotExact("its merges do not encode every token's bytes to that token")  # only with whitespace in tokens


def tiktoken_encoding(json_text: str, name: str) -> tiktoken.Encoding:
    """The tiktoken encoding equal to the byte-level BPE in `json_text` (see the module docstring for when
    it is exact); NotExact naming the reason when there is none."""

    spec = json.loads(json_text)
    model = check_pipeline(spec)
    added = spec.get("added_tokens") or []
    for t in added:
        if not t.get("special"):
            raise NotExact(f"added token {t.get('content')!r} is not special (tokenizers matches it in text, "
                           f"tiktoken's ordinary encoding cannot)")
    special = {t["content"]: int(t["id"]) for t in added}
    special_ids = set(special.values())
    vocab: dict[str, int] = model.get("vocab") or {}
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if i in special_ids:
            if special.get(token) != i:
                raise NotExact(f"id {i} is special token {next(k for k, v in special.items() if v == i)!r} and "
                               f"vocabulary token {token!r}")
            continue  # the trainer also writes special tokens into the model's vocabulary
        try:
            ranks[bytes(char_byte[c] for c in token)] = i
        except KeyError:
            raise NotExact(f"vocabulary token {token!r} (id {i}) is not spelled in byte-level characters") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NotExact(f"{len(missing)} of the 256 bytes have no token (the first: {missing[0]:#04x})")
    merges = [_merge_pair(m) for m in model.get("merges") or []]
    made: dict[str, int] = {}
    last = -1
    for rank, (a, b) in enumerate(merges):
        out = a + b
        if a not in vocab or b not in vocab or out not in vocab:
            raise NotExact(f"merge {rank} ({a!r}, {b!r}) names a token that is not in the vocabulary")
        if vocab[out] in special_ids:
            raise NotExact(f"merge {rank} ({a!r}, {b!r}) makes special token {out!r}")
        if out in made:
            raise NotExact(f"merges {made[out]} and {rank} both make {out!r} (tiktoken has one rank per token)")
        if vocab[out] <= last:
            raise NotExact(f"merge {rank} makes id {vocab[out]}, below the previous merge's id {last} (tiktoken "
                           f"merges by id, so ids must rise in merge order)")
        made[out] = rank
        last = vocab[out]
    unmade = [t for t, i in vocab.items() if len(t) > 1 and i not in special_ids and t not in made]
    if unmade:
        raise NotExact(f"{len(unmade)} tokens are made by no merge (the first: {unmade[0]!r})")
    if model.get("ignore_merges"):
        whole = [s for s in special if s in vocab]
        if whole:
            raise NotExact(f"ignore_merges=true would encode a word spelling special token {whole[0]!r} as it")
    _check_self_encoding(vocab, merges, list(made))
    return tiktoken.Encoding(name=name, pat_str=BYTE_LEVEL_PAT_STR, mergeable_ranks=ranks, special_tokens=special)
