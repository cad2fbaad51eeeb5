"""gpt2.evals: the val-loss estimate over a whole split (issue #17) and HellaSwag scoring, the
trainer's periodic evaluation, and run_eval.py (issue #11). CPU only, no network."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.config import ModelConfig, TrainConfig
from gpt2.data.shards import write_shard
from gpt2.errors import UserError
from gpt2.evals import hellaswag
from gpt2.evals.val_loss import select_windows
from gpt2.model.gpt import GPT
from gpt2.model.hf import gpt_to_hf
from gpt2.train.metrics import read_metrics
from gpt2.train.trainer import Trainer

from .helpers import REPO, compose_train, subprocess_env, tiny_trainer

CPU = torch.device("cpu")


# ------------------------------------------------------------------ val windows


def test_small_split_is_scored_whole_every_token_once() -> None:
    w = select_windows(n_tokens=1000, block_size=64, max_tokens=10_000, seed=0)
    assert w.full and w.n_tokens == 999  # every token but the first is a target once
    scored = np.zeros(1000, dtype=int)
    for start, skip in zip(w.starts, w.skip):
        scored[start + 1 + skip : start + 65] += 1
    assert scored[0] == 0 and (scored[1:] == 1).all()


def test_large_split_gets_a_fixed_seeded_sample_spread_over_it() -> None:
    w = select_windows(n_tokens=1_000_001, block_size=100, max_tokens=50_000, seed=3)
    again = select_windows(n_tokens=1_000_001, block_size=100, max_tokens=50_000, seed=3)
    other = select_windows(n_tokens=1_000_001, block_size=100, max_tokens=50_000, seed=4)
    assert not w.full and len(w.starts) == 500 and w.n_tokens == 50_000
    np.testing.assert_array_equal(w.starts, again.starts)  # the same windows at every evaluation
    assert not np.array_equal(w.starts, other.starts)
    assert (w.starts % 100 == 0).all() and len(set(w.starts.tolist())) == 500
    # spread over the split, not a prefix: every tenth of the split holds some windows
    assert np.histogram(w.starts, bins=10, range=(0, 1_000_000))[0].min() > 20
    assert len(select_windows(10_001, 100, 0, seed=0).starts) == 100  # max_tokens=0: always whole
    assert len(select_windows(10_001, 100, 1_000_000, seed=0, max_windows=7).starts) == 7


def test_split_shorter_than_one_window_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="fewer than one window.*lower block_size"):
        select_windows(n_tokens=10, block_size=64, max_tokens=1000, seed=0)


EASY = np.tile(np.arange(100, 116), 400)  # a 16-token cycle: predictable once learned


def _learned_model(steps: int = 30) -> GPT:
    """A tiny GPT trained on EASY (so EASY tokens are easy and random tokens hard)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=512))  # a small vocabulary keeps the test fast
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.from_numpy(EASY[: 8 * 33].reshape(8, 33).astype(np.int64))
    for _ in range(steps):
        loss = model(data[:, :-1], data[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _token_nll(model: GPT, tokens: np.ndarray, block: int) -> np.ndarray:
    """nll[i] = loss of predicting tokens[i + 1], every target once, independent of gpt2.evals: plain
    non-overlapping windows, and for the last targets the window ending at the split's end."""
    t = torch.from_numpy(tokens.astype(np.int64))
    n_targets = len(t) - 1
    starts = list(range(0, n_targets - block + 1, block))
    if starts[-1] + block < n_targets:
        starts.append(n_targets - block)
    nll = np.full(n_targets, np.nan)
    with torch.no_grad():
        for chunk in range(0, len(starts), 16):
            s = starts[chunk : chunk + 16]
            x = torch.stack([t[a : a + block] for a in s])  # (B, block)
            y = torch.stack([t[a + 1 : a + block + 1] for a in s])
            logp = torch.log_softmax(model(x).logits.double(), dim=-1)  # (B, block, V)
            losses = -logp.gather(-1, y[..., None])[..., 0].numpy()
            for a, row in zip(s, losses):
                nll[a : a + block] = row
    assert not np.isnan(nll).any()
    return nll


@pytest.fixture(scope="module")
def easy_hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path, np.ndarray]:
    """A learned model, a val file whose first half is easy and second half hard, and the
    reference loss of every target token."""
    model = _learned_model()
    rng = np.random.default_rng(0)
    val = np.concatenate([EASY[:2000], rng.integers(0, 512, 2001)]).astype(np.uint16)
    path = tmp_path_factory.mktemp("val") / "val.bin"
    write_shard(path, val)
    return model, path, _token_nll(model, val, 32)


def _trainer(tmp_path: Path, val_path: Path, model: GPT, overrides: list[str]) -> Trainer:
    from gpt2.data.loader import TokenLoader
    from gpt2.data.shards import TokenStream

    cfg: TrainConfig = compose_train(["model=tiny", "model.n_positions=64", "block_size=32", "micro_batch_size=4",
                                      "total_batch_tokens=128", "device=cpu", "precision=fp32", "logger=none",
                                      "sample_tokens=0", "progress_bar=false", *overrides])
    loader = TokenLoader(TokenStream([val_path]), cfg.micro_batch_size, cfg.block_size, shuffle=False)
    return tiny_trainer(cfg, tmp_path, model, (loader, loader))


@pytest.mark.slow
def test_logged_val_loss_is_the_whole_split_when_small(easy_hard, tmp_path: Path) -> None:
    model, path, nll = easy_hard
    half = len(nll) // 2
    easy_loss, hard_loss = nll[:half].mean(), nll[half:].mean()
    assert easy_loss < 2.5 and hard_loss > 5.0, (easy_loss, hard_loss)  # ln(512) = 6.2
    trainer = _trainer(tmp_path, path, model, [])  # defaults: eval.val_tokens=1M > 4001 tokens
    metrics = trainer.evaluate()
    assert metrics["val/tokens"] == len(nll)  # every token but the first
    assert metrics["val/loss"] == pytest.approx(nll.mean(), rel=1e-5)  # fp32 vs an fp64 reference
    assert easy_loss < metrics["val/loss"] < hard_loss
    # the old estimate (a prefix of the split) would have reported the easy half only
    assert metrics["val/loss"] > easy_loss + 1.0


@pytest.mark.slow
def test_logged_val_loss_samples_a_large_split_the_same_way_each_time(easy_hard, tmp_path: Path) -> None:
    model, path, nll = easy_hard
    trainer = _trainer(tmp_path, path, model, ["eval.val_tokens=1600"])  # 50 of 125 windows
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second and first["val/tokens"] == 1600
    half = len(nll) // 2
    assert nll[:half].mean() < first["val/loss"] < nll[half:].mean()
    assert first["val/loss"] == pytest.approx(nll.mean(), rel=0.25)  # an estimate of the whole split


# ------------------------------------------------------------------ HellaSwag

transformers = pytest.importorskip("transformers")

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "violin", "desert", "copper", "meadow", "harbor",
         "pencil", "falcon", "glacier", "lantern", "orchid", "saddle", "thunder", "velvet", "walnut"]


