"""The package as a user gets it: a wheel built from the tree by `pip wheel`, installed (without its
dependencies, which come from this environment) into a fresh venv, imported from a folder with no gpt2/ in it.
Everything the package reads at run time (the Hydra config tree, gpt2/conf/) must be inside the wheel."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

GPT2_124M_PARAMS = 124_439_808
"""GPT-2 small's parameter count with tied embeddings (Hugging Face's GPT2LMHeadModel for "gpt2")."""

IN_FRESH_VENV = """
import json
import gpt2
from gpt2.model.gpt import GPT
from gpt2.model.presets import model_preset
model = GPT(model_preset("gpt2"))
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from gpt2.cli import CONF_DIR, register_configs
register_configs()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = OmegaConf.to_object(compose(config_name="train", overrides=["model=tiny", "optimizer=muon"]))
print(json.dumps({"gpt2": gpt2.__file__, "conf_dir": str(CONF_DIR),
                  "params": sum(p.numel() for p in model.parameters()),
                  "model": cfg.model.name, "n_layer": cfg.model.n_layer, "optimizer": cfg.optimizer.name}))
"""


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def shipped_files(root: Path) -> set[str]:
    """Every file under root/gpt2 (relative to root), bytecode caches and hidden files aside."""
    return {p.relative_to(root).as_posix() for p in (root / "gpt2").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_imports_and_builds_a_preset_from_another_folder(tmp_path: Path) -> None:
    # What the build reads, copied so that the build's build/ and egg-info folders stay out of the tree.
    src = tmp_path / "src"
    shutil.copytree(REPO / "gpt2", src / "gpt2", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        env=env)
    (wheel,) = dist.glob("gpt2-*.whl")

    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("gpt2/")}
    in_tree = shipped_files(REPO)
    assert "gpt2/conf/model/gpt2.yaml" in in_tree and "gpt2/conf/hydra/launcher/slurm_gpu.yaml" in in_tree
    missing = sorted(in_tree - in_wheel)
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data] in pyproject.toml): {missing}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       env=env).stdout.strip())
    # torch, hydra, yaml...: this environment's site-packages, after the fresh venv's own (no network needed).
    (purelib / "deps_from_test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = json.loads(run([str(python), "-c", IN_FRESH_VENV], cwd=elsewhere, env=env).stdout.strip().splitlines()[-1])
    package = Path(out["gpt2"]).parent
    assert package == purelib / "gpt2", out
    assert Path(out["conf_dir"]) == package / "conf", out
    assert out["params"] == GPT2_124M_PARAMS, out
    assert (out["model"], out["n_layer"], out["optimizer"]) == ("tiny", 2, "muon"), out
