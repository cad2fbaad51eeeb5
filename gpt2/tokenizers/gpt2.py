"""The GPT-2 BPE tokenizer (tiktoken's ``gpt2``/``r50k_base`` encoding), resolved offline.

tiktoken normally downloads GPT-2's vocabulary file (``gpt2.tiktoken``: each token's bytes and id) from
openaipublic.blob.core.windows.net. This module builds the identical ``tiktoken.Encoding`` from a local copy
of it found, in order, at

a. an explicit path (``tokenizer.path``) or the ``GPT2_TIKTOKEN_FILE`` environment variable;
b. tiktoken's own cache (``TIKTOKEN_CACHE_DIR`` / ``DATA_GYM_CACHE_DIR`` / ``$TMP/data-gym-cache``);
c. ``<cache_dir>/tokenizer/gpt2.tiktoken``, extracted once from the openai-whisper source
   package on PyPI (``pip download``), which ships the same file;
d. ``tiktoken.get_encoding("gpt2")`` (needs network).

Every vocabulary file is checked against its sha256, so token ids always equal tiktoken's.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from gpt2.errors import UserError
from gpt2.utils.download import pip_download_sdist, sha256_file
from gpt2.utils.fs import atomic_write

log = logging.getLogger(__name__)

VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
"""sha256 of GPT-2's vocabulary file (gpt2.tiktoken, the same bytes as r50k_base.tiktoken)."""
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
"""Where tiktoken downloads the vocabulary file (its cache is keyed by sha1 of this URL)."""
GPT2_DATA_GYM_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
"""The two files tiktoken's ``gpt2`` encoding is built from (also looked up in its cache)."""
# Same as tiktoken_ext/openai_public.py r50k_pat_str (tests check they agree).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257
WHISPER_REQ = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
ENV_FILE = "GPT2_TIKTOKEN_FILE"
DEFAULT_CACHE_DIR = "~/.cache/gpt2"
TOKENIZER_ID = f"tiktoken-gpt2-{VOCAB_SHA256[:16]}"
"""Identifies the encoding in prepared-data cache keys."""


class Tokenizer:
    """GPT-2 BPE: ``encode`` ignores special tokens (``<|endoftext|>`` in text is plain text)."""

    def __init__(self, encoding: tiktoken.Encoding, source: str | None) -> None:
        self.encoding = encoding
        self.source = source
        """The vocabulary file used, or None when tiktoken fetched it over the network."""
        self.eot_token: int = EOT_ID
        self.n_vocab: int = encoding.n_vocab
        self.id: str = TOKENIZER_ID

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(gpt2, n_vocab={self.n_vocab}, source={self.source!r})"


def _load_vocab(vocab_file: str) -> dict[bytes, int]:
    """Parse GPT-2's vocabulary file into tiktoken's mergeable ranks (token bytes -> id) after checking its
    sha256.

    Same format and check as ``tiktoken.load.load_tiktoken_bpe(path, expected_hash=...)``, which
    would also copy every local file it reads into tiktoken's temp cache (keyed by the path).
    """
    with open(vocab_file, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise UserError(f"{vocab_file} has sha256 {digest}, expected {VOCAB_SHA256} (GPT-2's vocabulary file).")
    mergeable_ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            mergeable_ranks[base64.b64decode(token)] = int(rank)
    return mergeable_ranks


def _build(vocab_file: str) -> Tokenizer:
    mergeable_ranks = _load_vocab(vocab_file)
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )
    return Tokenizer(enc, vocab_file)


def _load_explicit(path: str, origin: str) -> Tokenizer:
    """(a) A file the user named: it must exist and match the hash, no fallback."""
    p = os.path.expanduser(path)
    if not os.path.isfile(p):
        raise UserError(
            f"{origin}={path!r} is not a file; point it at GPT-2's vocabulary file gpt2.tiktoken "
            f"(sha256 {VOCAB_SHA256}), or unset it to let gpt2 find one."
        )
    digest = sha256_file(p)
    if digest != VOCAB_SHA256:
        raise UserError(
            f"{origin}={path!r} has sha256 {digest}, expected {VOCAB_SHA256} (GPT-2's vocabulary file); "
            f"use whisper/assets/gpt2.tiktoken from openai-whisper or tiktoken's r50k_base.tiktoken."
        )
    return _build(p)


