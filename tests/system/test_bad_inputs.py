"""Bad inputs, each through the real entry point (run_train.py, run_prepare.py, run_generate.py, run_eval.py,
run_export.py): exit code 2, exactly one `error:` line that names the value and the fix, no traceback, and
every file that was there before is byte-for-byte unchanged. docs/reliability.md lists these."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.config import (
    GenerateConfig,
    ModelConfig,
    TrainConfig,
)
from gpt2.errors import UserError
from gpt2.generate.command import generate_samples
from gpt2.model.gpt import GPT
from tests.helpers import (
    REPO,
    bpe_overrides,
    run_train_cli,
    save_model_checkpoint,
    subprocess_env,
)


@pytest.mark.slow
def test_bad_tokenizer_settings(bpe_cache: Path, tmp_path: Path) -> None:
    train = str(REPO / "run_train.py")
    one_error(*run([train, *bpe_overrides(bpe_cache, "tokenizer.vocab_size=200")], tmp_path),
              "tokenizer.vocab_size=200", "256 + 1 = 257")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": "not a tokenizer"')
    one_error(*run([train, *bpe_overrides(bpe_cache), "tokenizer=file", f"tokenizer.path={bad}"], tmp_path), str(bad),
              "not a readable Hugging Face tokenizer.json")
    one_error(*run([train, *bpe_overrides(bpe_cache, "model.vocab_size=5000")], tmp_path), "model.vocab_size=5000",
              "n_vocab=4096")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=tiny", "model.n_head=3"], "model.n_embd=64 is not divisible by model.n_head=3"),
        (["model=tiny", "block_size=1024"], "block_size=1024 exceeds model.n_positions=256"),
        (["model=tiny", "total_batch_tokens=1000"], "total_batch_tokens=1000 is not divisible"),
        (["model=gpt5"], "Could not find 'model/gpt5'"),
        (["max_steps=many"], "max_steps"),
        (["data=text"], "data.path"),
    ],
)
@pytest.mark.slow
def test_cli_rejects_bad_values_without_traceback(tmp_path: Path, args: list[str], expected: str) -> None:
    code, output = run([str(REPO / "run_train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code != 0 and expected in output and "Traceback" not in output, output


@pytest.mark.slow
def test_cli_missing_data_is_a_clear_error(tmp_path: Path, tiktoken_file: str) -> None:
    code, output = run([str(REPO / "run_train.py"), "model=tiny", "data=text", f"data.path={tmp_path}/nowhere/*.txt",
                        f"tokenizer.path={tiktoken_file}", f"data.cache_dir={tmp_path / 'cache'}",
                        f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    one_error(code, output, "nowhere")


def run(args: list[str], cwd: Path, ro: Path | None = None, preexec=None, timeout: float = 120) -> tuple[int, str]:
    """Run `python args...` in cwd (with `ro` bind-mounted read-only in a private mount namespace)."""
    cmd = [sys.executable, *args]
    if ro is not None:
        cmd = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{ro}" "{ro}" && exec "$@"', "sh", *cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)
    return proc.returncode, proc.stdout + proc.stderr


def one_error(code: int, out: str, *needles: str) -> str:
    """Assert exit 2, no traceback and exactly one `error:` line containing every needle; return it."""
    assert code == 2 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], out
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> sha256 of its bytes (or 'dir'/'link:<target>')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link:{os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def can_mount_ro(tmp_path_factory: pytest.TempPathFactory) -> bool:
    d = tmp_path_factory.mktemp("ro_probe")
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{d}" "{d}" && ! touch "{d}/x"'],
                           capture_output=True)
    return probe.returncode == 0


def read_only(path: Path, can_mount_ro: bool) -> Path:
    if not can_mount_ro:
        pytest.skip("needs `unshare -m` and a bind mount to make a read-only file system")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arg,nearest", [
    ("+optimizer.lrr=1e-3", "optimizer.lr"), ("+max_step=5", "max_steps"), ("++optimizer.lrr=1e-3", "optimizer.lr"),
    ("optimizer.lrr=1e-3", "optimizer.lr"), ("~scheduler.warmup", "scheduler.warmup_steps")])
def test_unknown_key_is_an_error_naming_the_nearest_key(arg: str, nearest: str, tmp_path: Path) -> None:
    code, out = run([str(REPO / "run_train.py"), "model=tiny", arg], tmp_path)
    one_error(code, out, arg.split("=")[0], f"did you mean {nearest}?")
    assert list(tmp_path.iterdir()) == []  # no outputs/ run dir


@pytest.mark.slow
@pytest.mark.parametrize("script,arg,nearest", [("run_generate.py", "+temprature=0.5", "temperature"),
                                                ("run_eval.py", "++limt=3", "limit"),
                                                ("run_prepare.py", "+data.num_procs=2", "data.num_proc")])
def test_unknown_key_in_every_entry_point(script: str, arg: str, nearest: str, tmp_path: Path) -> None:
    code, out = run([str(REPO / script), arg], tmp_path)
    one_error(code, out, f"did you mean {nearest}?")


@pytest.mark.slow
@pytest.mark.parametrize("script,arg,new", [("run_train.py", "eval_interval=5", "eval.interval"),
                                            ("run_train.py", "+sample_prompt=Hi", "eval.sample_prompt"),
                                            ("run_train.py", "data.tokenizer_path=x.tiktoken", "tokenizer.path"),
                                            ("run_generate.py", "tokenizer_path=x.tiktoken", "tokenizer.path")])
def test_a_moved_key_names_its_new_place(script: str, arg: str, new: str, tmp_path: Path) -> None:
    code, out = run([str(REPO / script), arg], tmp_path)
    one_error(code, out, f"{arg.split('=')[0].lstrip('+')} moved to {new}; write {new}=... instead.")
    assert list(tmp_path.iterdir()) == []  # no outputs/ run dir


@pytest.mark.slow
@pytest.mark.parametrize("where", ["proc", "under_file", "read_only"])
def test_unusable_run_dir_is_one_error(where: str, tmp_path: Path, can_mount_ro: bool) -> None:
    ro = None
    (tmp_path / "earlier.txt").write_text("keep me\n")
    if where == "proc":
        run_dir = Path("/proc/gpt2-run")
    elif where == "under_file":
        run_dir = tmp_path / "earlier.txt" / "run"
    else:
        ro = read_only(tmp_path / "ro", can_mount_ro)
        (ro / "old.txt").write_text("old\n")
        run_dir = ro / "run"
    before = snapshot(tmp_path)
    code, out = run([str(REPO / "run_train.py"), "model=tiny", f"hydra.run.dir={run_dir}"], tmp_path, ro=ro)
    one_error(code, out, f"hydra.run.dir={run_dir} cannot be written", "choose a writable folder")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_run_that_fails_before_training_leaves_no_run_dir(tmp_path: Path) -> None:
    (tmp_path / "outputs" / "old").mkdir(parents=True)  # an earlier run's folder stays
    before = snapshot(tmp_path)
    code, out = run([str(REPO / "run_train.py"), "model=tiny", "device=cpu", "data=text",
                     f"data.path={tmp_path / 'missing.txt'}"], tmp_path)
    one_error(code, out, "missing.txt", "does not exist")
    assert snapshot(tmp_path) == before  # the new outputs/<date>/<time>/ (and date folder) are gone
    code, out = run([str(REPO / "run_train.py"), "model=tiny", "max_steps=0"], tmp_path)  # fails validating
    one_error(code, out, "max_steps=0 must be greater than 0")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["metrics.jsonl", "train.log"])
def test_planted_run_file_symlink_is_not_followed(name: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim)
    before = snapshot(tmp_path)
    code, out = run([str(REPO / "run_train.py"), "model=tiny", f"hydra.run.dir={run_dir}"], tmp_path)
    one_error(code, out, f"{name} is a symbolic link", "is not followed", f"rm {run_dir / name}")
    assert snapshot(tmp_path) == before  # refused before Hydra writes .hydra/ or train.log


def test_metrics_symlink_is_not_followed_by_the_logger(tmp_path: Path) -> None:
    from gpt2.train.metrics import RunLogger

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match="metrics.jsonl is a symbolic link"):  # train() called without Hydra
        RunLogger(tmp_path, TrainConfig())
    assert victim.read_text() == "precious\n"


def test_loss_plot_does_not_follow_a_planted_symlink(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gpt2.train.metrics import RunLogger

    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (tmp_path / "loss.png").symlink_to(victim)
    logger = RunLogger(tmp_path, TrainConfig())
    logger.log(1, {"train/loss": 3.0})
    with caplog.at_level(logging.WARNING, logger="gpt2"):
        logger.finish()
    assert victim.read_bytes() == b"precious"
    assert "loss.png is a symbolic link" in caplog.text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
    model = GPT(cfg)
    root = tmp_path_factory.mktemp("export") / "run"
    save_model_checkpoint(root, 6, model)
    return root


def fsize_limit(limit: int):
    def apply() -> None:  # writes past `limit` bytes fail (EFBIG) as they would on a full disk (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("target,needle", [
    ("checkpoints/step_00000006", "inside a training checkpoint"),
    ("checkpoints/step_00000006/hf", "inside a training checkpoint"),
    ("checkpoints", "inside a training checkpoint"),
    (".", "inside a training checkpoint"),  # the run dir itself holds checkpoints/
    ("checkpoints/step_00000006/model.safetensors", "is an existing file"),
])
def test_export_refuses_checkpoint_dirs_and_files(target: str, needle: str, run_dir: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from run_export import main

    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as stop:  # the CLI's own function, in-process (fast)
        main([str(run_dir), str(run_dir / target)])
    captured = capsys.readouterr()
    one_error(stop.value.code, captured.out + captured.err, needle)
    assert snapshot(run_dir) == before
    from gpt2.checkpoint.handle import find_checkpoint

    find_checkpoint(run_dir).model()  # ...and the checkpoint still loads


@pytest.mark.slow
def test_export_to_read_only_dir(run_dir: Path, tmp_path: Path, can_mount_ro: bool) -> None:
    ro = read_only(tmp_path / "ro", can_mount_ro)
    (ro / "old.txt").write_text("old\n")
    before = snapshot(tmp_path)
    code, out = run([str(REPO / "run_export.py"), str(run_dir), str(ro / "hf")], tmp_path, ro=ro)
    one_error(code, out, "cannot be written", "Read-only file system")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_export_on_a_full_disk_leaves_nothing_half_written(run_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "hf"
    code, out = run([str(REPO / "run_export.py"), str(run_dir), str(out_dir)], tmp_path)  # a good export first
    assert code == 0, out
    (out_dir / "README.md").write_text("mine\n")
    before = snapshot(tmp_path)
    code, out = run([str(REPO / "run_export.py"), str(run_dir), str(out_dir)], tmp_path, preexec=fsize_limit(50_000))
    one_error(code, out, f"could not write the export to {out_dir}", "nothing was changed")
    assert snapshot(tmp_path) == before  # no temp folder left, the earlier export intact
    code, out = run([str(REPO / "run_export.py"), str(run_dir), str(tmp_path / "new")], tmp_path,
                    preexec=fsize_limit(50_000))
    one_error(code, out, "could not write the export")
    assert snapshot(tmp_path) == before  # no new folder at all


@pytest.mark.slow
def test_generate_output_file_is_checked_before_loading(tmp_path: Path, can_mount_ro: bool) -> None:
    from gpt2.errors import UserError

    (tmp_path / "a_file").write_text("keep\n")
    before = snapshot(tmp_path)
    # the checkpoint does not exist: an output_file error proves the check comes before loading
    missing = str(tmp_path / "no-such-run")
    for target, needle in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "out.txt", "is not a directory")):
        with pytest.raises(UserError, match=re.escape(f"output_file={target}") + ".*" + needle):
            generate_samples(GenerateConfig(checkpoint=missing, output_file=str(target)))
    assert snapshot(tmp_path) == before
    ro = read_only(tmp_path / "ro", can_mount_ro)  # through the entry point: exit 2, one line
    before = snapshot(tmp_path)
    code, out = run([str(REPO / "run_generate.py"), f"checkpoint={missing}", f"output_file={ro / 'samples.txt'}"],
                    tmp_path, ro=ro)
    one_error(code, out, f"output_file={ro / 'samples.txt'} cannot be written", "Read-only file system")
    assert snapshot(tmp_path) == before
    code, out = run([str(REPO / "run_generate.py"), f"checkpoint={missing}", "output_file=/proc/x/out.txt"], tmp_path)
    one_error(code, out, "output_file=/proc/x/out.txt cannot be written")  # root passes os.access; mkdir does not


@pytest.mark.slow
def test_generate_keeps_the_samples_when_the_final_write_fails(tmp_path: Path, tiny_hf_dir: Path,
                                                               tiktoken_file: str) -> None:
    """The output folder passes the check (an empty test file), then the samples' write fails (a file-size limit
    as on a full disk): one error line, the samples are on stdout, no partial file is left."""
    out_file = tmp_path / "out" / "samples.txt"
    code, out = run([str(REPO / "run_generate.py"), f"pretrained={tiny_hf_dir}", f"tokenizer.path={tiktoken_file}",
                     f"output_file={out_file}", "max_new_tokens=40", "num_samples=3", "device=cpu", "prompt=Hello"],
                    tmp_path, preexec=fsize_limit(64))
    line = one_error(code, out, f"could not write output_file={out_file}", "the 3 sample(s) were printed above")
    assert out.count("Hello") >= 3 and line
    assert not out_file.exists() and not list(out_file.parent.glob("*"))


def test_eval_output_file_is_checked_before_loading(tmp_path: Path) -> None:
    from gpt2.config import EvalRunConfig
    from gpt2.evals.runner import run_evals

    (tmp_path / "a_file").write_text("keep\n")
    before = snapshot(tmp_path)
    missing = str(tmp_path / "no-such-run")  # an output_file error proves the check comes before loading
    for target, needle in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "res.json", "is not a directory")):
        with pytest.raises(UserError, match=re.escape(f"output_file={target}") + ".*" + needle):
            run_evals(EvalRunConfig(checkpoint=missing, tasks=["hellaswag"], output_file=str(target)))
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_generate_checkpoint_that_is_not_one_has_its_own_wording(tmp_path: Path) -> None:
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello\n")
    code, out = run([str(REPO / "run_generate.py"), f"checkpoint={not_ckpt}"], tmp_path)
    line = one_error(code, out, "no complete checkpoint", "pretrained=")
    assert "resume" not in line


@pytest.mark.slow
def test_max_tokens_below_one_batch_exits_2(tmp_path: Path, base_overrides: list[str]) -> None:
    res = run_train_cli([*base_overrides, "data.max_tokens=100", "micro_batch_size=4", "block_size=32",
                         "total_batch_tokens=128"], cwd=tmp_path, check=False)
    out = res.proc.stdout + res.proc.stderr
    assert res.proc.returncode == 2 and "Traceback" not in out
    assert "error: data.max_tokens=100 is smaller than one batch" in out and "132 tokens" in out


@pytest.mark.slow
def test_auto_micro_batch_cli_error_on_cpu(tmp_path: Path, base_overrides: list[str]) -> None:
    result = run_train_cli([*base_overrides, "micro_batch_size=auto", "total_batch_tokens=1024", "block_size=64",
                            "max_steps=1", "scheduler.warmup_steps=0"], tmp_path / "cli", check=False)
    assert result.proc.returncode == 2
    assert result.proc.stderr.startswith("error: micro_batch_size=auto needs a CUDA device")
    assert "Traceback" not in result.proc.stderr


@pytest.mark.slow
def test_a_shard_with_token_ids_beyond_the_vocabulary_is_one_error_and_nothing_trains(
        tmp_path: Path, base_overrides: list[str]) -> None:
    import numpy as np

    from gpt2.data.shards import write_shard

    tokens = (np.arange(20000) % 50257).astype(np.uint16)
    tokens[777] = 60000
    write_shard(tmp_path / "x_train_000000.bin", tokens)
    before = snapshot(tmp_path)
    args = [*(o for o in base_overrides if not o.startswith("data=")), "data=shards",
            f"data.path={tmp_path / 'x_train_*.bin'}", f"hydra.run.dir={tmp_path / 'run'}"]
    code, out = run([str(REPO / "run_train.py"), *args], tmp_path)
    one_error(code, out, "x_train_000000.bin holds token id 60000", "n_vocab=50257")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
