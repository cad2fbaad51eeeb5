"""gpt2.checkpoint.handle: a checkpoint argument opened once (meta.json read once, in the current format)
and the model, tokenizer and training config it gives; older formats brought up to date by one upgrade."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt2.checkpoint.format import FORMAT, META
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.train.launch import train
from tests.helpers import compose_train
from tests.unit.evals.common import tricky_items, write_jsonl

_meta_reads: list[str] = []
_counting = False


def _audit(event: str, args: tuple) -> None:
    if _counting and event == "open" and isinstance(args[0], (str, bytes, Path)) and str(args[0]).endswith(META):
        _meta_reads.append(str(args[0]))


sys.addaudithook(_audit)  # the interpreter's own record of every open(): nothing of ours is patched


@pytest.fixture
def meta_reads() -> Iterator[list[str]]:
    global _counting
    _meta_reads.clear()
    _counting = True
    yield _meta_reads
    _counting = False


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory: pytest.TempPathFactory, base_overrides: list[str]) -> Path:
    run = tmp_path_factory.mktemp("handle") / "run"
    train(compose_train([*base_overrides, "max_steps=3", "checkpoint.interval=1", "checkpoint.keep_last=3",
                         "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0", "total_batch_tokens=256",
                         "micro_batch_size=2", "block_size=128"]), run)
    assert len(list((run / "checkpoints").glob("step_*"))) == 3
    return run


def test_run_eval_reads_meta_json_once(three_checkpoints: Path, tmp_path: Path, meta_reads: list[str]) -> None:
    from gpt2.config import EvalRunConfig, HellaSwagConfig
    from gpt2.evals.runner import run_evals

    items = write_jsonl(tmp_path / "hs.jsonl", tricky_items(4))
    cfg = EvalRunConfig(checkpoint=str(three_checkpoints), tasks=["val_loss", "hellaswag"], device="cpu",
                        hellaswag=HellaSwagConfig(path=str(items)), limit=2)
    res = run_evals(cfg, io.StringIO())
    assert res["results"]["val_loss"]["items"] == 2 and res["results"]["hellaswag"]["items"] == 2
    assert meta_reads == [str(three_checkpoints / "checkpoints" / "step_00000003" / META)]


def test_the_handle_gives_config_model_and_tokenizer(three_checkpoints: Path, meta_reads: list[str]) -> None:
    ckpt = find_checkpoint(three_checkpoints)
    assert ckpt.step == 3 and ckpt.path.name == "step_00000003" and ckpt.meta["format"] == FORMAT
    assert ckpt.model_config.vocab_size == 50257 and ckpt.train_config.max_steps == 3
    assert ckpt.model().cfg == ckpt.model_config and ckpt.tokenizer().n_vocab == 50257
    assert len(meta_reads) == 1


def test_a_format_1_meta_is_upgraded_once_when_read(three_checkpoints: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "step_00000003"
    shutil.copytree(three_checkpoints / "checkpoints" / "step_00000003", old)
    meta = json.loads((old / META).read_text())
    meta = {k: v for k, v in meta.items() if k not in ("plan", "tokenizer")} | {"format": 1}  # as format 1 wrote it
    (old / META).write_text(json.dumps(meta))
    ckpt = find_checkpoint(old)
    assert ckpt.meta["format"] == FORMAT and ckpt.tokenizer_record["kind"] == "gpt2"
    assert ckpt.model_config.n_layer == 2 and ckpt.model_config.vocab_size is None  # the config's model, as saved
    assert ckpt.plan["micro_batch_size"] == 2  # the config's: a number, so no auto choice to record


def test_a_saved_config_with_keys_that_moved_is_read_at_their_new_places(three_checkpoints: Path,
                                                                           tmp_path: Path) -> None:
    """A checkpoint written before eval_interval, eval_iters, sample_* and data.tokenizer_path moved keeps its
    settings: they are read as eval.interval, eval.iters, eval.sample_* and tokenizer.path."""
    import shutil

    old = tmp_path / "step_00000003"
    shutil.copytree(three_checkpoints / "checkpoints" / "step_00000003", old)
    meta = json.loads((old / META).read_text())
    config = meta["config"]
    vocab = config["tokenizer"].pop("path")
    config["data"]["tokenizer_path"] = vocab
    moved = {"interval": 7, "iters": 3, "sample_prompt": "JULIET:", "sample_tokens": 5, "sample_temperature": 0.5,
             "sample_top_k": 9}
    for key, value in moved.items():
        config["eval"].pop(key)
        config[{"interval": "eval_interval", "iters": "eval_iters"}.get(key, key)] = value
    (old / META).write_text(json.dumps(meta))
    cfg = find_checkpoint(old).train_config
    assert cfg.tokenizer.path == vocab and vocab
    assert {key: getattr(cfg.eval, key) for key in moved} == moved
