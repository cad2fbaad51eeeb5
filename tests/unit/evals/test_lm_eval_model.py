"""gpt2.evals.lm_eval_model and lm_eval_tasks: our GPT as an lm-eval `LM`, against lm-eval's own `hf` backend (HFLM)
on the exported model (per-request log-likelihoods, rolling log-likelihoods, greedy generations, accuracies),
through run_eval.py (one process and two gloo ranks), offline errors, the config's spelling, and lm-eval tasks
during FSDP training. Every task is defined here on local jsonl files (`dataset_path: json`); nothing is
downloaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.config import LMEvalConfig, ModelConfig
from gpt2.errors import UserError
from gpt2.model.gpt import GPT
from gpt2.train.metrics import read_metrics
from tests.helpers import CPU, run_torchrun, save_model_checkpoint, subprocess_env
from tests.unit.evals.common import WORDS, run_eval_cli

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (pip install -e '.[eval]') is not installed")
from gpt2.evals import lm_eval_tasks  # noqa: E402  (imports lm_eval)
from gpt2.evals.lm_eval_model import GPTLM  # noqa: E402

TASKS = ("tiny_mc", "tiny_ppl", "tiny_gen")
N_POSITIONS = 128


def _metric(name: str, aggregation: str, higher: bool) -> str:
    return f"  - metric: {name}\n    aggregation: {aggregation}\n    higher_is_better: {str(higher).lower()}\n"


def write_tasks(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """Three lm-eval tasks on local jsonl files: multiple choice (some contexts longer than the model's window,
    some one-token choices), rolling log-likelihood (texts of several windows) and generate_until (prompts of a
    few lengths, so that some share a batch; stop string "."). A random GPT with tied embeddings tends to repeat
    its last token: the choice "and" after "... and" is often the greedy continuation, and a prompt ending with
    "." often reaches the stop string at once."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS, size=k))

    mc = [{"question": words(int(rng.integers(60, 120) if i % 6 == 0 else rng.integers(3, 10))) + "?",
           "choices": ["and" if k == 3 else words(1) if (i + k) % 3 == 0 else words(int(rng.integers(1, 5)))
                       for k in range(4)],
           "label": int(rng.integers(0, 4))} for i in range(n)]
    ppl = [{"text": words(int(rng.integers(5, 300)))} for _ in range(8)]
    gen = [{"prompt": words(int(rng.integers(2, 5))) + "." * (i % 2), "answer": " " + words(1)} for i in range(12)]
    gen += [{"prompt": words(130), "answer": " x"}]  # longer than the window: cropped from the left
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def head(task: str, data: str, output_type: str) -> str:
        return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
                f"test_split: test\noutput_type: {output_type}\n")

    (folder / "tiny_mc.yaml").write_text(
        head("tiny_mc", "mc.jsonl", "multiple_choice") + 'doc_to_text: "{{question}} and"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n'
        + _metric("acc", "mean", True) + _metric("acc_norm", "mean", True))
    (folder / "tiny_ppl.yaml").write_text(
        head("tiny_ppl", "ppl.jsonl", "loglikelihood_rolling") + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "num_fewshot: 0\nmetric_list:\n" + _metric("word_perplexity", "weighted_perplexity", False)
        + _metric("bits_per_byte", "bits_per_byte", False))
    (folder / "tiny_gen.yaml").write_text(
        head("tiny_gen", "gen.jsonl", "generate_until") + 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'num_fewshot: 0\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n" + _metric("exact_match", "mean", True))
    return folder


def by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiktoken_file: str) -> dict:
    """A random GPT (GPT-2's vocabulary, 128 positions) as a training checkpoint and as its Hugging Face export,
    and the task folder."""
    from gpt2.checkpoint.export import export_checkpoint

    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=N_POSITIONS, vocab_size=50257))
    save_model_checkpoint(root / "run", 1, model)
    with pytest.MonkeyPatch.context() as mp:  # the checkpoint records GPT-2's tokenizer; find its vocabulary file
        mp.setenv("GPT2_TIKTOKEN_FILE", tiktoken_file)
        export_checkpoint(root / "run", root / "hf")
    return {"run": root / "run", "hf": root / "hf", "tasks": write_tasks(root / "tasks"), "tiktoken": tiktoken_file}


