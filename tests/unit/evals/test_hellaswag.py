"""gpt2.evals.hellaswag: completion scoring equal to an independent transformers computation, the file's
errors, HellaSwag during training, and the same result on two gloo ranks. CPU only, no network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.evals import hellaswag
from gpt2.model.gpt import GPT
from gpt2.model.hf import gpt_to_hf
from tests.helpers import CPU
from tests.unit.evals.common import run_eval_cli, tricky_items, write_jsonl


def hf_scores(hf: transformers.GPT2LMHeadModel, enc, items: list[dict], n_positions: int) -> np.ndarray:
    """Summed loss of each ending, computed independently with transformers, one row at a time."""
    out = np.zeros((len(items), 4))
    for i, it in enumerate(items):
        ctx = enc.encode_ordinary(it["ctx"])
        for k, ending in enumerate(it["endings"]):
            end = enc.encode_ordinary(" " + ending)
            row = (ctx + end)[-n_positions:]
            n = min(len(end), len(row) - 1)
            with torch.no_grad():
                logits = hf(torch.tensor([row])).logits[0].float()  # (L, V)
            logp = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(row[len(row) - n :])
            out[i, k] = -float(logp[len(row) - n - 1 : len(row) - 1].gather(1, targets[:, None]).sum())
    return out


@pytest.mark.slow
def test_hellaswag_scores_equal_an_independent_transformers_computation(tmp_path: Path, tiktoken_file: str) -> None:
    from gpt2.tokenizers.gpt2 import get_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=50257)
    model = GPT(cfg).eval()
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(gpt_to_hf(model.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k == "lm_head.weight" for k in missing), missing
    items = tricky_items()
    tok = get_tokenizer(tiktoken_file)
    rendered = hellaswag.render(hellaswag.load_items(write_jsonl(tmp_path / "hs.jsonl", items)), tok.encode_batch, 64)
    assert any(len(tok.encode(it["ctx"])) > 64 for it in items)  # cropping is exercised
    assert len({n for r in rendered for n in r.n_scored}) > 5  # endings of many token lengths
    result = hellaswag.score(model, rendered, batch_size=5, device=CPU)
    expected = hf_scores(hf, tok.encoding, items, 64)
    np.testing.assert_allclose(result.sum_loss, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    labels = np.array([it["label"] for it in items])
    counts = np.array([r.n_scored for r in rendered])
    assert result.acc == pytest.approx(float((expected.argmin(1) == labels).mean()))
    assert result.acc_norm == pytest.approx(float(((expected / counts).argmin(1) == labels).mean()))
    whole = hellaswag.score(model, rendered, batch_size=20, device=CPU)  # batching and padding change nothing
    np.testing.assert_allclose(whole.sum_loss, result.sum_loss, rtol=1e-5)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"hs.jsonl:3: not valid JSON"),
    ('{"ctx": "a b", "endings": ["x", "y", "z", "w"], "label": 4}', r"hs.jsonl:3: label=4 is out of range.*0\.\.3"),
    ('{"ctx": "a b", "endings": [], "label": 0}', r"hs.jsonl:3: endings must be a list of 4 non-empty strings"),
    ('{"ctx": "a b", "endings": ["x", "", "z", "w"], "label": 0}', r"hs.jsonl:3: endings must be a list of 4"),
])
def test_bad_hellaswag_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps(tricky_items(1)[0])
    path = tmp_path / "hs.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError, match=message):
        hellaswag.load_items(path)
    assert len(hellaswag.load_items(path, limit=2)) == 2  # the first N items only: the bad line is not read


def test_offline_download_says_how_to_provide_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot download HellaSwag from .*hellaswag.path=FILE"):
        hellaswag.download(tmp_path, url="http://127.0.0.1:9/hellaswag_val.jsonl", timeout=5)
    assert not list((tmp_path / "hellaswag").iterdir())  # nothing half-written
    with pytest.raises(UserError, match="hellaswag.path=.*does not exist"):
        hellaswag.resolve_path(str(tmp_path / "missing.jsonl"), tmp_path)


@pytest.mark.slow
def test_training_logs_hellaswag_above_chance_and_random_init_near_chance(hellaswag_run: dict) -> None:
    evals = {r["step"]: r for r in hellaswag_run["metrics"] if "hellaswag/acc_norm" in r}
    assert sorted(evals) == [0, 30]
    assert evals[0]["hellaswag/items"] == 200 and evals[0]["val/tokens"] > 0
    assert 0.15 <= evals[0]["hellaswag/acc_norm"] <= 0.35  # a random model: chance
    assert evals[0]["hellaswag/acc"] == evals[0]["hellaswag/acc_norm"]  # every ending is 3 tokens
    assert evals[30]["hellaswag/acc_norm"] >= 0.8 and evals[30]["hellaswag/acc"] >= 0.8, evals[30]
    png = hellaswag_run["run_dir"] / "loss.png"
    assert png.stat().st_size > 1000
    from PIL import Image

    width, _ = Image.open(png).size
    assert width == 1200  # two panels: loss and HellaSwag accuracy


@pytest.mark.slow
def test_two_gloo_ranks_give_exactly_the_single_process_result(hellaswag_run: dict, tmp_path: Path) -> None:
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"res{nproc}.json"
        proc = run_eval_cli([f"checkpoint={hellaswag_run['run_dir']}", f"hellaswag.path={hellaswag_run['items']}",
                             "device=cpu", "dtype=fp32", "batch_size=7", f"output_file={out}"], tmp_path, nproc=nproc)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(out.read_text()))
    one, two = results
    assert two["world_size"] == 2 and one["world_size"] == 1
    for task in ("val_loss", "hellaswag"):
        one["results"][task].pop("seconds")
        two["results"][task].pop("seconds")
    assert one["results"] == two["results"]
