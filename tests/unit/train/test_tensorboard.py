"""logger=tensorboard: the event files, read back with TensorBoard's own reader, hold every scalar and sample of
metrics.jsonl, each step once, also after a resume that re-trains steps the interrupted run had logged; with
logger=wandb_tensorboard W&B writes its files as well."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gpt2.train.launch import train
from gpt2.train.metrics import read_metrics
from gpt2.train.tensorboard import text_summary
from gpt2.utils.fs import remove_tree
from tests.helpers import BPE, compose_train


def tensorboard_run(run_dir: Path) -> tuple[dict[str, list[tuple[int, float, float]]], dict[str, list[tuple]]]:
    """Scalars (tag -> [(step, value, wall time)]) and text samples (name -> [(step, text)]) of the event files in
    run_dir, as the TensorBoard server loads them (its EventAccumulator: purges applied, nothing sampled away)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    scalars, texts = {}, {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        events = [(e.step, make_ndarray(e.tensor_proto), e.wall_time) for e in acc.Tensors(tag)]
        if plugin == "scalars":
            scalars[tag] = [(step, float(value), wall) for step, value, wall in events]
        else:
            assert plugin == "text", (tag, plugin)
            texts[tag.removesuffix("/text_summary")] = [(step, value.item().decode()) for step, value, _ in events]
    return scalars, texts


def expected_from_metrics(run_dir: Path) -> tuple[dict[str, dict[int, tuple[float, float]]], dict[str, dict]]:
    """metrics.jsonl as the runs trained it: per key, the last record of each step (a resumed run re-logs the steps
    after its checkpoint), as (value, time); and the samples per step."""
    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    texts: dict[str, dict[int, str]] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key in ("step", "time"):
                continue
            if isinstance(value, str):
                texts.setdefault(key, {})[record["step"]] = value
            else:
                scalars.setdefault(key, {})[record["step"]] = (value, record["time"])
    return scalars, texts


@pytest.mark.slow
def test_event_files_hold_every_scalar_and_sample_of_metrics_jsonl_across_a_resume(
        tmp_path: Path, bpe_cache: Path, small_corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    # a two-source mixture (per-source token counts and val losses) on the 4K BPE, checkpoints at steps 2 and 4
    args = ["debug=cpu", "logger=wandb_tensorboard", "data=mix", f"data.cache_dir={bpe_cache}", "tokenizer=bpe",
            f"tokenizer.vocab_size={BPE.vocab_size}", f"tokenizer.train_max_bytes={BPE.train_max_bytes}",
            f"+data.sources={{books:{{name:shakespeare,weight:0.7}},docs:{{name:text,path:'{small_corpus_dir}'}}}}",
            "total_batch_tokens=256", "micro_batch_size=8", "block_size=32", "max_steps=6", "eval.interval=2",
            "eval.iters=1", "eval.sample_tokens=6", "log_interval=1", "checkpoint.interval=2",
            "checkpoint.keep_last=5", "scheduler.warmup_steps=1", "resume=auto"]
    run = tmp_path / "run"
    train(compose_train(args), run)
    first_session = expected_from_metrics(run)
    # A crash after step 5 was logged but before step 4's checkpoint was complete: the run resumes from step 2.
    for step in (4, 6):
        remove_tree(run / "checkpoints" / f"step_{step:08d}")
    train(compose_train(args), run)
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # the resumed run appended to the same run
    # W&B names a session's folder offline-run-<YYYYMMDD_HHMMSS>-<run id>, plus -<N> when another session of the
    # run started in the same second (wandb_init.set_sync_dir_suffix): the run id is the fourth field
    wandb_runs = {p.name.split("-")[3] for p in (run / "wandb").glob("offline-run-*")}
    assert len(wandb_runs) == 1  # and W&B wrote its files beside them (one run, continued)

    want_scalars, want_texts = expected_from_metrics(run)
    assert {"train/loss", "perf/tokens_per_s", "data/books/tokens", "val/docs/loss", "val/loss"} <= set(want_scalars)
    got_scalars, got_texts = tensorboard_run(run)
    assert set(got_scalars) == set(want_scalars)
    for tag, events in got_scalars.items():
        steps = [step for step, _, _ in events]
        assert steps == sorted(set(steps)), (tag, steps)  # each step once: the interrupted run's 3..6 are purged
        got = {step: (value, wall) for step, value, wall in events}
        want = want_scalars[tag]
        assert got.keys() == want.keys(), tag
        for step, (value, wall) in got.items():
            expected = np.float32(want[step][0])  # TensorBoard stores a scalar as float32
            assert value == expected or (math.isnan(value) and math.isnan(expected)), (tag, step, value, expected)
            assert wall == pytest.approx(want[step][1], abs=1e-6)  # the record's own time
    assert got_texts.keys() == want_texts.keys() == {"sample"}
    assert got_texts["sample"] == [(step, text_summary(t)) for step, t in sorted(want_texts["sample"].items())]
    # the resumed run re-trained steps 3..6 bit-exactly (the wall times above tell its events from the first run's)
    assert ({s: v for s, (v, _) in want_scalars["train/loss"].items()}
            == {s: v for s, (v, _) in first_session[0]["train/loss"].items()})
