"""gpt2.evals.runner (run_eval.py): the numbers training logged reproduced, bad inputs, a pretrained
directory scored like the library."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.evals import hellaswag
from gpt2.model.gpt import GPT
from tests.helpers import CPU
from tests.unit.evals.common import predictable_items, run_eval_cli, tricky_items, write_jsonl


@pytest.mark.slow
def test_run_eval_reproduces_the_numbers_training_logged(hellaswag_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    proc = run_eval_cli([f"checkpoint={hellaswag_run['run_dir']}", f"hellaswag.path={hellaswag_run['items']}",
                         "device=cpu", "dtype=fp32", "batch_size=8", f"output_file={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "task" in proc.stdout and "acc_norm" in proc.stdout and "seconds" in proc.stdout
    assert not (tmp_path / "outputs").exists()
    res = json.loads(out.read_text())["results"]
    final = [r for r in hellaswag_run["metrics"] if "val/loss" in r][-1]
    assert res["val_loss"]["loss"] == pytest.approx(final["val/loss"], rel=1e-6)
    assert res["val_loss"]["tokens"] == final["val/tokens"] and res["val_loss"]["full_split"]
    assert res["hellaswag"]["acc_norm"] == final["hellaswag/acc_norm"]
    assert res["hellaswag"]["acc"] == final["hellaswag/acc"] and res["hellaswag"]["items"] == 200


@pytest.mark.parametrize(("bad", "message"), [
    ("missing", r"^error: hellaswag.path=.*missing.jsonl does not exist"),
    ("label", r"^error: .*bad.jsonl:2: label=7 is out of range"),
])
@pytest.mark.slow
def test_run_eval_bad_hellaswag_input_exits_2(hellaswag_run: dict, tmp_path: Path, bad: str, message: str) -> None:
    path = tmp_path / "missing.jsonl"
    if bad == "label":
        items = predictable_items(2, seed=0)
        items[1]["label"] = 7
        path = write_jsonl(tmp_path / "bad.jsonl", items)
    proc = run_eval_cli([f"checkpoint={hellaswag_run['run_dir']}", f"hellaswag.path={path}", "tasks=[hellaswag]",
                         "device=cpu"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr.strip(), re.M), proc.stderr


def test_run_evals_on_a_pretrained_dir_scores_like_the_library(tmp_path: Path, tiktoken_file: str) -> None:
    from gpt2.config import EvalRunConfig, HellaSwagConfig, VocabFileConfig
    from gpt2.evals.runner import run_evals
    from gpt2.model.hf import export_hf
    from gpt2.tokenizers.gpt2 import get_tokenizer

    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=50257)).eval()
    export_hf(model, model.cfg, tmp_path / "hf")
    items = write_jsonl(tmp_path / "hs.jsonl", tricky_items(12, seed=2))
    cfg = EvalRunConfig(pretrained=str(tmp_path / "hf"), tasks=["hellaswag"], device="cpu", dtype="fp32",
                        batch_size=4, limit=10, hellaswag=HellaSwagConfig(path=str(items)),
                        tokenizer=VocabFileConfig(path=tiktoken_file), output_file=str(tmp_path / "out" / "res.json"))
    table = io.StringIO()
    payload = run_evals(cfg, out=table)
    assert re.search(r"hellaswag\s+acc_norm\s+[0-9.]+\s+10\s+[0-9.]+", table.getvalue()), table.getvalue()
    rendered = hellaswag.render(hellaswag.load_items(items, limit=10), get_tokenizer(tiktoken_file).encode_batch, 64)
    direct = hellaswag.score(model, rendered, batch_size=4, device=CPU)
    res = json.loads((tmp_path / "out" / "res.json").read_text())["results"]["hellaswag"]
    assert res["items"] == 10 and res["acc"] == direct.acc and res["acc_norm"] == direct.acc_norm
    assert payload["results"]["hellaswag"]["acc_norm"] == direct.acc_norm
    with pytest.raises(UserError, match="val_loss needs a corpus: pass data="):
        run_evals(EvalRunConfig(pretrained=str(tmp_path / "hf"), tasks=["val_loss"], device="cpu"))


@pytest.mark.slow
def test_run_eval_scores_the_whole_small_split_unless_asked_for_the_training_windows(
        tmp_path: Path, base_overrides: list[str]) -> None:
    """A quickstart-like run logs its val loss on eval.iters batches only; run_eval.py, where people go for the
    real number, scores the whole split (val_tokens rule), and the logged windows only with match_training."""
    import io

    from gpt2.config import EvalRunConfig
    from gpt2.evals.runner import run_evals
    from gpt2.train.launch import train
    from gpt2.train.metrics import read_metrics
    from tests.helpers import compose_train

    run = tmp_path / "run"
    train(compose_train([*base_overrides, "max_steps=2", "eval.interval=0", "eval.iters=3", "micro_batch_size=4",
                         "block_size=64", "total_batch_tokens=256", "eval.sample_tokens=0"]), run)
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r][-1]
    assert logged["val/tokens"] == 3 * 4 * 64
    whole = run_evals(EvalRunConfig(checkpoint=str(run), tasks=["val_loss"], device="cpu"), io.StringIO())
    res = whole["results"]["val_loss"]
    assert res["full_split"] and res["tokens"] == res["split_tokens"] - 1  # every val token but the first, once
    same = run_evals(EvalRunConfig(checkpoint=str(run), tasks=["val_loss"], device="cpu", dtype="fp32", batch_size=4,
                                   match_training=True), io.StringIO())["results"]["val_loss"]
    assert same["tokens"] == logged["val/tokens"] and same["loss"] == pytest.approx(logged["val/loss"], rel=1e-6)


def test_match_training_reads_the_micro_batch_the_run_plan_chose(tmp_path: Path, base_overrides: list[str]) -> None:
    """With micro_batch_size=auto the run plan's choice (2 here, from the chooser the GPU probe would be) caps
    the logged val loss at eval.iters x 2 windows. The config saved with the checkpoint says only "auto";
    match_training reads the choice from the saved plan and reproduces the logged number exactly."""
    from gpt2.config import EvalRunConfig
    from gpt2.evals.runner import run_evals
    from gpt2.train.assembly import build_run
    from gpt2.train.metrics import read_metrics
    from gpt2.train.trainer import Trainer
    from tests.helpers import compose_train, cpu_dist

    cfg = compose_train([*base_overrides, "max_steps=2", "eval.interval=0", "eval.iters=3", "micro_batch_size=auto",
                         "block_size=64", "total_batch_tokens=256", "eval.sample_tokens=0"])
    run = build_run(cfg, cpu_dist(), tmp_path / "run", choose_micro_batch=lambda model: 2)
    assert (run.plan.micro_batch_size, run.plan.grad_accum, cfg.micro_batch_size) == (2, 2, "auto")
    assert run.logger is not None
    try:
        Trainer(run).fit()
    finally:
        run.logger.finish()
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r][-1]
    assert logged["val/tokens"] == 3 * 2 * 64  # eval.iters x the plan's micro-batch windows of block_size
    same = run_evals(EvalRunConfig(checkpoint=str(tmp_path / "run"), tasks=["val_loss"], device="cpu", dtype="fp32",
                                   batch_size=2, match_training=True), io.StringIO())["results"]["val_loss"]
    assert (same["tokens"], same["loss"]) == (logged["val/tokens"], logged["val/loss"])
    assert not same["full_split"] and same["split_tokens"] > 100 * same["tokens"]  # uncapped would be the split
