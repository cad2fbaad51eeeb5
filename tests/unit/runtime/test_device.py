"""gpt2.runtime.device: the one precision-name -> dtype table, autocast contexts, the fp16 scaler."""

from __future__ import annotations

import pytest
import torch

from gpt2.errors import UserError
from gpt2.runtime.device import DTYPES, autocast, grad_scaler, resolve_device, resolve_dtype, resolve_precision
from tests.helpers import CPU


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_autocast_runs_matmuls_in_the_named_dtype(precision: str) -> None:
    layer = torch.nn.Linear(4, 4)
    with autocast(CPU, precision):
        out = layer(torch.randn(2, 4))
    assert out.dtype == DTYPES[precision]


def test_scaler_only_for_fp16() -> None:
    assert grad_scaler(CPU, "fp16").is_enabled()
    assert not grad_scaler(CPU, "bf16").is_enabled() and not grad_scaler(CPU, "fp32").is_enabled()


def test_resolve_names() -> None:
    assert resolve_dtype("fp16", CPU) == torch.float16 and resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_precision("auto", CPU) in ("bf16", "fp32")
    with pytest.raises(UserError, match="precision 'fp8' is not one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)
    assert resolve_device("cpu") == CPU
    with pytest.raises(UserError, match="device='tpu' is not supported"):
        resolve_device("tpu")