def tricky_items(n: int = 20, seed: int = 0) -> list[dict]:
    """Items in the HellaSwag schema: endings of different token lengths, leading/trailing spaces and
    punctuation, some contexts far longer than a 64-position window."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        ctx = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        if i % 6 == 0:
            ctx = (ctx + ". ") * 20 + "Then"  # ~200+ tokens: cropped from the left
        if i % 5 == 1:
            ctx = "  " + ctx + ","
        endings = []
        for k in range(4):
            words = rng.choice(WORDS, size=int(rng.integers(1, 3 + 4 * k)))
            ending = " ".join(words) + ("." if k % 2 else "!?")
            endings.append((" " if (i + k) % 3 == 0 else "") + ending)
        items.append({"ind": i, "ctx": ctx, "endings": endings, "label": int(rng.integers(0, 4)), "split": "val"})
    return items


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return path


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


CYCLE = """apple river stone cloud tiger lamp violin desert copper harbor pencil glacier lantern saddle thunder velvet
table chair window garden forest mountain ocean island bridge castle tower village city road train ship plane bird
horse sheep goat wolf bear fox rabbit mouse snake fish shark whale eagle owl bread cheese butter milk honey sugar salt
pepper rice bean corn wheat grape lemon orange cherry peach plum iron gold silver glass paper wood cotton silk wool
leather brick steel coal oil gas fire water snow rain wind storm sun moon star planet music song dance story poem
letter book page door""".split()
"""100 words, each one GPT-2 token with its leading space: every ending is 3 tokens."""


def predictable_items(n: int, seed: int) -> list[dict]:
    """The right ending continues the context's word cycle (CYCLE in order); the wrong ones are other
    words outside the context in random order (so a random model has nothing to prefer)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        start = int(rng.integers(0, len(CYCLE)))
        cycle = [CYCLE[(start + j) % len(CYCLE)] for j in range(9)]
        unused = [w for w in CYCLE if w not in cycle[:6]]
        label = int(rng.integers(0, 4))
        endings = [" ".join(rng.permutation(unused)[:3]) for _ in range(4)]
        endings[label] = " ".join(cycle[6:])
        items.append({"ctx": " ".join(cycle[:6]), "endings": endings, "label": label})
    return items


