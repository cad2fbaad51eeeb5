"""Our own byte-level BPE (Hugging Face ``tokenizers``): `HFTokenizer`, with the GPT-2 `Tokenizer`'s API,
wraps a tokenizer.json; `trained_bpe` trains one on a corpus once per (corpus contents, settings) and
caches it as ``<cache_dir>/tokenizer/bpe-<key>.json``. gpt2.tokenizers.factory turns a ``tokenizer``
config into a tokenizer.

Encoding runs tiktoken when the BPE converts to it exactly (gpt2.tokenizers.bpe_tiktoken: same ids, several
times faster), else ``tokenizers``; one log line says which when a tokenizer is loaded or trained.
``GPT2_BPE_ENCODER=tokenizers`` always uses ``tokenizers`` (to compare the two, or to rule the conversion out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import tiktoken

from gpt2.config import TokenizerConfig
from gpt2.errors import UserError
from gpt2.tokenizers.bpe_tiktoken import NotExact, tiktoken_encoding
from gpt2.tokenizers.gpt2 import EOT
from gpt2.utils.fs import atomic_write

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
"""Name of a Hugging Face tokenizer file beside prepared shards and in checkpoints."""
BPE_VERSION = 1
"""Bump when the training recipe changes (invalidates cached tokenizers)."""
TRAIN_CHUNK_CHARS = 1 << 16
"""Characters per string handed to the BPE trainer."""
PROGRESS_S = 30.0
"""Seconds between progress lines while the BPE trainer reads the corpus."""
ENCODER_ENV = "GPT2_BPE_ENCODER"
"""Environment variable choosing how HFTokenizer encodes: "auto" (tiktoken when exact) or "tokenizers"."""
ENCODERS = ("auto", "tokenizers")


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with the GPT-2 `Tokenizer`'s API: ``encode`` treats
    special tokens in text as plain text, ``decode`` keeps them.

    A byte-level BPE that tiktoken can run exactly (gpt2.tokenizers.bpe_tiktoken) encodes through tiktoken,
    several times faster, with the same ids; ``encoding`` is then that ``tiktoken.Encoding`` (data
    preparation calls its ``encode_to_numpy``), else None. encoder: "auto" (tiktoken when exact) or
    "tokenizers" (always the Rust tokenizer); None reads ``$GPT2_BPE_ENCODER``, default "auto". Lone
    surrogates in text are encoded as U+FFFD on both paths (as tiktoken and the GPT-2 tokenizer do).
    """

    def __init__(self, tok: Any, json_text: str, source: str | None, encoder: str | None = None) -> None:
        self._setup(tok, json_text, source)
        if encoder_choice(encoder) == "tokenizers":
            why = "encoder='tokenizers'" if encoder is not None else f"{ENCODER_ENV}=tokenizers"
        else:
            try:
                self.encoding = tiktoken_encoding(json_text, self.id)
                why = ""
            except NotExact as e:
                why = f"the conversion would not be exact: {e}"
        name = source or self.id
        if self.encoding is not None:
            log.info("BPE tokenizer %s: encoding with tiktoken (an exact conversion of its merges)", name)
        else:
            log.info("BPE tokenizer %s: encoding with Hugging Face tokenizers, not tiktoken (%s)", name, why)

    def _setup(self, tok: Any, json_text: str, source: str | None) -> None:
        self.tok = tok
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, as with tiktoken
        self.json_text = json_text
        """The tokenizer.json this tokenizer was loaded from (copied into checkpoints and exports)."""
        self.source = source
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise UserError(f"the tokenizer {source or ''} has no {EOT} token (the document separator); add it "
                            f"to its special tokens (tokenizer=bpe does so when tokenizer.special_tokens lists it).")
        self.eot_token: int = eot
        self.n_vocab: int = tok.get_vocab_size(with_added_tokens=True)
        self.id: str = "hf-" + hashlib.sha256(json_text.encode()).hexdigest()[:16]
        self.encoding: tiktoken.Encoding | None = None
        """The exact tiktoken equivalent that `encode` runs, or None (`encode` runs `tok`)."""

    @classmethod
    def from_json(cls, text: str, source: str | None = None, encoder: str | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tok = RustTokenizer.from_str(text)
        except Exception as e:
            raise UserError(f"{source or 'the tokenizer.json'} is not a readable Hugging Face tokenizer.json "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                            f"point tokenizer.path at a tokenizer.json saved by `tokenizers`.") from None
        return cls(tok, text, source, encoder)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], encoder: str | None = None) -> HFTokenizer:
        p = Path(os.path.expanduser(str(path)))
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"tokenizer.path={str(path)!r} cannot be read ({type(e).__name__}: "
                            f"{getattr(e, 'strerror', None) or e}); point it at a tokenizer.json.") from None
        return cls.from_json(text, str(path), encoder)

    def encode(self, text: str) -> list[int]:
        if self.encoding is not None:
            return self.encoding.encode_ordinary(text)
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side takes no lone surrogates: replace them, as tiktoken does
            if not isinstance(text, str):
                raise
            return self.tok.encode(without_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        if self.encoding is not None:
            return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        try:
            return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError:
            if not all(isinstance(t, str) for t in texts):
                raise
            return [e.ids for e in self.tok.encode_batch([without_surrogates(t) for t in texts],
                                                         add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        """What checkpoints record about this tokenizer (meta.json)."""
        return {"kind": "hf", "id": self.id, "n_vocab": self.n_vocab, "eot_token": self.eot_token,
                "file": TOKENIZER_FILE}

    def files(self) -> dict[str, bytes]:
        """Files that carry this tokenizer (into checkpoints)."""
        return {TOKENIZER_FILE: self.json_text.encode()}

    def __getstate__(self) -> dict[str, Any]:  # pool workers under spawn get the JSON, not the Rust object
        return {"json_text": self.json_text, "source": self.source, "encoding": self.encoding}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The same tokenizer in another process: the tiktoken encoding comes pickled (checked, and logged,
        once by the process that loaded the file)."""
        from tokenizers import Tokenizer as RustTokenizer

        self._setup(RustTokenizer.from_str(state["json_text"]), state["json_text"], state["source"])
        self.encoding = state["encoding"]

    def __repr__(self) -> str:
        engine = "tiktoken" if self.encoding is not None else "tokenizers"
        return f"HFTokenizer(n_vocab={self.n_vocab}, id={self.id}, source={self.source!r}, encoder={engine})"


def encoder_choice(encoder: str | None) -> str:
    """`encoder`, or $GPT2_BPE_ENCODER when it is None (default "auto"); UserError for another value."""
    value = encoder if encoder is not None else os.environ.get(ENCODER_ENV, "auto") or "auto"
    if value not in ENCODERS:
        origin = "encoder" if encoder is not None else ENCODER_ENV
        raise UserError(f"{origin}={value!r} is not a BPE encoder; choose one of {', '.join(ENCODERS)}.")
    return value


def without_surrogates(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (what tiktoken's encode_ordinary does with them)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ------------------------------------------------------------------ training


def _training_texts(docs: Iterator[Iterator[str]], max_bytes: int | None, counter: list[int]) -> Iterator[str]:
    """Document pieces in chunks of about TRAIN_CHUNK_CHARS, at most max_bytes (UTF-8) in all."""
    for doc in docs:
        for piece in doc:
            for i in range(0, len(piece), TRAIN_CHUNK_CHARS):
                chunk = piece[i:i + TRAIN_CHUNK_CHARS]
                n = len(chunk.encode("utf-8"))
                if max_bytes is not None and counter[0] + n > max_bytes:
                    chunk = chunk.encode("utf-8")[: max_bytes - counter[0]].decode("utf-8", errors="ignore")
                    n = len(chunk.encode("utf-8"))
                    counter[0] += n
                    if chunk:
                        yield chunk
                    return
                counter[0] += n
                yield chunk


def _reading_progress(texts: Iterator[str], counter: list[int], total: int | None) -> Iterator[str]:
    """`texts`, with a log line every PROGRESS_S seconds while the trainer reads them and one when it is done."""
    t0 = last = time.time()
    of = f" of {total / 1e6:,.1f}" if total else ""
    for text in texts:
        yield text
        if time.time() - last >= PROGRESS_S:
            last = time.time()
            log.info("BPE training: read %.1f%s MB (%.1f MB/s)", counter[0] / 1e6, of, counter[0] / 1e6 / (last - t0))
    log.info("BPE training: read %.1f MB in %.1fs; the trainer finishes counting words, then computes merges",
             counter[0] / 1e6, time.time() - t0)


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int, special_tokens: Sequence[str],
              show_progress: bool = False) -> str:
    """Train a byte-level BPE on `texts`; returns its tokenizer.json text (deterministic for the same input).
    show_progress: the `tokenizers` trainer's own progress bars (on a terminal)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def bpe_key(cfg: TokenizerConfig, source_key: dict[str, Any]) -> str:
    """sha256 of what determines a trained BPE: corpus contents, settings, recipe version."""
    blob = {"version": BPE_VERSION, "vocab_size": cfg.vocab_size, "min_frequency": cfg.min_frequency,
            "special_tokens": list(cfg.special_tokens), "train_max_bytes": cfg.train_max_bytes,
            "source": source_key}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class Corpus(Protocol):
    """What BPE training reads: documents as iterators of text pieces (gpt2.data.sources.Source is one)."""

    key: dict[str, Any]
    n_bytes: int | None
    describe: str
    docs: Callable[[], Iterator[Iterator[str]]]


def trained_bpe(cfg: TokenizerConfig, source: Corpus, cache_dir: str | os.PathLike[str]) -> HFTokenizer:
    """The BPE trained on `source` with cfg's settings: from the cache, else trained now and cached."""
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    path = cache_dir / "tokenizer" / f"bpe-{bpe_key(cfg, source.key)[:32]}.json"
    if path.is_file():
        log.info("Reusing trained BPE tokenizer %s", path)
        return HFTokenizer.from_file(path)
    cap = f"the first {cfg.train_max_bytes:,} bytes of " if cfg.train_max_bytes else ""
    log.info("Training a byte-level BPE (vocab_size=%d, min_frequency=%d) on %s%s", cfg.vocab_size,
             cfg.min_frequency, cap, source.describe)
    t0 = time.time()
    counter = [0]
    total = min(filter(None, (cfg.train_max_bytes, source.n_bytes)), default=None)
    texts = _reading_progress(_training_texts(source.docs(), cfg.train_max_bytes, counter), counter, total)
    text = train_bpe(texts, cfg.vocab_size, cfg.min_frequency, cfg.special_tokens, show_progress=sys.stderr.isatty())
    atomic_write(path, text)  # concurrent trainers end with the same complete file
    tok = HFTokenizer.from_json(text, str(path))
    log.info("Trained BPE tokenizer on %.1f MB in %.1fs: %d tokens -> %s", counter[0] / 1e6, time.time() - t0,
             tok.n_vocab, path)
    if tok.n_vocab < cfg.vocab_size:
        log.warning("The BPE has %d ids, not tokenizer.vocab_size=%d: no pair occurs min_frequency=%d times after "
                    "%d merges (a small corpus). The model's vocab_size follows the tokenizer (%d); set a smaller "
                    "tokenizer.vocab_size, or a larger train_max_bytes, to make this explicit.", tok.n_vocab,
                    cfg.vocab_size, cfg.min_frequency, tok.n_vocab - 256 - len(set(cfg.special_tokens)), tok.n_vocab)
    return tok
