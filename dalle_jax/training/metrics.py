"""Where a run reports: a JSON-lines file, TensorBoard event files and PNG image grids.

Only process 0 writes, so a pod's hosts do not write the same files N times.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np
from PIL import Image


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._tensorboard = None
        self._jsonl = None
        if self.enabled:
            from flax.metrics import tensorboard  # Imports TensorFlow: only where it writes.

            os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
            self._tensorboard = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(v) for k, v in values.items()}
        for key, value in values.items():
            self._tensorboard.scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, name: str, grid: np.ndarray) -> str | None:
        """Writes a uint8 (H, W, 3) grid to TensorBoard and images/<name>_<step>.png."""
        if not self.enabled:
            return None
        grid = np.asarray(grid, dtype=np.uint8)
        self._tensorboard.image(name, grid, step)
        path = os.path.join(self.workdir, "images", f"{name}_{step:08d}.png")
        Image.fromarray(grid).save(path)
        return path

    def flush(self) -> None:
        if self.enabled:
            self._tensorboard.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


def read_metrics(workdir: str) -> list[dict]:
    """Every record of a run's metrics.jsonl (for tests, notebooks and reports)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
