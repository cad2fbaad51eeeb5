"""A GPT-shaped toy model for checkpoint tests and their worker processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 32


class TinyLM(nn.Module):
    """GPT-shaped toy: tied embedding / head, keys like gpt2.model.gpt.GPT."""

    def __init__(self, n_embd: int = 16, n_layer: int = 2) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(VOCAB, n_embd),
            h=nn.ModuleList([nn.Linear(n_embd, n_embd) for _ in range(n_layer)]),
        ))
        self.lm_head = nn.Linear(n_embd, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = x + torch.tanh(block(x))
        return self.lm_head(x)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (2, 8), generator=g)
    logits = model(idx)  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), idx.roll(-1, 1).reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def make(seed: int = 0, **kw: int) -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM(**kw)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)
