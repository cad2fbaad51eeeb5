"""HellaSwag by completion scoring (as in build-nanogpt and llm.c): the context followed by each of
the 4 endings (with a leading space), the loss of the ending tokens only; `acc` picks the ending with
the lowest summed loss (highest log-likelihood), `acc_norm` the lowest mean loss per token.

Items come from the official validation jsonl (rowanz/hellaswag `data/hellaswag_val.jsonl`, fields
`ctx`, `endings`, `label`), downloaded once into the cache and sha256-checked, or read from a local
file. All endings of an item go into one forward, many items per batch, padding masked; items are
split over ranks (see gpt2.evals.batching).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gpt2.errors import UserError
from gpt2.evals.batching import gather_rows, per_row_loss, rank_batches
from gpt2.runtime.world import rank_and_world
from gpt2.utils.download import fetch_url

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
"""From the download_checksums of huggingface/datasets `datasets/hellaswag/dataset_infos.json`."""
VAL_BYTES = 12_246_618
VAL_ITEMS = 10_042
N_ENDINGS = 4


@dataclass(frozen=True)
class Item:
    """One HellaSwag question."""

    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Rendered:
    """An item as token rows: rows[k] = context + ending k (cropped from the left to the window);
    the last n_scored[k] tokens of rows[k] are scored."""

    rows: tuple[tuple[int, ...], ...]
    n_scored: tuple[int, ...]
    label: int


@dataclass(frozen=True)
class HellaSwagResult:
    acc: float
    """Share of items whose ending with the highest total log-likelihood is the labelled one."""
    acc_norm: float
    """Same with the log-likelihood per ending token."""
    n_items: int
    sum_loss: np.ndarray
    """(n_items, 4) summed loss of each ending's tokens."""
    n_tokens: np.ndarray
    """(n_items, 4) scored tokens of each ending."""
    labels: np.ndarray


# ----------------------------------------------------------------------- data


def default_path(cache_dir: str | os.PathLike[str]) -> Path:
    return Path(cache_dir).expanduser() / "hellaswag" / "hellaswag_val.jsonl"


def download(cache_dir: str | os.PathLike[str], url: str = VAL_URL, timeout: float = 30.0) -> Path:
    """The official validation file in `<cache_dir>/hellaswag/`, downloaded once and sha256-checked."""
    dest = default_path(cache_dir)
    how = (f"download {VAL_URL} on a machine with network and pass hellaswag.path=FILE (training: "
           f"eval.hellaswag.path=FILE), or copy it to {dest}")
    return fetch_url(url, dest, VAL_SHA256, "HellaSwag", how, timeout=timeout)


def resolve_path(path: str | None, cache_dir: str | os.PathLike[str]) -> Path:
    """`path` when given (it must exist), else the cached official file (downloaded when missing)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"hellaswag.path={path} does not exist; pass the validation jsonl "
                            f"(rowanz/hellaswag data/hellaswag_val.jsonl), or leave it unset to download it.")
        return p
    return download(cache_dir)


def _parse(line: str, where: str) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line must be one "
                        f"HellaSwag item with ctx, endings and label.") from err
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label, got {type(obj).__name__}.")
    for key in ("ctx", "endings", "label"):
        if key not in obj:
            raise UserError(f"{where}: missing field {key!r}; each item needs ctx, endings and label.")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise UserError(f"{where}: ctx must be a non-empty string.")
    if (not isinstance(endings, list) or len(endings) != N_ENDINGS
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise UserError(f"{where}: endings must be a list of {N_ENDINGS} non-empty strings, got {endings!r:.120}.")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: label={label!r} is out of range; it must be an integer in 0..{N_ENDINGS - 1}.")
    return Item(ctx=ctx, endings=tuple(endings), label=label)


def load_items(path: str | os.PathLike[str], limit: int = 0) -> list[Item]:
    """Items of a HellaSwag jsonl file (the first `limit` when > 0); a bad line is a UserError
    naming the file and the line number."""
    path = Path(path)
    items: list[Item] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                items.append(_parse(line, f"{path}:{lineno}"))
                if 0 < limit <= len(items):
                    break
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read HellaSwag file {path}: {err}.") from err
    if not items:
        raise UserError(f"{path} holds no HellaSwag items.")
    return items


def render(items: Sequence[Item], encode_batch: Callable[[list[str]], list[list[int]]],
           n_positions: int) -> list[Rendered]:
    """Token rows of each item: context + " " + ending, keeping the last n_positions tokens (a long
    context loses its beginning; an ending longer than n_positions - 1 tokens keeps its end)."""
    texts: list[str] = []
    for it in items:
        texts.append(it.ctx)
        texts.extend(" " + e for e in it.endings)
    ids = encode_batch(texts)
    out = []
    k = N_ENDINGS + 1
    for i, it in enumerate(items):
        ctx, endings = ids[i * k], ids[i * k + 1 : (i + 1) * k]
        rows, scored = [], []
        for end in endings:
            row = (ctx + end)[-n_positions:]
            rows.append(tuple(row))
            scored.append(min(len(end), len(row) - 1))  # the first token of a row has no prediction
        out.append(Rendered(rows=tuple(rows), n_scored=tuple(scored), label=it.label))
    return out


# -------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model: nn.Module, rendered: Sequence[Rendered], *, batch_size: int, device: torch.device,
          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> HellaSwagResult:
    """Score every item (batch_size items = 4 * batch_size rows per forward), split over the ranks
    of the process group; every rank returns the full result."""
    rank, world_size = rank_and_world()
    was_training = model.training
    model.eval()
    index: list[int] = []
    rows_out: list[np.ndarray] = []
    try:
        for batch in rank_batches(len(rendered), batch_size, rank, world_size):
            items = [rendered[i] for i in batch] if batch is not None else [rendered[0]]
            rows = [r for it in items for r in it.rows]
            L = max(len(r) for r in rows)
            tokens = torch.zeros((len(rows), L), dtype=torch.long)  # (R, L), padded on the right
            targets = torch.full((len(rows), L - 1), -1, dtype=torch.long)  # (R, L-1): scored ending tokens only
            for j, r in enumerate(rows):
                tokens[j, : len(r)] = torch.tensor(r)
                n = items[j // N_ENDINGS].n_scored[j % N_ENDINGS]
                targets[j, len(r) - 1 - n : len(r) - 1] = tokens[j, len(r) - n : len(r)]
            tokens, targets = tokens.to(device), targets.to(device)
            with autocast():
                logits = model(tokens[:, :-1]).logits  # (R, L-1, V)
            if batch is None:
                continue
            losses = per_row_loss(logits, targets).double().sum(dim=1).view(len(items), N_ENDINGS)  # (B, 4)
            rows_out.append(losses.cpu().numpy())
            index.extend(batch)
    finally:
        model.train(was_training)
    mine = np.concatenate(rows_out) if rows_out else np.zeros((0, N_ENDINGS))
    sum_loss = gather_rows(mine, np.asarray(index, dtype=np.int64), len(rendered))  # (N, 4)
    n_tokens = np.array([it.n_scored for it in rendered], dtype=np.float64)  # (N, 4)
    labels = np.array([it.label for it in rendered], dtype=np.int64)
    pred = sum_loss.argmin(axis=1)
    pred_norm = (sum_loss / n_tokens).argmin(axis=1)
    return HellaSwagResult(acc=float((pred == labels).mean()), acc_norm=float((pred_norm == labels).mean()),
                           n_items=len(rendered), sum_loss=sum_loss, n_tokens=n_tokens, labels=labels)
