"""Random number generators: seeding, and capturing/restoring every stream a checkpoint carries
(Python `random`, NumPy's legacy global generator, torch CPU and CUDA): `RNGState` is each rank's part of a
checkpoint."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device). Call it after the imports and data
    preparation that might draw from these generators (importing rich does), so that a run's RNG
    state does not depend on whether it had to tokenize the corpus."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types torch.load(weights_only=True) accepts."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored for the devices present in both."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for i, s in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


class RNGState:
    """This process's RNG streams as a checkpoint state (`state_dict` captures, `load_state_dict` restores)."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state["rng"])
