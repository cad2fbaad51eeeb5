"""gpt2.generate.decoders: the graph-ready decode path (StaticKVCache: position tensor, masked attention over the whole
cache) runs on CPU and gives the same tokens as the eager path and as HF `generate`; CUDA-graph capture
runs where CUDA is available and is skipped cleanly elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from gpt2.config import ModelConfig
from gpt2.errors import UserError
from gpt2.generate.decoders import decoder_for, release_graphs, resolve_mode
from gpt2.generate.sampling import generate
from gpt2.model.gpt import GPT

VOCAB = 512  # small, so that top-p sorting stays cheap


SAMPLING = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.9, top_k=40),
            "nucleus": dict(temperature=1.2, top_p=0.8)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, object]:
    """A tiny random GPT-2 (512-token vocabulary) in transformers and the same weights in ours."""
    from gpt2.model.hf import load_pretrained

    torch.manual_seed(0)
    path: Path = tmp_path_factory.mktemp("tiny_hf")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=VOCAB,
                                  attn_implementation="sdpa")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    return load_pretrained(str(path)).eval(), hf


def hf_generate(hf: object, prompt: torch.Tensor, n: int, seed: int, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    kw: dict = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature,
                                                                   top_k=top_k or 0, top_p=top_p or 1.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0, **kw)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_static_decode_equals_eager_and_hf(models: tuple[GPT, object], batch: int, sampling: str) -> None:
    ours, hf = models
    kw = SAMPLING[sampling]
    prompt = torch.randint(0, VOCAB, (batch, 7), generator=torch.Generator().manual_seed(batch))
    got = {}
    for mode in ("static", "eager"):
        torch.manual_seed(123)  # generator=None: the global RNG, as HF samples with it
        got[mode] = generate(ours, prompt, 40, decode_mode=mode, **kw)
    want = hf_generate(hf, prompt, 40, seed=123, **kw)
    assert got["static"].shape == want.shape == (batch, 47)
    assert got["static"].tolist() == got["eager"].tolist()
    assert got["static"].tolist() == want.tolist()
    # with an explicit generator too (the CLI's way): same seed, same tokens on both paths
    if sampling != "greedy":
        a, b = (generate(ours, prompt, 40, decode_mode=mode, generator=torch.Generator().manual_seed(7), **kw)
                for mode in ("static", "eager"))
        assert a.tolist() == b.tolist()


def test_static_cache_logits_match_eager(models: tuple[GPT, object]) -> None:
    """Prefill then single steps through the static cache reproduce the full forward's logits."""
    ours, _ = models
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(idx).logits  # (2, 12, V)
        dec = decoder_for(ours, 2, 16, "static")
        got = [dec.prefill(idx[:, :5])]
        for t in range(5, 12):
            got.append(dec.step(idx[:, t : t + 1]))
    assert int(dec.pos) == 12 - 1 + 1  # advanced on the device, never read during decoding
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)


def switched_model() -> GPT:
    """A tiny model with every ModelConfig switch away from GPT-2 (rotary positions, QK-norm, ReLU^2, RMSNorm,
    untied head, soft cap), its zero-initialised projections given weights so that attention reaches the logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=VOCAB, position_embedding="rope",
                      qk_norm=True, mlp_activation="relu2", norm="rmsnorm", tie_embeddings=False,
                      zero_init_proj=True, logit_softcap=5.0)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.05)
    return model.eval()


def full_recompute_greedy(model: GPT, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding without any cache: the whole sequence through the model for every token. Returns the
    tokens (B, T + n) and the logits each pick was made from (B, n, V)."""
    idx, picked = prompt, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx).logits[:, -1]  # (B, V)
            picked.append(logits)
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx, torch.stack(picked, dim=1)


def test_all_switches_cached_decoders_equal_full_recompute() -> None:
    """Rotary positions continue from the cache (eager: its host-side length; static: the position tensor)."""
    model = switched_model()
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    want, want_logits = full_recompute_greedy(model, prompt, 20)
    for mode in ("eager", "static"):
        assert generate(model, prompt, 20, temperature=0.0, decode_mode=mode).tolist() == want.tolist(), mode
        with torch.no_grad():
            dec = decoder_for(model, 3, 26, mode)
            got = [dec.prefill(prompt)]
            for t in range(6, 25):
                got.append(dec.step(want[:, t : t + 1]))
        torch.testing.assert_close(torch.stack(got, dim=1), want_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a chunk of several tokens after cached ones (the eager cache's masked path)
        cache = model.new_kv_cache(3, 26)
        model(want[:, :4], kv_cache=cache)
        chunk = model(want[:, 4:15], kv_cache=cache).logits[:, -1]
        torch.testing.assert_close(chunk, model(want[:, :15]).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_decode_modes_resolve() -> None:
    cpu = torch.device("cpu")
    assert resolve_mode("auto", cpu) == "eager" and resolve_mode("static", cpu) == "static"
    with pytest.raises(UserError, match="decode_mode=graph needs CUDA.*decode_mode=static"):
        resolve_mode("graph", cpu)
    with pytest.raises(UserError, match="decode_mode='fast' is not supported; choose one of auto, eager, static"):
        resolve_mode("fast", cpu)


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager(models: tuple[GPT, object]) -> None:
    ours, hf = models
    model = GPT(ours.cfg).cuda().eval()
    model.load_state_dict(ours.state_dict())
    prompt = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1)).cuda()
    assert resolve_mode("auto", prompt.device) == "graph"
    eager = generate(model, prompt, 30, temperature=0.0, decode_mode="eager")
    graph = generate(model, prompt, 30, temperature=0.0, decode_mode="graph")
    again = generate(model, prompt, 30, temperature=0.0, decode_mode="graph")  # replays the captured graph
    assert graph.tolist() == eager.tolist() == again.tolist()
    assert graph.tolist() == hf_generate(hf.cuda(), prompt, 30, seed=0).tolist()
    gens = [torch.Generator(device="cuda").manual_seed(3) for _ in range(2)]
    a, b = (generate(model, prompt, 30, temperature=0.8, top_k=50, generator=g, decode_mode=m)
            for g, m in zip(gens, ("graph", "eager")))
    assert a.tolist() == b.tolist()
    release_graphs(model)


@pytest.mark.cuda
def test_cuda_graph_decode_with_all_switches_equals_full_recompute() -> None:
    """The captured step reads its rotary angles from the position tensor, so replays keep moving forward."""
    model = switched_model().cuda()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4)).cuda()
    want, _ = full_recompute_greedy(model, prompt, 25)
    graph = generate(model, prompt, 25, temperature=0.0, decode_mode="graph")
    again = generate(model, prompt, 25, temperature=0.0, decode_mode="graph")  # replays the captured graph
    assert graph.tolist() == again.tolist() == want.tolist()
    release_graphs(model)
