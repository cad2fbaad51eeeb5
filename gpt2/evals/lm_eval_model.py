"""EleutherAI lm-evaluation-harness on our own model: `GPTLM`, our GPT and tokenizer (GPT-2's tiktoken encoding
or our BPE, whichever the checkpoint has) as an lm-eval `LM`. gpt2.evals.lm_eval_tasks loads and runs the tasks.

`GPTLM` scores requests the way lm-eval's own `hf` backend (HFLM) does, so that its numbers equal HFLM's on the
exported model: a context's trailing spaces move to the continuation (lm-eval's TemplateLM), the window is
context + continuation cropped from the left to n_positions + 1 tokens, an empty context is conditioned on
<|endoftext|>, and rolling log-likelihoods use lm-eval's own disjoint windows. Requests are sorted by length
(longest first, as HFLM does), requests that feed the model the same tokens share one row, rows are
right-padded, and each batch is one forward under the caller's autocast; log-softmax runs in fp32.
generate_until decodes greedily with the model's KV cache, batching prompts of equal length (the model takes
no padding mask), and stops at the task's stop strings or <|endoftext|>; a task that asks for sampling is
refused.

Ranks: lm-eval's evaluator gives document i to rank i % world_size (`lm.rank`, `lm.world_size`), pads the ranks
to the same number of requests (`lm.all_gather` of the counts) and gathers the per-document metrics to rank 0
(`lm.gather_object`), which aggregates. `GPTLM` implements those collectives with torch.distributed on the
process group the caller joined (gloo on CPU, nccl on CUDA). Every rank runs the same number of forwards (a
rank with fewer batches runs 1-token dummy forwards), since FSDP forwards are collective.

This module imports lm_eval; gpt2.config checks that it is installed before anything imports this module.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from gpt2.errors import UserError
from gpt2.model.gpt import GPT
from gpt2.runtime.distributed import any_rank
from gpt2.tokenizers.factory import AnyTokenizer


class GPTLM(TemplateLM):
    """Our GPT and tokenizer as an lm-eval model (see the module docstring)."""

    def __init__(self, model: GPT, tokenizer: AnyTokenizer, *, batch_size: int, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 max_gen_toks: int = 256) -> None:
        super().__init__()
        self.model = model  # bare or FSDP-sharded; never a DDP wrapper
        self.tok = tokenizer  # not `tokenizer`: lm-eval reads HF tokenizer fields from that
        self.batch_size = batch_size
        self.autocast = autocast
        self.max_length = model.cfg.n_positions
        self.max_gen_toks = max_gen_toks
        self._device = device
        if dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_token

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's encoding of (context, continuation) pairs, without its progress bar."""
        return super().loglikelihood(requests, disable_tqdm=True)

    # ------------------------------------------------------------- collectives

    def _collective_device(self) -> torch.device:
        """Where tensors of a collective live: this rank's GPU under nccl, else the CPU (gloo)."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensors of every rank concatenated (a 0-d tensor counts as one element), as accelerate gathers."""
        if self.world_size <= 1:
            return tensor
        mine = tensor.reshape(-1).to(self._collective_device())
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size <= 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _rounds(self, n_batches: int) -> int:
        """The most batches any rank has: every rank runs that many forwards."""
        if self.world_size <= 1:
            return n_batches
        t = torch.tensor([n_batches], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------------ forwards

    @torch.no_grad()
    def _forward(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (B, L, V) of right-padded rows (causal attention: padding never reaches a real position)."""
        tokens = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long)  # (B, L)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        with self.autocast():
            return self.model(tokens.to(self.device)).logits

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether greedy decoding gives it) of each (key, context, continuation)
        token request."""
        inputs: list[tuple[int, ...]] = []
        for _, ctx, cont in requests:
            if not 0 < len(cont) <= self.max_length:
                raise UserError(f"an lm-eval request has a continuation of {len(cont)} tokens; it must have 1 to "
                                f"n_positions={self.max_length} tokens (the model's window). Check the task's "
                                f"doc_to_choice / doc_to_target.")
            inputs.append(tuple((ctx + cont)[-(self.max_length + 1):][:-1]))
        users: dict[tuple[int, ...], list[int]] = defaultdict(list)  # one model row per distinct input
        for i, inp in enumerate(inputs):
            users[inp].append(i)
        order = sorted(users, key=lambda t: (-len(t), t))  # longest first, as HFLM sorts
        out: list[tuple[float, bool]] = [(math.nan, False)] * len(requests)
        bs = self.batch_size
        for r in range(self._rounds(math.ceil(len(order) / bs))):
            batch = order[r * bs: (r + 1) * bs]
            if not batch:  # this rank has no batch left: a dummy forward (FSDP forwards are collective)
                self._forward([[self.eot_token_id]])
                continue
            logits = self._forward(batch)  # (B, L, V)
            for row, inp in enumerate(batch):
                for i in users[inp]:
                    cont = requests[i][2]
                    logp = logits[row, len(inp) - len(cont): len(inp)].float().log_softmax(-1)  # (n, V)
                    target = torch.tensor(cont, dtype=torch.long, device=logp.device)  # (n,)
                    out[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in lm-eval's disjoint windows of n_positions tokens (perplexity tasks)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):  # summed in window order, as HFLM does
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -------------------------------------------------------------- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string (the task's `until`, and <|endoftext|>)."""
        eos = self.tok.decode([self.eot_token_id])
        prompts: list[tuple[list[int], list[str], int]] = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample"):
                raise UserError(f"lm-eval task {req.task_name} asks for sampling ({gen_kwargs}); our model decodes "
                                f"greedily: pass +lm_eval.args.gen_kwargs={{do_sample:false}} (in training "
                                f"+eval.lm_eval.args.gen_kwargs=...).")
            room = self.max_length - max_gen
            if room <= 0:
                raise UserError(f"lm-eval task {req.task_name} generates up to max_gen_toks={max_gen} tokens, but the "
                                f"model's window is n_positions={self.max_length}; pass "
                                f"+lm_eval.args.gen_kwargs={{max_gen_toks:N}} with N < {self.max_length} (in training "
                                f"+eval.lm_eval.args.gen_kwargs=...).")
            prompts.append((self.tok_encode(context)[-room:], until, max_gen))
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # same length and budget: one batch
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i][0])):
            groups[(len(prompts[i][0]), prompts[i][2])].append(i)
        batches = [idx[j: j + self.batch_size] for idx in groups.values() for j in range(0, len(idx), self.batch_size)]
        out = [""] * len(requests)
        for r in range(self._rounds(len(batches))):
            batch = batches[r] if r < len(batches) else []
            new = self._greedy([prompts[i][0] for i in batch], [prompts[i][1] for i in batch],
                               prompts[batch[0]][2] if batch else 0)
            for i, ids in zip(batch, new):
                out[i] = postprocess_generated_text(self.tok.decode(ids), prompts[i][1], None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    @torch.no_grad()
    def _greedy(self, prompts: list[list[int]], stops: list[list[str]], max_new: int) -> list[list[int]]:
        """Up to `max_new` greedy tokens after each of the equal-length `prompts`, each row stopping at its first
        stop string. A rank that is done (or has no prompts) runs dummy forwards until every rank is done."""
        new: list[list[int]] = [[] for _ in prompts]
        done = [max_new <= 0] * len(prompts)
        with self.autocast():
            if prompts:
                cache = self.model.new_kv_cache(len(prompts), max_len=len(prompts[0]) + max_new)
                x = torch.tensor(prompts, dtype=torch.long, device=self.device)  # (B, T)
                logits = self.model(x, kv_cache=cache).logits[:, -1]  # (B, V)
            else:
                self._forward([[self.eot_token_id]])
            while True:
                nxt = logits.argmax(-1) if prompts else None  # (B,)
                for b in range(len(prompts)):
                    if not done[b]:
                        new[b].append(int(nxt[b]))
                        text = self.tok.decode(new[b])
                        done[b] = len(new[b]) >= max_new or any(s and s in text for s in stops[b])
                if not any_rank(not all(done)):  # every rank leaves the loop at the same step
                    return new
                if all(done):
                    self._forward([[self.eot_token_id]])
                else:
                    logits = self.model(nxt[:, None], kv_cache=cache).logits[:, -1]  # (B, V)