@pytest.fixture(scope="module")
def compared(exported: dict) -> dict:
    """The three tasks (2-shot where a task allows it) scored by our LM on the checkpoint and by HFLM on the
    export, with every request's response logged."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gpt2.checkpoint.handle import load_for_inference

    cfg = LMEvalConfig(num_fewshot=2, include_path=str(exported["tasks"]),
                       args={"log_samples": True, "bootstrap_iters": 0})
    model, tok, _ = load_for_inference(str(exported["run"]), None, exported["tiktoken"])
    lm = GPTLM(model.eval(), tok, batch_size=5, device=CPU)
    tasks = lm_eval_tasks.load_tasks(TASKS, cfg, key="lm_eval")
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    mine = lm_eval_tasks.evaluate(lm, tasks, cfg, limit=0)
    rng_kept = torch.equal(torch.rand(3), expected_draw)
    hf = HFLM(pretrained=str(exported["hf"]), device="cpu", dtype="float32", batch_size=5)
    ref = lm_eval.simple_evaluate(model=hf, tasks=list(TASKS), num_fewshot=2, log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(exported["tasks"]),
                                                           include_defaults=False))
    ref = json.loads(json.dumps(ref, default=lm_eval.utils.handle_non_serializable))
    return {"ours": mine, "hf": ref, "rng_kept": rng_kept, "tok": tok}


@pytest.mark.slow
def test_loglikelihoods_equal_the_hf_backend_on_the_export(compared: dict) -> None:
    mine, ref = compared["ours"]["samples"], compared["hf"]["samples"]
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = by_doc(mine[task]), by_doc(ref[task])
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]  # the same prompts (2-shot for tiny_mc)
        flat = lambda samples: [r[0] for s in samples for r in s["resps"]]  # noqa: E731
        ll_a = np.array([r[0] if isinstance(r, list) else r for r in flat(a)], dtype=np.float64)
        ll_b = np.array([r[0] if isinstance(r, list) else r for r in flat(b)], dtype=np.float64)
        assert len(ll_a) == len(ll_b) >= 8
        np.testing.assert_allclose(ll_a, ll_b, rtol=1e-5, atol=1e-5)
        if task == "tiny_mc":
            assert [r[1] for r in flat(a)] == [r[1] for r in flat(b)]  # is_greedy
            assert any(r[1] for r in flat(a)), "no greedy continuation: the is_greedy check proved nothing"
            longest = max(len(compared["tok"].encode(s["arguments"][0][0])) for s in a)
            assert longest > N_POSITIONS  # some windows are cropped from the left
    for task in ("tiny_mc", "tiny_ppl"):  # the metrics lm-eval computes from them
        for key, value in compared["hf"]["results"][task].items():
            if isinstance(value, float):
                assert compared["ours"]["results"][task][key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
def test_accuracies_equal_the_hf_backend(compared: dict) -> None:
    mc_ours, mc_hf = compared["ours"]["results"]["tiny_mc"], compared["hf"]["results"]["tiny_mc"]
    assert (mc_ours["acc,none"], mc_ours["acc_norm,none"]) == (mc_hf["acc,none"], mc_hf["acc_norm,none"])
    assert compared["ours"]["n-shot"]["tiny_mc"] == 2 and compared["ours"]["n-samples"]["tiny_mc"]["effective"] == 24


@pytest.mark.slow
def test_greedy_generations_equal_the_hf_backend(compared: dict) -> None:
    a, b = by_doc(compared["ours"]["samples"]["tiny_gen"]), by_doc(compared["hf"]["samples"]["tiny_gen"])
    texts = [s["resps"][0][0] for s in a]
    assert texts == [s["resps"][0][0] for s in b]
    n_tokens = [len(compared["tok"].encode(t)) for t in texts]
    assert min(n_tokens) < 5 <= max(n_tokens), n_tokens  # some stopped at ".", others ran to max_gen_toks=6
    assert compared["ours"]["results"]["tiny_gen"]["exact_match,none"] == \
        compared["hf"]["results"]["tiny_gen"]["exact_match,none"]


@pytest.mark.slow
def test_evaluate_leaves_the_global_rng_as_it_was(compared: dict) -> None:
    assert compared["rng_kept"]  # simple_evaluate seeds torch/numpy/random; a training run must not notice


def test_metrics_are_flat_and_name_a_filter_other_than_none() -> None:
    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                        "acc_norm,none": 0.25},
                           "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": "N/A"}}}
    assert lm_eval_tasks.metrics(results) == {"lm_eval/arc_easy/acc": 0.5, "lm_eval/arc_easy/acc_norm": 0.25,
                                              "lm_eval/gsm8k/exact_match,strict-match": 0.125}


@pytest.mark.slow
def test_run_eval_prints_lm_evals_table_and_writes_its_results(exported: dict, compared: dict, tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    proc = run_eval_cli([f"checkpoint={exported['run']}", "tasks=[lm_eval:tiny_mc,lm_eval:tiny_ppl]",
                         f"lm_eval.include_path={exported['tasks']}", "lm_eval.num_fewshot=2",
                         "+lm_eval.args.bootstrap_iters=0", f"tokenizer.path={exported['tiktoken']}",
                         "device=cpu", "dtype=fp32", "batch_size=5", f"output_file={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\|\s*Tasks\s*\|Version\|Filter\|n-shot\|\s*Metric", proc.stdout), proc.stdout
    assert re.search(r"\|tiny_mc\s*\|.*\|acc\s*\|", proc.stdout) and "word_perplexity" in proc.stdout
    res = json.loads(out.read_text())["lm_eval"]
    assert res["n-shot"] == {"tiny_mc": 2, "tiny_ppl": 0}
    assert res["results"] == {t: compared["ours"]["results"][t] for t in ("tiny_mc", "tiny_ppl")}


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_numbers(exported: dict, compared: dict, tmp_path: Path) -> None:
    """lm-eval gives document i to rank i % 2 and gathers the per-document metrics on rank 0. tiny_mc zero-shot
    here: lm-eval draws few-shot examples per rank from one seeded stream, so k-shot prompts depend on the world
    size (its own behaviour, with any backend)."""
    from gpt2.checkpoint.handle import load_for_inference

    out = tmp_path / "res.json"
    proc = run_eval_cli([f"checkpoint={exported['run']}", "tasks=[lm_eval:tiny_mc,lm_eval:tiny_ppl,lm_eval:tiny_gen]",
                         f"lm_eval.include_path={exported['tasks']}", "+lm_eval.args.bootstrap_iters=0",
                         f"tokenizer.path={exported['tiktoken']}", "device=cpu", "dtype=fp32", "batch_size=5",
                         f"output_file={out}"], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("|tiny_mc") == 1  # rank 0 prints
    payload = json.loads(out.read_text())
    assert payload["world_size"] == 2
    model, tok, _ = load_for_inference(str(exported["run"]), None, exported["tiktoken"])
    cfg = LMEvalConfig(include_path=str(exported["tasks"]), args={"bootstrap_iters": 0})
    one = dict(compared["ours"]["results"])  # tiny_ppl and tiny_gen are zero-shot there too
    zero_shot_mc = lm_eval_tasks.load_tasks(["tiny_mc"], cfg, key="lm_eval")
    lm = GPTLM(model.eval(), tok, batch_size=5, device=CPU)
    one.update(lm_eval_tasks.evaluate(lm, zero_shot_mc, cfg, limit=0)["results"])
    for task in TASKS:
        for key, value in one[task].items():
            if isinstance(value, float):
                assert payload["lm_eval"]["results"][task][key] == pytest.approx(value, rel=1e-9), (task, key)


@pytest.mark.slow
def test_a_dataset_that_cannot_be_fetched_is_one_error_line(exported: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offline"
    folder.mkdir()
    (folder / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: example-org/not-on-this-machine\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as offline as this machine, but failing at once, not after retries
    proc = run_eval_cli([f"checkpoint={exported['run']}", "tasks=[val_loss,lm_eval:hub_task]",
                         f"lm_eval.include_path={folder}", "device=cpu"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert re.search(r"^error: lm-eval task hub_task: could not fetch dataset example-org/not-on-this-machine "
                     r"for task hub_task \(.*\); to use local files, write a task yaml with `dataset_path: json`.*"
                     r"lm_eval\.include_path=FOLDER\.$", errors[0]), errors[0]


@pytest.mark.slow
def test_an_unknown_task_names_the_nearest_ones(exported: dict) -> None:
    with pytest.raises(UserError, match=r"^'tiny_mcq' is not an lm-eval task, group or tag; did you mean tiny_mc"
                                        r".*eval\.lm_eval\.include_path=FOLDER"):
        lm_eval_tasks.load_tasks(["tiny_mcq"], LMEvalConfig(include_path=str(exported["tasks"])), key="eval.lm_eval")
    with pytest.raises(UserError, match=r"lm_eval\.args\.tasks is set by our own config"):
        lm_eval_tasks.load_tasks(["tiny_mc"], LMEvalConfig(args={"tasks": ["x"]}), key="lm_eval")


@pytest.mark.slow
def test_fsdp_training_logs_lm_eval_metrics_at_its_evaluations(exported: dict, base_overrides: list[str],
                                                               tmp_path: Path) -> None:
    """A tiny CPU run on two gloo ranks under FSDP (its forwards are collective: every rank must run as many,
    whatever its share of the requests and however early its generations stop) with all three kinds of task:
    metrics.jsonl holds lm_eval/<task>/<metric> at the baseline and at the end (eval.lm_eval_interval=2,
    max_steps=2), equal to one process's scores of the final checkpoint; the loss plot gets its second panel."""
    from PIL import Image

    from gpt2.checkpoint.handle import load_for_inference

    overrides = [*base_overrides, "max_steps=2", "block_size=32", "micro_batch_size=4", "total_batch_tokens=256",
                 "eval.interval=0", "eval.val_tokens=2048", "eval.sample_tokens=0", "distributed=fsdp",
                 "eval.lm_eval_tasks=[tiny_mc,tiny_ppl,tiny_gen]", "eval.lm_eval_interval=2",
                 "eval.lm_eval_limit=9", f"eval.lm_eval.include_path={exported['tasks']}"]  # 9: 5 and 4 per rank
    run_dir = run_torchrun(overrides, tmp_path).run_dir
    evals = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r}
    assert sorted(evals) == [0, 2]
    model, tok, _ = load_for_inference(str(run_dir), None, exported["tiktoken"])
    cfg = LMEvalConfig(include_path=str(exported["tasks"]))
    loaded = lm_eval_tasks.load_tasks(TASKS, cfg, key="lm_eval")
    lm = GPTLM(model.eval(), tok, batch_size=4, device=CPU)
    direct = lm_eval_tasks.metrics(lm_eval_tasks.evaluate(lm, loaded, cfg, limit=9))
    assert {"lm_eval/tiny_mc/acc", "lm_eval/tiny_ppl/word_perplexity", "lm_eval/tiny_gen/exact_match"} <= set(direct)
    assert all(set(direct) <= set(r) for r in evals.values())
    assert {k: evals[2][k] for k in direct} == pytest.approx(direct, rel=1e-9)
    assert Image.open(run_dir / "loss.png").size[0] == 1200  # loss and accuracy panels


