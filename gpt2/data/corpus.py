"""A prepared corpus on disk: its folder, manifest and the train/val splits, and shards used as they are.

``manifest.json`` (written last by gpt2.data.preprocess) records the source, the tokenizer, each shard's
token count and sha256, and each split as shards plus a token range. `data=shards` reads llm.c ``.bin``
or build-nanogpt ``.npy`` shards without a manifest.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.config import DataConfig
from gpt2.data.shards import Split, TokenStream, check_token_ids, check_vocab, expand_shard_paths, open_shard
from gpt2.errors import UserError

MANIFEST = "manifest.json"


@dataclass
class PreparedData:
    """A prepared corpus: its folder, manifest and the train/val splits (see gpt2.data.shards)."""

    folder: str
    train: Split
    val: Split
    meta: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    """The tokenizer the tokens belong to, when the preparation resolved it."""

    @property
    def n_train_tokens(self) -> int:
        return self.train.n_tokens

    @property
    def n_val_tokens(self) -> int:
        return self.val.n_tokens

    def stream(self, split: str) -> TokenStream:
        """The token stream of "train" or "val" (memory-mapped shards, sliceable as one array)."""
        return {"train": self.train, "val": self.val}[split].stream()


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared folder, every shard it names checked (present, header, size)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / MANIFEST} is unreadable ({e}); delete {folder} and prepare the data again.") from e
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                raise UserError(f"{folder / MANIFEST} names {shard['file']}, which is missing; delete {folder} and "
                                f"prepare the data again.")
            if len(open_shard(path)) != shard["n_tokens"]:
                raise UserError(f"{path} does not hold the {shard['n_tokens']} tokens its manifest records; delete "
                                f"{folder} and prepare the data again.")
    return manifest


def manifest_split(folder: str | os.PathLike[str], manifest: dict[str, Any], name: str) -> Split:
    split = manifest["splits"][name]
    paths = [str(Path(folder) / s["file"]) for s in split["shards"]]
    return Split(paths, int(split["start"]), int(split["stop"]))


def load_prepared(folder: str | os.PathLike[str], tokenizer: Any = None) -> PreparedData:
    """A prepared folder (every shard its manifest names checked: present, header, size, and its recorded largest
    token id below the tokenizer's n_vocab)."""
    manifest = read_manifest(folder)
    if tokenizer is not None:
        shards = [s for split in manifest["splits"].values() for s in split["shards"] if "max_id" in s]
        check_token_ids([str(Path(folder) / s["file"]) for s in shards], tokenizer.n_vocab, tokenizer.id, folder,
                        known={str(Path(folder) / s["file"]): int(s["max_id"]) for s in shards})
    return PreparedData(str(folder), manifest_split(folder, manifest, "train"),
                        manifest_split(folder, manifest, "val"), manifest, tokenizer)


def external_shards(cfg: DataConfig, tokenizer: Any) -> PreparedData:
    """data=shards: llm.c .bin or build-nanogpt .npy shards used as they are; the *_val_* twins (or
    data.val_path) are the val split, else the last val_fraction of the train tokens."""
    train = expand_shard_paths(str(cfg.path))
    ours = Path(train[0]).parent / MANIFEST  # shards this project prepared record their tokenizer
    made_with = json.loads(ours.read_text()).get("tokenizer") if ours.is_file() else None
    if made_with is not None and made_with != tokenizer.id:
        raise UserError(f"{Path(train[0]).parent} was prepared with tokenizer {made_with}, but this run uses "
                        f"{tokenizer.id}; a run (every source of a mixture too) trains with one tokenizer. Use the "
                        f"tokenizer the shards were made with, or prepare the corpus again with this one.")
    check_vocab(TokenStream(train), tokenizer.n_vocab)
    check_token_ids(train, tokenizer.n_vocab, tokenizer.id, cfg.cache_dir)
    val_pattern = cfg.val_path
    head, tail = os.path.split(str(cfg.path))
    if val_pattern is None and "train" in tail:
        twin = os.path.join(head, tail.replace("train", "val"))
        val_pattern = twin if any(os.path.isfile(f) for f in glob.glob(os.path.expanduser(twin))) else None
    meta = {"data_name": "shards", "source": cfg.path}
    if val_pattern is not None:
        val = expand_shard_paths(val_pattern)
        check_token_ids(val, tokenizer.n_vocab, tokenizer.id, cfg.cache_dir)
        n = len(TokenStream(train))
        return PreparedData(os.path.dirname(train[0]), Split(train, 0, n), Split(val, 0, len(TokenStream(val))),
                            {**meta, "split": "files"}, tokenizer)
    n = len(TokenStream(train))
    if n < 2:
        raise UserError(f"data.path={cfg.path!r} holds {n} token(s); a train and a val split need at least 2.")
    n_val = min(max(1, math.ceil(cfg.val_fraction * n)), n - 1)
    return PreparedData(os.path.dirname(train[0]), Split(train, 0, n - n_val), Split(train, n - n_val, n),
                        {**meta, "split": "tokens"}, tokenizer)
