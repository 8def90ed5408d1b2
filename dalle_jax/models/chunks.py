"""Running a jit-compiled model function over any number of inputs with one compilation."""
from __future__ import annotations

import numpy as np


def apply_in_chunks(fn, model, inputs: np.ndarray, chunk: int) -> np.ndarray:
    """`fn(model, x)` over fixed-size chunks of `inputs` (the last padded with zeros and the
    padding dropped again), so every call, whatever its length, reuses one compiled program."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be positive")
    outputs = []
    for start in range(0, len(inputs), chunk):
        part = inputs[start:start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:],
                                                part.dtype)])
        outputs.append(np.asarray(fn(model, padded))[:len(part)])
    return np.concatenate(outputs)
