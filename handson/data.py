"""Small, generated data for the chapters: seeding and toy examples. Nothing is downloaded."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "toy_sentence"]


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


#: Hand-made features for a toy sentence: (determiner, animal, action, place).
_TOY = {
    "the": [1.0, 0.0, 0.0, 0.0],
    "cat": [0.0, 1.0, 0.0, 0.0],
    "sat": [0.0, 0.0, 1.0, 0.0],
    "on": [0.0, 0.0, 0.5, 0.5],
    "mat": [0.0, 0.0, 0.0, 1.0],
}


def toy_sentence(words: str = "the cat sat on the mat", dtype: torch.dtype = torch.float64
                 ) -> tuple[list[str], torch.Tensor]:
    """Return the tokens of a toy sentence and a (len, 4) matrix of interpretable features.

    Feature columns: determiner, animal, action, place. Unknown words raise ``KeyError``.
    """
    tokens = words.split()
    x = torch.tensor([_TOY[t] for t in tokens], dtype=dtype)
    return tokens, x