@pytest.fixture(scope="module")
def hellaswag_run(tmp_path_factory: pytest.TempPathFactory, gpt2_cache: Path, tiktoken_file: str) -> dict:
    """A tiny model trained on the word cycle, with HellaSwag on predictable items during training."""
    from gpt2.train.train import train

    root = tmp_path_factory.mktemp("hs_run")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(20):
        words = [CYCLE[(5 * i + j) % len(CYCLE)] for j in range(400)]
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    items_path = write_jsonl(root / "items.jsonl", predictable_items(200, seed=1))
    overrides = ["model=tiny", "data=text", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}",
                 f"data.tokenizer_path={tiktoken_file}", "data.num_proc=1", "logger=none", "progress_bar=false",
                 "device=cpu", "precision=fp32", "block_size=32", "micro_batch_size=8", "total_batch_tokens=256",
                 "max_steps=30", "eval_interval=0", "eval.hellaswag_interval=30", f"eval.hellaswag.path={items_path}",
                 "optimizer.lr=1e-2", "scheduler.warmup_steps=3", "sample_tokens=0", "log_interval=10"]
    run_dir = root / "run"
    train(compose_train(overrides), run_dir)
    return {"run_dir": run_dir, "items": items_path, "metrics": read_metrics(run_dir / "metrics.jsonl")}


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


def run_eval_cli(args: list[str], cwd: Path, nproc: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run_eval.py"), *args]
    if nproc:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "run_eval.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


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


def test_run_evals_on_a_pretrained_dir_scores_like_the_library(tmp_path: Path, tiktoken_file: str) -> None:
    from gpt2.config import EvalRunConfig, HellaSwagConfig
    from gpt2.evals.runner import run_evals
    from gpt2.model.hf import export_hf
    from gpt2.tokenizers.gpt2 import get_tokenizer

    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=50257)).eval()
    export_hf(model, model.cfg, tmp_path / "hf")
    items = write_jsonl(tmp_path / "hs.jsonl", tricky_items(12, seed=2))
    cfg = EvalRunConfig(pretrained=str(tmp_path / "hf"), tasks=["hellaswag"], device="cpu", dtype="fp32",
                        batch_size=4, limit=10, hellaswag=HellaSwagConfig(path=str(items)),
                        tokenizer_path=tiktoken_file, output_file=str(tmp_path / "out" / "res.json"))
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
