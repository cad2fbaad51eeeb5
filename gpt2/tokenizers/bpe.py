"""Our own byte-level BPE (Hugging Face ``tokenizers``), and the one place that turns a
``tokenizer`` config into a tokenizer object.

``tokenizer=gpt2`` is tiktoken's GPT-2 encoding (gpt2/tokenizer.py). ``tokenizer=bpe`` trains a
byte-level BPE on the corpus once per (corpus contents, settings) and caches its tokenizer.json
under ``<cache_dir>/tokenizer/bpe-<key>.json`` (written atomically); ``tokenizer=file`` loads an
existing tokenizer.json. Both are wrapped in `HFTokenizer`, which has the GPT-2 `Tokenizer`'s API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gpt2.config import DataConfig, TokenizerConfig, UserError
from gpt2.tokenizers.gpt2 import EOT, Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
"""Name of a Hugging Face tokenizer file beside prepared shards and in checkpoints."""
BPE_VERSION = 1
"""Bump when the training recipe changes (invalidates cached tokenizers)."""
TRAIN_CHUNK_CHARS = 1 << 16
"""Characters per string handed to the BPE trainer."""
PROGRESS_S = 30.0
"""Seconds between progress lines while the BPE trainer reads the corpus."""


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with the GPT-2 `Tokenizer`'s API: ``encode`` treats
    special tokens in text as plain text, ``decode`` keeps them."""

    def __init__(self, tok: Any, json_text: str, source: str | None) -> None:
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

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tok = RustTokenizer.from_str(text)
        except Exception as e:
            raise UserError(f"{source or 'the tokenizer.json'} is not a readable Hugging Face tokenizer.json "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                            f"point tokenizer.path at a tokenizer.json saved by `tokenizers`.") from None
        return cls(tok, text, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        p = Path(os.path.expanduser(str(path)))
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"tokenizer.path={str(path)!r} cannot be read ({type(e).__name__}: "
                            f"{getattr(e, 'strerror', None) or e}); point it at a tokenizer.json.") from None
        return cls.from_json(text, str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

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
        return {"json_text": self.json_text, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.__init__(RustTokenizer.from_str(state["json_text"]), state["json_text"], state["source"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"HFTokenizer(n_vocab={self.n_vocab}, id={self.id}, source={self.source!r})"


AnyTokenizer = Tokenizer | HFTokenizer


def describe(tok: AnyTokenizer) -> dict[str, Any]:
    """meta.json's record of a tokenizer (GPT-2: kind and id only)."""
    if isinstance(tok, HFTokenizer):
        return tok.describe()
    return {"kind": "gpt2", "id": tok.id, "n_vocab": tok.n_vocab, "eot_token": tok.eot_token}


def files(tok: AnyTokenizer) -> dict[str, bytes]:
    return tok.files() if isinstance(tok, HFTokenizer) else {}


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


def trained_bpe(cfg: TokenizerConfig, data: DataConfig) -> HFTokenizer:
    """The BPE trained on data's corpus with cfg's settings: from the cache, else trained now and cached."""
    from gpt2.data.sources import make_source

    if data.name == "shards":
        raise UserError("tokenizer=bpe trains on a text corpus, but data=shards holds token ids; use the tokenizer "
                        "the shards were made with (tokenizer=gpt2, or tokenizer=file tokenizer.path=...json).")
    cache_dir = Path(os.path.expanduser(data.cache_dir))
    source = make_source(data, cache_dir)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)  # atomic: concurrent trainers end with the same complete file
    tok = HFTokenizer.from_json(text, str(path))
    log.info("Trained BPE tokenizer on %.1f MB in %.1fs: %d tokens -> %s", counter[0] / 1e6, time.time() - t0,
             tok.n_vocab, path)
    if tok.n_vocab < cfg.vocab_size:
        log.warning("The BPE has %d ids, not tokenizer.vocab_size=%d: no pair occurs min_frequency=%d times after "
                    "%d merges (a small corpus). The model's vocab_size follows the tokenizer (%d); set a smaller "
                    "tokenizer.vocab_size, or a larger train_max_bytes, to make this explicit.", tok.n_vocab,
                    cfg.vocab_size, cfg.min_frequency, tok.n_vocab - 256 - len(set(cfg.special_tokens)), tok.n_vocab)
    return tok


def load_tokenizer(cfg: TokenizerConfig, data: DataConfig) -> AnyTokenizer:
    """The tokenizer a run uses: GPT-2 (tiktoken), our BPE trained on data's corpus, or a tokenizer.json."""
    if cfg.name == "gpt2":
        return get_tokenizer(cfg.path or data.tokenizer_path, cache_dir=data.cache_dir)
    if cfg.name == "file":
        return HFTokenizer.from_file(str(cfg.path))
    return trained_bpe(cfg, data)


def planned_vocab(cfg: TokenizerConfig) -> int | None:
    """The vocabulary size known without training or loading anything (dry run); None for tokenizer=file."""
    from gpt2.tokenizers.gpt2 import N_VOCAB

    return {"gpt2": N_VOCAB, "bpe": cfg.vocab_size}.get(cfg.name)


def from_checkpoint(ckpt: Path, meta: dict[str, Any], ranks_path: str | None = None,
                    cache_dir: str | None = None) -> AnyTokenizer:
    """The tokenizer a checkpoint was trained with (checkpoints from before tokenizers were recorded: GPT-2)."""
    info = meta.get("tokenizer") or {"kind": "gpt2"}
    if info.get("kind") == "hf":
        tok = HFTokenizer.from_file(Path(ckpt) / str(info.get("file", TOKENIZER_FILE)))
        if tok.id != info.get("id"):
            raise UserError(f"{ckpt}/{info.get('file')} has id {tok.id}, but meta.json records {info.get('id')}; "
                            f"the checkpoint's tokenizer file was changed. Restore it or use another checkpoint.")
        return tok
    return get_tokenizer(ranks_path, cache_dir=cache_dir)


def for_inference(checkpoint: str | None, pretrained: str | None, ranks_path: str | None,
                  fix: str, cache_dir: str | None = None) -> AnyTokenizer:
    """The tokenizer to generate or evaluate with: a checkpoint's own, a Hugging Face directory's
    tokenizer.json (our export of a BPE model), else GPT-2's (`ranks_path`: its ranks file)."""
    if checkpoint is not None:
        from gpt2.checkpoint.format import read_meta, resolve_checkpoint

        ckpt = resolve_checkpoint(checkpoint, fix)
        meta = read_meta(ckpt)
        if ranks_path and (meta.get("tokenizer") or {}).get("kind") == "hf":
            raise UserError(f"tokenizer_path={ranks_path!r} is a GPT-2 ranks file, but checkpoint {ckpt} was trained "
                            f"with its own tokenizer ({ckpt / TOKENIZER_FILE}); drop tokenizer_path.")
        return from_checkpoint(ckpt, meta, ranks_path, cache_dir)
    if pretrained is not None and (Path(pretrained) / TOKENIZER_FILE).is_file() \
            and not (Path(pretrained) / "vocab.json").is_file():
        return HFTokenizer.from_file(Path(pretrained) / TOKENIZER_FILE)
    return get_tokenizer(ranks_path, cache_dir=cache_dir)


def check_same(tok: AnyTokenizer, meta: dict[str, Any], ckpt: Path) -> None:
    """UserError when `tok` is not the tokenizer checkpoint `ckpt` was trained with."""
    saved = (meta.get("tokenizer") or {}).get("id")
    if saved is None:  # an older checkpoint: trained with GPT-2
        if isinstance(tok, Tokenizer):
            return
        raise UserError(f"checkpoint {ckpt} was trained with the GPT-2 tokenizer but this run uses {tok.id} "
                        f"(n_vocab={tok.n_vocab}); use tokenizer=gpt2 or start a new run without resume.")
    if saved != tok.id:
        info = meta["tokenizer"]
        raise UserError(f"checkpoint {ckpt} was trained with tokenizer {saved} (n_vocab={info.get('n_vocab')}) but "
                        f"this run uses {tok.id} (n_vocab={tok.n_vocab}); use the checkpoint's tokenizer "
                        f"(tokenizer=file tokenizer.path={Path(ckpt) / TOKENIZER_FILE} for our BPE) or start a "
                        f"new run without resume.")