@pytest.mark.parametrize(("gen_kwargs", "message"), [
    ({"until": ["\n"], "max_gen_toks": 128},
     r"generates up to max_gen_toks=128 tokens, but the model's window is n_positions=128; "
     r"pass \+lm_eval.args.gen_kwargs=\{max_gen_toks:N\} with N < 128"),
    ({"until": ["\n"], "do_sample": True, "temperature": 0.7}, r"asks for sampling .*decodes greedily"),
])
def test_generation_that_cannot_be_done_greedily_in_the_window_is_refused(exported: dict, gen_kwargs: dict,
                                                                          message: str) -> None:
    from lm_eval.api.instance import Instance

    from gpt2.checkpoint.handle import load_for_inference

    model, tok, _ = load_for_inference(str(exported["run"]), None, exported["tiktoken"])
    request = Instance("generate_until", doc={}, arguments=("apple river", gen_kwargs), idx=0,
                       metadata=("tiny_gen", 0, 1))
    with pytest.raises(UserError, match=r"^lm-eval task tiny_gen " + message):
        GPTLM(model.eval(), tok, batch_size=2, device=CPU).generate_until([request])


def test_config_spells_lm_eval_tasks_one_way() -> None:
    from gpt2.config import EvalConfig, EvalRunConfig

    EvalRunConfig(checkpoint="run", tasks=["val_loss", "lm_eval:arc_easy", "lm_eval:mmlu_*"]).check()
    assert EvalRunConfig(checkpoint="run", tasks=["hellaswag", "lm_eval:piqa"]).lm_eval_tasks == ["piqa"]
    with pytest.raises(UserError, match=r"tasks='arc_easy' is not supported; .*lm_eval:NAME .*e\.g\. lm_eval:arc_easy"):
        EvalRunConfig(checkpoint="run", tasks=["arc_easy"]).check()
    with pytest.raises(UserError, match=r"tasks='lm_eval:' is not supported"):
        EvalRunConfig(checkpoint="run", tasks=["lm_eval:"]).check()
    with pytest.raises(UserError, match=r"eval.lm_eval_tasks holds 'lm_eval:piqa'; .*without the lm_eval: prefix"):
        EvalConfig(lm_eval_tasks=["lm_eval:piqa"]).check()
    with pytest.raises(UserError, match=r"eval.lm_eval.num_fewshot=-1 must be >= 0"):
        EvalConfig(lm_eval_tasks=["piqa"], lm_eval=LMEvalConfig(num_fewshot=-1)).check()


