"""Corpus preparation: documents -> token shards, once, resumably (batches: gpt2.data.loader).

``prepare_data(cfg)`` tokenizes cfg's corpus (gpt2.data.sources) on ``data.num_proc`` processes, in
document order, into ``<cache_dir>/prepared/<key>/``: ``train_NNNNNN.bin`` and ``val_NNNNNN.bin`` shards of
``data.shard_tokens`` tokens (llm.c's format, gpt2.data.shards) and a ``manifest.json`` (gpt2.data.corpus).
Every document is followed by ``<|endoftext|>``. The key hashes the source contents, the tokenizer
identity, the split, max_tokens and FORMAT_VERSION, so another call (or rank) reuses the folder.

Work happens in ``<key>.partial/`` with a ``state.json`` checkpoint at document boundaries; a killed
preparation resumes from it, and the finished shards are byte-identical to those of an uninterrupted,
single-process run. The folder is moved into place only when complete.

Validation documents are chosen while streaming: a document goes to val when the val split holds less
than ``val_fraction`` of the tokens seen before it (never the first document). When that leaves val empty
(a one-document corpus) the val split is the last ``val_fraction`` of train's tokens.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.config import DataConfig, TokenizerConfig
from gpt2.data.corpus import MANIFEST, PreparedData, external_shards, load_prepared
from gpt2.data.encoding import BATCH_CHARS, encoded, tasks
from gpt2.data.shard_writer import ShardWriter, move_tail
from gpt2.data.shards import token_dtype
from gpt2.data.sources import Source, make_source
from gpt2.errors import Interrupted, UserError
from gpt2.runtime.distributed import main_rank_first
from gpt2.tokenizers.bpe import TOKENIZER_FILE, HFTokenizer, trained_bpe
from gpt2.tokenizers.factory import AnyTokenizer, load_named
from gpt2.utils.fs import atomic_write, move_into_place, remove_tree

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
"""Bump when the prepared layout or document handling changes (invalidates old caches). 2: shards; 3: the val
split always in val_*.bin shards, and each shard's largest token id in the manifest. Folders of earlier
formats still load (gpt2.data.corpus reads any split as shards plus a token range)."""
CHECKPOINT_S = 30.0
"""Save the preparation state at least this often (and after every finished shard)."""
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class PreparationInterrupted(Interrupted):
    """Preparation stopped on request (a preemption signal); its progress is saved for the next run."""


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = (TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    return Progress(*columns, console=console, disable=not console.is_terminal)


def _tokenize(source: Source, tok: AnyTokenizer, cfg: DataConfig, key: str, work: Path,
              should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    """Fill `work` with shards; resumes from work/state.json. Returns the final state."""
    dtype = token_dtype(tok.n_vocab)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state and state.get("key") != key:
        raise UserError(f"{state_path} belongs to another preparation; delete {work} and rerun.")
    docs_done, n_val_docs = int(state.get("docs_done", 0)), int(state.get("n_val_docs", 0))
    tail: dict[str, Any] = {"move": state.get("tail")}  # set once every document is in: the val tail being moved
    writers = {name: ShardWriter(work, name, dtype, cfg.shard_tokens, state.get(name, {}))
               for name in ("train", "val")}
    cap = cfg.max_tokens
    total = writers["train"].n_tokens + writers["val"].n_tokens
    if docs_done:
        log.info("resuming the preparation in %s after %d documents (%d tokens)", work, docs_done, total)
    num_proc = cfg.num_proc or os.cpu_count() or 1
    if source.n_bytes is not None:
        num_proc = max(1, min(num_proc, math.ceil(source.n_bytes / BATCH_CHARS)))
    eot = np.asarray([tok.eot_token], dtype=dtype)
    t0 = last_save = time.time()
    start_total, start_docs, finished_shards = total, docs_done, 0

    def save() -> None:
        nonlocal last_save
        atomic_write(state_path, json.dumps({"key": key, "docs_done": docs_done, "n_val_docs": n_val_docs,
                                             **{name: w.sync() for name, w in writers.items()}, "tail": tail["move"]},
                                            indent=1) + "\n")
        last_save = time.time()

    target = writers["train"] if docs_done == 0 else None  # the first document always trains
    full = (cap is not None and total >= cap) or tail["move"] is not None
    try:
        with _progress() as bar:
            task = bar.add_task("tokenize", total=source.n_docs, completed=docs_done, info="")
            for arrays, ends in ([] if full else encoded(tasks(source, docs_done), tok, dtype, num_proc)):
                for arr, end in zip(arrays, ends):
                    if target is None:
                        val_low = writers["val"].n_tokens < cfg.val_fraction * total
                        target = writers["val"] if val_low else writers["train"]
                    if end:
                        arr = np.concatenate([arr, eot])
                    if cap is not None and total + len(arr) >= cap:
                        arr, full = arr[: cap - total], True
                    before = len(target.shards)
                    target.add(arr)
                    finished_shards += len(target.shards) - before
                    total += len(arr)
                    if end or full:
                        docs_done += 1
                        n_val_docs += target is writers["val"]
                        target = None
                    if full:
                        break
                    if end and (finished_shards or time.time() - last_save > CHECKPOINT_S):
                        save()
                        finished_shards = 0
                    if end and should_stop is not None and should_stop():
                        save()
                        raise PreparationInterrupted(f"data preparation interrupted after {docs_done} documents; "
                                                     f"rerun to resume from {work}")
                secs = max(time.time() - t0, 1e-9)
                n_shards = sum(len(w.shards) for w in writers.values())
                bar.update(task, completed=docs_done, info=f"{total:,} tokens, {(docs_done - start_docs) / secs:,.0f} "
                           f"docs/s, {(total - start_total) / secs:,.0f} tok/s, {n_shards} shards done")
                if full:
                    break
        for w in writers.values():
            w.finish_shard()
        save()
        if writers["val"].n_tokens == 0 and total >= 2 or tail["move"] is not None:
            _move_val_tail(writers, work, dtype, cfg, tail, save)
    finally:
        for w in writers.values():
            w.close()
    return {"docs_done": docs_done, "n_val_docs": n_val_docs, "seconds": round(time.time() - t0, 2),
            "writers": writers, "dtype": dtype, "split": "tokens" if tail["move"] is not None else "documents"}


def _move_val_tail(writers: dict[str, ShardWriter], work: Path, dtype: str, cfg: DataConfig, tail: dict[str, Any],
                   save: Callable[[], None]) -> None:
    """A corpus whose documents all went to train (one document): move its last val_fraction of tokens into
    val_*.bin shards of their own, so that no train shard holds a val token (tools that read *_train_*.bin,
    such as llm.c's loader, never train on them). In phases saved in state.json (`tail["move"]`), so a kill
    resumes: `copy` (val shards from the train tail, redone from scratch), then `truncate` (the train shards
    cut; idempotent), then `done`."""
    train = writers["train"]
    if tail["move"] is None:
        total = train.n_tokens
        tail["move"] = {"n_val": min(max(1, math.ceil(cfg.val_fraction * total)), total - 1), "phase": "copy"}
        save()
    move = tail["move"]
    if move["phase"] == "copy":
        writers["val"].close()
        writers["val"] = ShardWriter(work, "val", dtype, cfg.shard_tokens, {})  # drops an interrupted copy's files
        move_tail(train, writers["val"], move["n_val"])
        move["phase"] = "truncate"
        save()
    if move["phase"] == "truncate":
        train.truncate(train.n_tokens - move["n_val"])
        move["phase"] = "done"
        save()


def _manifest(cfg: DataConfig, source: Source, tok: AnyTokenizer, key: str, done: dict[str, Any]) -> dict[str, Any]:
    train, val = done["writers"]["train"], done["writers"]["val"]
    total = train.n_tokens + val.n_tokens
    if total < 2:
        raise UserError(f"The corpus holds {total} token(s); a train and a non-empty val split need at least 2.")
    splits = {name: {"shards": w.shards, "start": 0, "stop": w.n_tokens} for name, w in done["writers"].items()}
    how = done["split"]
    return {
        "format_version": FORMAT_VERSION, "key": key, "source": source.describe, "data_name": cfg.name,
        "tokenizer": tok.id, "n_vocab": tok.n_vocab, "dtype": done["dtype"], "eot_token": tok.eot_token,
        "n_docs": done["docs_done"], "split": how, "n_val_docs": done["n_val_docs"] if how == "documents" else 0,
        "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens, "max_tokens": cfg.max_tokens,
        "n_train_tokens": splits["train"]["stop"] - splits["train"]["start"],
        "n_val_tokens": splits["val"]["stop"] - splits["val"]["start"], "seconds": done["seconds"],
        "splits": splits,
    }


# ---------------------------------------------------------------------------- public


def prepared_key(cfg: DataConfig, source_key: dict[str, Any], tokenizer_id: str) -> str:
    """sha256 of what determines the shards: source contents, tokenizer, split, cap, format."""
    blob = {"format": FORMAT_VERSION, "tokenizer": tokenizer_id, "val_fraction": cfg.val_fraction,
            "shard_tokens": cfg.shard_tokens, "max_tokens": cfg.max_tokens,
            "source": {"name": cfg.name, **source_key}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def run_tokenizer(tokenizer: TokenizerConfig, cfg: DataConfig) -> AnyTokenizer:
    """The tokenizer a run uses: GPT-2 (tiktoken), a tokenizer.json, or our BPE trained on cfg's corpus (once;
    cached by corpus contents and settings)."""
    if tokenizer.name != "bpe":
        return load_named(tokenizer, cfg.cache_dir)
    if cfg.name == "shards":
        raise UserError("tokenizer=bpe trains on a text corpus, but data=shards holds token ids; use the tokenizer "
                        "the shards were made with (tokenizer=gpt2, or tokenizer=file tokenizer.path=...json).")
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    return trained_bpe(tokenizer, make_source(cfg, cache_dir), cache_dir)


def _wait_lock(path: Path) -> Any:
    """An exclusive flock on `path` (held until the returned file closes); logs while waiting."""
    f = open(path, "a")
    t0 = last = time.time()
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.time() - last >= 60:
                log.info("waiting %.0f min for another process preparing the same data (%s)", (time.time() - t0) / 60,
                         path)
                last = time.time()
            time.sleep(0.5)


def prepare_data(cfg: DataConfig, should_stop: Callable[[], bool] | None = None,
                 tokenizer: TokenizerConfig | None = None, tok: AnyTokenizer | None = None) -> PreparedData:
    """Tokenize cfg's corpus with `tokenizer` (default: GPT-2; tokenizer=bpe trains one first, once) into
    ``<cache_dir>/prepared/<key>/`` unless that exists; return it (its tokenizer attached). A Hugging Face
    tokenizer's tokenizer.json is kept beside the shards. `tok`, when given, is the tokenizer itself (the
    sources of a mixture share the one built for the whole mixture).

    Safe to call from several processes (a lock file; the folder appears atomically). A killed
    run resumes. `should_stop` is polled between documents: when it returns True the progress is
    saved and PreparationInterrupted raised. A full disk is a UserError and removes the partial work.
    """
    cfg.check()  # the same messages as at start-up, for callers that skip `validate`
    tcfg = tokenizer or TokenizerConfig()
    tcfg.check()
    tok = tok or run_tokenizer(tcfg, cfg)
    if cfg.name == "shards":
        return external_shards(cfg, tok)
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    source = make_source(cfg, cache_dir)
    key = prepared_key(cfg, source.key, tok.id)
    prepared = cache_dir / "prepared"
    final = prepared / key
    if (final / MANIFEST).is_file():
        log.info("Reusing prepared data %s", final)
        return load_prepared(final, tok)
    work = prepared / f"{key}.partial"
    try:
        prepared.mkdir(parents=True, exist_ok=True)
        with _wait_lock(prepared / f"{key}.lock"):
            if (final / MANIFEST).is_file():  # another process finished it while we waited
                return load_prepared(final, tok)
            work.mkdir(exist_ok=True)
            log.info("Tokenizing %s into %s", source.describe, final)
            done = _tokenize(source, tok, cfg, key, work, should_stop)
            manifest = _manifest(cfg, source, tok, key, done)
            if isinstance(tok, HFTokenizer):
                atomic_write(work / TOKENIZER_FILE, tok.json_text)
            (work / "state.json").unlink()
            atomic_write(work / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            move_into_place(work, final)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        remove_tree(work)
        raise UserError(
            f"data.cache_dir={cfg.cache_dir} is full ({e.strerror}: {e.filename or work}); the partial preparation "
            f"was removed. Free space there (the corpus needs about {np.dtype(token_dtype(tok.n_vocab)).itemsize} "
            f"bytes per token) or set data.cache_dir to a larger disk."
        ) from None
    log.info("Prepared %d train + %d val tokens in %.1fs", manifest["n_train_tokens"], manifest["n_val_tokens"],
             manifest["seconds"])
    return load_prepared(final, tok)


def prepare_on_ranks(cfg: DataConfig, tokenizer: TokenizerConfig | None = None,
                     should_stop: Callable[[], bool] | None = None, tok: AnyTokenizer | None = None) -> PreparedData:
    """`prepare_data` on rank 0 while the other ranks wait without a deadline, then on the others (which find
    the prepared folder in the cache); see gpt2.runtime.distributed.main_rank_first."""
    return main_rank_first(lambda: prepare_data(cfg, should_stop, tokenizer, tok), "prepare the data", should_stop)
