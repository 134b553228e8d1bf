"""The random streams of one rank: Python's, NumPy's, torch's CPU generator and the generator of the one
CUDA device this rank uses. Dropout draws from them; the data order does not (it is a function of the seed
and the sample index, see data.py).
"""

from __future__ import annotations

import random

import numpy as np
import torch


class RankRNG:
    """This rank's generators, saved with every checkpoint (one entry per rank) and restored on resume."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        self.seed, self.rank, self.device = seed, rank, device

    def reseed(self, step: int) -> None:
        """Fresh streams, different on every rank: at a new start (step 0), or when a checkpoint of another
        world size has no entry for this rank."""
        torch.manual_seed(self.seed + 1000 * step + self.rank)

    def state_dict(self) -> dict:
        kind, keys, *rest = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.copy()), *rest),
            "torch": torch.get_rng_state(),
            # Only the device this rank uses: a resume may see another number of GPUs per process.
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def load_state_dict(self, state: dict) -> None:
        random.setstate(_as_tuples(state["python"]))
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy(), *rest))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if isinstance(cuda, list):  # checkpoints before one-device states held every visible device's
            cuda = cuda[self.device.index or 0] if len(cuda) > (self.device.index or 0) else None
        if cuda is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, self.device)


def _as_tuples(x):
    """Python's state as it left a weights-only load (lists) back into the tuples random.setstate wants."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