def tiktoken_cache_dir() -> str | None:
    """tiktoken's cache directory, resolved exactly as ``tiktoken.load.read_file_cached`` does."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        d = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        d = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return d or None  # "" disables tiktoken's cache


def _from_tiktoken_cache() -> Tokenizer | None:
    """(b) A vocabulary file that tiktoken itself downloaded earlier."""
    d = tiktoken_cache_dir()
    if d is None:
        return None
    path = os.path.join(d, hashlib.sha1(R50K_URL.encode()).hexdigest())
    if os.path.isfile(path) and sha256_file(path) == VOCAB_SHA256:
        return _build(path)
    bpe, enc_json = (os.path.join(d, hashlib.sha1(u.encode()).hexdigest()) for u in GPT2_DATA_GYM_URLS)
    if os.path.isfile(bpe) and os.path.isfile(enc_json):
        try:  # both files are cached, so tiktoken reads them from its cache without network
            return Tokenizer(tiktoken.get_encoding("gpt2"), None)
        except Exception as e:  # a corrupt cache: try the next source
            log.debug("tiktoken's cached gpt2 files are unusable: %s", e)
    return None


def whisper_vocab_path(cache_dir: str | None = None) -> Path:
    """Where the vocabulary file extracted from openai-whisper is kept."""
    return Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)) / "tokenizer" / "gpt2.tiktoken"


def fetch_vocab_file(cache_dir: str | None = None) -> Path:
    """(c) Return ``<cache_dir>/tokenizer/gpt2.tiktoken``, extracting it from the openai-whisper
    sdist (``pip download``) the first time. Raises UserError when pip cannot get it."""
    dest = whisper_vocab_path(cache_dir)
    if dest.is_file() and sha256_file(str(dest)) == VOCAB_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        sdist = pip_download_sdist(WHISPER_REQ, tmp)
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith("/" + WHISPER_MEMBER) and m.isfile()]
            if not members:
                raise UserError(f"{sdist.name} holds no {WHISPER_MEMBER}")
            data = tar.extractfile(members[0]).read()  # type: ignore[union-attr]
        digest = hashlib.sha256(data).hexdigest()
        if digest != VOCAB_SHA256:
            raise UserError(f"{WHISPER_MEMBER} from {sdist.name} has sha256 {digest}, expected {VOCAB_SHA256}")
        atomic_write(dest, data)  # concurrent fetchers all end with the same complete file
    return dest


def _resolve(path: str | None, cache_dir: str | None) -> Tokenizer:
    if path:
        return _load_explicit(path, "tokenizer.path")
    if os.environ.get(ENV_FILE):
        return _load_explicit(os.environ[ENV_FILE], ENV_FILE)
    tok = _from_tiktoken_cache()
    if tok is not None:
        return tok
    errors = []
    try:
        return _build(str(fetch_vocab_file(cache_dir)))
    except UserError as e:
        errors.append(f"pip: {e}")
    try:
        return Tokenizer(tiktoken.get_encoding("gpt2"), None)
    except Exception as e:
        errors.append(f"tiktoken download: {type(e).__name__}: {e}")
    dest = whisper_vocab_path(cache_dir)
    raise UserError(
        "Cannot find GPT-2's vocabulary file (gpt2.tiktoken). Provide it one of three ways:\n"
        "  1. pass a local copy: tokenizer.path=/path/to/gpt2.tiktoken (or GPT2_TIKTOKEN_FILE=...);\n"
        f"  2. run `python -m pip download --no-deps --no-binary :all: {WHISPER_REQ} -d /tmp/w` where PyPI is "
        f"reachable and extract {WHISPER_MEMBER} from the tarball to {dest} (or use option 1);\n"
        "  3. allow network access to openaipublic.blob.core.windows.net once (tiktoken caches the file).\n"
        "What was tried:\n" + "\n".join(err.strip()[:1500] for err in errors)
    )


_CACHE: dict[tuple[str | None, str | None, str], Tokenizer] = {}
_LOCK = threading.Lock()


def get_tokenizer(path: str | None = None, cache_dir: str | None = None) -> Tokenizer:
    """The GPT-2 tokenizer, resolved as described in the module docstring; cached per argument.

    path: GPT-2's vocabulary file gpt2.tiktoken, named explicitly (overrides everything else).
    cache_dir: the gpt2 cache root (``data.cache_dir``, default ~/.cache/gpt2) for source (c).
    """
    key = (path, cache_dir, os.environ.get(ENV_FILE, ""))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _resolve(path, cache_dir)
        return _CACHE[key]