def test_without_lm_eval_installed_the_rest_imports_and_asking_for_it_is_one_error(tmp_path: Path) -> None:
    """gpt2.config, the runner and the trainer import without lm_eval; a config naming lm-eval tasks then says
    which extra to install (lm_eval hidden from the import system, as if it were not installed)."""
    code = """
import sys
from importlib.machinery import PathFinder
class WithoutLmEval(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "lm_eval" else PathFinder.find_spec(name, path, target)
sys.meta_path = [WithoutLmEval if f is PathFinder else f for f in sys.meta_path]
import gpt2.evals.runner, gpt2.train.trainer
assert "lm_eval" not in sys.modules
from gpt2.config import EvalRunConfig
from gpt2.errors import ConfigError
try:
    EvalRunConfig(checkpoint="run", tasks=["lm_eval:arc_easy"]).check()
except ConfigError as err:
    print(err)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("tasks names lm-eval tasks, but the lm-eval package is not installed; install it "
                                   "with pip install -e '.[eval]' (or pip install 'lm_eval>=0.4.13').")


@pytest.mark.slow
def test_our_bpe_scores_as_the_hf_backend_scores_its_export(exported: dict, bpe_cache: Path, tmp_path: Path) -> None:
    """A run trained with tokenizer=bpe: GPTLM on the checkpoint (our BPE) and HFLM on its export (the BPE's
    tokenizer.json through transformers) see the same tokens and give the same log-likelihoods."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gpt2.checkpoint.export import export_checkpoint
    from gpt2.checkpoint.handle import load_for_inference
    from gpt2.train.launch import train
    from tests.helpers import bpe_overrides, compose_train

    run = tmp_path / "run"
    train(compose_train(bpe_overrides(bpe_cache, "max_steps=2", "eval.sample_tokens=0")), run)
    export_checkpoint(run, tmp_path / "hf")
    cfg = LMEvalConfig(include_path=str(exported["tasks"]), args={"log_samples": True, "bootstrap_iters": 0})
    model, tok, _ = load_for_inference(str(run), None, None)
    assert tok.eot_token != 50256  # our BPE, not GPT-2's vocabulary
    tasks = ["tiny_mc", "tiny_ppl"]
    mine = lm_eval_tasks.evaluate(GPTLM(model.eval(), tok, batch_size=5, device=CPU),
                                  lm_eval_tasks.load_tasks(tasks, cfg, key="lm_eval"), cfg, limit=0)
    hf = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=5)
    ref = lm_eval.simple_evaluate(model=hf, tasks=tasks, log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(exported["tasks"]), include_defaults=False))
    for task in tasks:
        a, b = by_doc(mine["samples"][task]), by_doc(ref["samples"][task])
        ll = [np.array([float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for s in side
                        for r in s["resps"]], dtype=np.float64) for side in (a, b)]
        assert len(ll[0]) == len(ll[1]) >= 8
        np.testing.assert_allclose(ll[0], ll[1], rtol=1e-5, atol=1e-5)
    mc_ours, mc_hf = mine["results"]["tiny_mc"], ref["results"]["tiny_mc"]
    assert (mc_ours["acc,none"], mc_ours["acc_norm,none"]) == (mc_hf["acc,none"], mc_hf["acc_norm,none"])
