"""gpt2.config: every shipped YAML composes into a valid TrainConfig and builds; bad values fail clearly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt2 import config as C
from gpt2.errors import ConfigError
from gpt2.model.gpt import GPT
from gpt2.utils.serialize import from_dict, to_dict
from tests.helpers import CONF, REPO, compose_train


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group",
    ["model", "optimizer", "scheduler", "precision", "distributed", "data", "logger", "experiment"],
)
def test_every_group_option_composes_and_validates(group: str) -> None:
    options = group_options(group)
    assert options, f"gpt2/conf/{group} is empty"
    for option in options:
        overrides = [f"{group}={option}"]
        if group == "data" and option in ("text", "hf", "shards"):
            overrides.append("data.path=corpus.txt")
        if group == "data" and option == "mix":
            overrides.append("+data.sources={books:{name:shakespeare},code:{name:text,path:src}}")
        cfg = compose_train(overrides)
        assert isinstance(cfg, C.TrainConfig)
        C.validate(cfg)
        if group == "model":
            assert cfg.model.name == option
            with torch.device("meta"):  # build without allocating gpt2-xl
                model = GPT(replace(cfg.model, vocab_size=50257))  # null: follows the tokenizer
            assert model.num_params() > 0
        if group != "experiment":
            preset_of = {"fineweb_edu": "hf"}  # data presets name the source kind they use
            assert getattr(cfg, group).name == preset_of.get(option, option)


def test_presets_are_the_model_yaml_files() -> None:
    from gpt2.model.presets import HUB_MODELS, model_preset, preset_for, preset_names

    assert set(preset_names()) == {p.stem for p in (CONF / "model").glob("*.yaml")} >= set(HUB_MODELS)
    for name in preset_names():
        assert compose_train([f"model={name}"]).model == model_preset(name, vocab_size=None)  # every key, as composed
        p = model_preset(name)
        assert p.name == name and preset_for(p.n_layer, p.n_head, p.n_embd) == name
    for name in HUB_MODELS:  # the Hub's GPT-2 checkpoints: 1024 positions, the GPT-2 vocabulary
        assert (model_preset(name).n_positions, model_preset(name).vocab_size) == (1024, 50257)
    with pytest.raises(ConfigError, match="'gpt3' is not a known model; choose one of gpt2, gpt2-large"):
        model_preset("gpt3")


def test_defaults_and_overrides() -> None:
    cfg = compose_train(["model=tiny", "optimizer.lr=1e-3", "precision=bf16", "max_steps=7"])
    assert cfg.optimizer.lr == 1e-3 and cfg.precision.name == "bf16" and cfg.max_steps == 7
    assert cfg.model.n_embd == 64
    assert from_dict(C.TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c.model, "n_head", 3), "model.n_embd=64 is not divisible by model.n_head=3"),
        (lambda c: setattr(c, "block_size", 512), "block_size=512 exceeds model.n_positions=256"),
        (lambda c: setattr(c, "total_batch_tokens", 1000), "total_batch_tokens=1000 is not divisible"),
        (lambda c: setattr(c.optimizer, "lr", -1.0), "optimizer.lr=-1.0 must be greater than 0"),
        (lambda c: setattr(c.scheduler, "name", "step"), "scheduler.name='step' is not supported"),
        (lambda c: setattr(c.scheduler, "warmup_steps", 5000), "warmup_steps=5000 exceeds max_steps"),
    ],
)
def test_validate_names_key_value_and_fix(change, message: str) -> None:
    cfg = compose_train(["model=tiny"])
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        C.validate(cfg)


def test_batch_must_divide_by_world_size() -> None:
    cfg = compose_train(["model=tiny", "total_batch_tokens=1024", "micro_batch_size=8", "block_size=128"])
    assert C.check_batch(cfg, 1, 8) == 1
    with pytest.raises(ConfigError, match=r"micro_batch_size \* block_size \* world_size = 8 \* 128 \* 2 = 2048"):
        C.validate(cfg, world_size=2)


def _field_docs() -> dict[tuple[str, str], str]:
    """(class, field) -> the field's docstring, read from gpt2/config.py's source."""
    import ast

    docs = {}
    for node in ast.parse((REPO / "gpt2" / "config.py").read_text()).body:
        if isinstance(node, ast.ClassDef):
            for a, b in zip(node.body, node.body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[(node.name, a.target.id)] = b.value.value.strip()
    return docs


def _yaml_files() -> list[tuple[Path, type]]:
    from gpt2.cli import GROUPS

    files = [(f, cls) for group, cls in GROUPS.items() for f in sorted((CONF / group).glob("*.yaml"))]
    return files + [(CONF / "train.yaml", C.TrainConfig), (CONF / "generate.yaml", C.GenerateConfig),
                    (CONF / "eval.yaml", C.EvalRunConfig)]


@pytest.mark.parametrize("path,cls", _yaml_files(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_each_default_lives_in_the_dataclass_and_each_yaml_comment_is_its_docstring(path: Path, cls: type) -> None:
    """A group or root YAML file holds only values that differ from the dataclass default, and a key's comment
    is the field's docstring word for word: neither can drift from gpt2/config.py."""
    import dataclasses
    import re
    import typing

    import yaml

    docs = _field_docs()
    stack: list[tuple[int, type | None]] = []  # (indent, the dataclass whose keys are at that level)
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)(\w+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        owner = stack[-1][1] if stack else (None if key in ("defaults", "hydra") else cls)
        if owner is None:
            stack.append((indent, None))  # defaults list, hydra settings: not schema keys
            continue
        value_text, _, comment = rest.partition("  # ")
        doc = next(docs[(base.__name__, key)] for base in owner.__mro__ if (base.__name__, key) in docs)
        assert not comment or comment.strip() == doc, (
            f"{path.name}: the comment on {key} is not {owner.__name__}.{key}'s docstring")
        hints = typing.get_type_hints(owner, vars(C))
        nested = next((t for t in typing.get_args(hints[key]) or (hints[key],) if dataclasses.is_dataclass(t)), None)
        if nested is not None:
            stack.append((indent, nested))
            continue
        field = {f.name: f for f in dataclasses.fields(owner)}[key]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        value = yaml.safe_load(value_text) if value_text.strip() else None
        assert value == "???" or value != default, f"{path.name}: {key}: {value!r} repeats the dataclass default"
