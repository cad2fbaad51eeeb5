"""Turning a ``tokenizer`` config, or a checkpoint's record of one, into a tokenizer object, and what
checkpoints record about a tokenizer.

``tokenizer=gpt2`` is tiktoken's GPT-2 encoding (gpt2.tokenizers.gpt2) and ``tokenizer=file`` a
tokenizer.json; ``tokenizer=bpe`` is our byte-level BPE trained on the run's corpus (gpt2.tokenizers.bpe),
which the data layer builds because only it knows the corpus (gpt2.data.preprocess.run_tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt2.config import TokenizerConfig
from gpt2.errors import UserError
from gpt2.tokenizers.bpe import TOKENIZER_FILE, HFTokenizer
from gpt2.tokenizers.gpt2 import EOT_ID, N_VOCAB, TOKENIZER_ID, Tokenizer, get_tokenizer

AnyTokenizer = Tokenizer | HFTokenizer


def describe(tok: AnyTokenizer) -> dict[str, Any]:
    """meta.json's record of a tokenizer: kind, id, n_vocab, eot_token (and the file of an HF tokenizer)."""
    if isinstance(tok, HFTokenizer):
        return tok.describe()
    return {"kind": "gpt2", "id": tok.id, "n_vocab": tok.n_vocab, "eot_token": tok.eot_token}


GPT2_RECORD = {"kind": "gpt2", "id": TOKENIZER_ID, "n_vocab": N_VOCAB, "eot_token": EOT_ID}
"""The record of the GPT-2 encoding (what `describe` gives for it)."""


def files(tok: AnyTokenizer) -> dict[str, bytes]:
    """The files that carry `tok` into a checkpoint (our BPE's tokenizer.json; none for GPT-2)."""
    return tok.files() if isinstance(tok, HFTokenizer) else {}


def load_named(cfg: TokenizerConfig, cache_dir: str) -> AnyTokenizer:
    """tokenizer=gpt2 (its vocabulary file: tokenizer.path, else found in the caches) or tokenizer=file.
    tokenizer=bpe is trained on a corpus by the data layer."""
    if cfg.name == "gpt2":
        return get_tokenizer(cfg.path, cache_dir=cache_dir)
    if cfg.name == "file":
        return HFTokenizer.from_file(str(cfg.path))
    raise UserError("tokenizer=bpe is trained on the run's corpus; build it through "
                    "gpt2.data.preprocess.run_tokenizer.")


def planned_vocab(cfg: TokenizerConfig) -> int | None:
    """The vocabulary size known without training or loading anything (dry run); None for tokenizer=file."""
    return {"gpt2": N_VOCAB, "bpe": cfg.vocab_size}.get(cfg.name)


def from_record(record: dict[str, Any], folder: Path, vocab_path: str | None = None,
                cache_dir: str | None = None) -> AnyTokenizer:
    """The tokenizer a checkpoint's meta.json `record` describes: its own tokenizer.json in `folder`, or
    GPT-2's (`vocab_path`: a gpt2.tiktoken vocabulary file to use). UserError when a GPT-2 vocabulary file is
    given for our BPE, or when the checkpoint's tokenizer file was changed."""
    if record.get("kind") == "hf":
        path = Path(folder) / str(record.get("file", TOKENIZER_FILE))
        if vocab_path:
            raise UserError(f"tokenizer.path={vocab_path!r} is a GPT-2 vocabulary file, but checkpoint {folder} was "
                            f"trained with its own tokenizer ({path}); drop tokenizer.path.")
        tok = HFTokenizer.from_file(path)
        if tok.id != record.get("id"):
            raise UserError(f"{path} has id {tok.id}, but meta.json records {record.get('id')}; the checkpoint's "
                            f"tokenizer file was changed. Restore it or use another checkpoint.")
        return tok
    return get_tokenizer(vocab_path, cache_dir=cache_dir)


def from_pretrained_dir(pretrained: str, vocab_path: str | None = None, cache_dir: str | None = None) -> AnyTokenizer:
    """The tokenizer of a Hugging Face model: a directory's tokenizer.json (our export of a BPE model) when it
    has no GPT-2 vocab.json, else GPT-2's."""
    folder = Path(pretrained).expanduser()
    if (folder / TOKENIZER_FILE).is_file() and not (folder / "vocab.json").is_file():
        return HFTokenizer.from_file(folder / TOKENIZER_FILE)
    return get_tokenizer(vocab_path, cache_dir=cache_dir)


def check_same(tok: AnyTokenizer, record: dict[str, Any], ckpt: Path) -> None:
    """UserError when `tok` is not the tokenizer checkpoint `ckpt` (whose meta.json `record` is given) was
    trained with."""
    if record.get("id") == tok.id:
        return
    fix = (f"tokenizer=file tokenizer.path={Path(ckpt) / TOKENIZER_FILE}" if record.get("kind") == "hf"
           else "tokenizer=gpt2")
    raise UserError(f"checkpoint {ckpt} was trained with tokenizer {record.get('id')} (n_vocab="
                    f"{record.get('n_vocab')}) but this run uses {tok.id} (n_vocab={tok.n_vocab}); use the "
                    f"checkpoint's tokenizer ({fix}) or start a new run without resume.")
