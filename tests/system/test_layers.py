"""The import layers of pyproject.toml's import-linter contracts, checked by the real `lint-imports`: the
package keeps them, and an import that points up a layer breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_lint_imports_keeps_the_layers_and_fails_on_a_planted_upward_import(tmp_path: Path) -> None:
    shutil.copytree(REPO / "gpt2", tmp_path / "gpt2", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = lint(tmp_path)
    assert kept.returncode == 0 and "0 broken" in kept.stdout, kept.stdout + kept.stderr
    model = tmp_path / "gpt2" / "model" / "gpt.py"
    model.write_text(model.read_text() + "\nfrom gpt2.train import trainer  # planted: the model imports the trainer\n")
    broken = lint(tmp_path)
    assert broken.returncode != 0, broken.stdout
    assert "BROKEN" in broken.stdout and "gpt2.model.gpt -> gpt2.train.trainer" in broken.stdout, broken.stdout
