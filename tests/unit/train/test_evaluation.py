"""gpt2.train.evaluation: which evaluations run after which step, and a mixture's val loss as the weighted mean
of its sources' (each the same number a single-corpus evaluation of that source gives)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data.shards import TokenStream, write_shard
from gpt2.model.gpt import GPT
from gpt2.train.evaluation import Evaluator, ValSplit
from gpt2.train.plan import Vocabulary, resolve_plan
from tests.helpers import CPU, compose_train, cpu_dist


def evaluator(overrides: list[str], splits: list[ValSplit] | None = None) -> Evaluator:
    cfg = compose_train(["debug=cpu", "block_size=32", "micro_batch_size=4", "eval.iters=0", *overrides])
    torch.manual_seed(0)
    model = GPT(replace(cfg.model, vocab_size=256, n_positions=32))
    plan = resolve_plan(cfg, cpu_dist(), model.cfg, Vocabulary(256, "bytes"), None, None)
    return Evaluator(cfg, plan, model, splits or [], device=CPU)


@pytest.mark.parametrize(("val_every", "hellaswag_every", "due", "with_hellaswag"), [
    (4, 6, {4, 6, 8}, {6, 12}),  # 12 is the final evaluation: never "due", it always runs
    (4, 0, {4, 8}, set()),
    (0, 5, {5, 10}, {5, 10, 12}),  # HellaSwag alone still brings the val loss with it, and the final one
])
def test_cadences(val_every: int, hellaswag_every: int, due: set[int], with_hellaswag: set[int]) -> None:
    ev = evaluator(["max_steps=12", f"eval.interval={val_every}", f"eval.hellaswag_interval={hellaswag_every}"])
    assert ev.periodic()
    assert {s for s in range(13) if ev.due(s)} - {0} == due
    assert {s for s in range(1, 13) if ev.extras(s)[0]} == with_hellaswag
    assert not any(ev.extras(s)[1] for s in range(13))  # no lm-eval tasks configured


def test_no_periodic_evaluation() -> None:
    ev = evaluator(["max_steps=12", "eval.interval=0", "eval.hellaswag_interval=0"])
    assert not ev.periodic() and not any(ev.due(s) for s in range(13)) and ev.extras(12) == (False, False)


def test_a_mixtures_val_loss_is_the_weighted_mean_of_its_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    streams = {}
    for name, n in (("books", 700), ("code", 1300)):
        write_shard(tmp_path / f"{name}.bin", rng.integers(0, 256, size=n, dtype=np.uint16))
        streams[name] = TokenStream([tmp_path / f"{name}.bin"])
    splits = [ValSplit("books", 0.25, streams["books"]), ValSplit("code", 0.75, streams["code"])]
    never = lambda: False  # noqa: E731
    mixed = evaluator([], splits).run(0, never)
    alone = {s.name: evaluator([], [ValSplit("", 1.0, s.tokens)]).run(0, never) for s in splits}
    for name in ("books", "code"):
        assert mixed[f"val/{name}/loss"] == pytest.approx(alone[name]["val/loss"], rel=1e-6)
        assert mixed[f"val/{name}/tokens"] == alone[name]["val/tokens"] > 0
    assert mixed["val/loss"] == pytest.approx(0.25 * mixed["val/books/loss"] + 0.75 * mixed["val/code/loss"])
    assert mixed["val/tokens"] == mixed["val/books/tokens"] + mixed["val/code/tokens"]
    assert mixed["val/books/loss"] != pytest.approx(mixed["val/code/loss"], rel=1e-4)  # the weights mattered
    assert "val/books/loss" not in alone["books"]  # a single corpus has no per-source keys
